"""The map: every frame's pose and status, the keyframes with their depth and images, the local
window, the graph of keyframe edges and the recent image buffer.

One `Map` is shared by the tracker (which appends frames and reads the current keyframe) and the
mapper (which adds keyframes' depth, moves their poses and retires keyframes that leave the
window), possibly from two threads. Every public method takes the map's lock, so a reader never
sees half an update; what a method returns is a snapshot (tensors are replaced, never written in
place, so a returned tensor does not change under its reader).

Poses are world->camera (`poses_cw`, lietorch layout `[tx, ty, tz, qx, qy, qz, qw]`), float64 on
the map's device. A frame's pose is stored relative to its keyframe (`rel_cw = T_frame T_kf^-1`),
so frames follow when the mapper moves their keyframe.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from v2d.errors import V2DError
from v2d.features import Features
from v2d.geometry.lie import matrix_to_quat, quat_to_matrix, se3_exp, se3_identity, se3_inv, se3_log, se3_mul

__all__ = ["Map", "Keyframe", "KeyframeView", "FrameState", "TrackQuality", "normalized_pose", "release_heap"]


def normalized_pose(T: torch.Tensor) -> torch.Tensor:
    """The pose in float64 with its quaternion renormalised (float32 network poses drift off unit
    length, and products of slightly non-unit quaternions compound: a constant-velocity guess cubes
    the error).

    Shapes: (..., 7) -> (..., 7) float64.
    """
    T = T.double()
    return torch.cat([T[..., :3], T[..., 3:] / T[..., 3:].norm(dim=-1, keepdim=True)], dim=-1)


def release_heap() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Tracking allocates and frees many image-sized tensors; glibc keeps the freed pages, and their
    fragmentation lets the peak creep up over a long video (measured: RSS 569 -> 385 MB after
    trimming at the end of a 1000-frame run). Called when a keyframe leaves the window and before
    the output phase.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _grey(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


@dataclass
class TrackQuality:
    """How well a frame is aligned to its keyframe (pixel values at the network size)."""

    flow: float = 0.0  # mean flow the keyframe's depth induces in the frame (pose distance)
    confidence: float = 0.0  # mean flow confidence over the keyframe's visible pixels
    overlap: float = 0.0  # fraction of keyframe pixels visible in the frame
    residual: float = 0.0  # confidence-weighted RMS of (target - reprojection)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass
class FrameState:
    """One input frame: its keyframe, pose relative to it and flags."""

    keyframe: int  # keyframe id whose pose this frame's pose is relative to
    rel_cw: torch.Tensor  # (7,) float64: T_frame * T_keyframe^-1
    quality: TrackQuality = field(default_factory=TrackQuality)
    lost: bool = False
    static: bool = False
    textureless: bool = False
    is_keyframe: bool = False
    interpolated: bool = False  # lost, then given a pose between its tracked neighbours (`Map.bridge`)


@dataclass
class Keyframe:
    """A keyframe. `image`, `depth`, `valid`, `prior`, `normal` are full size while in the window, None after;
    `features` (its sparse keypoints, descriptors and global descriptor) stay.

    Shapes: pose_cw (7,) float64; image (H, W, 3) uint8; depth, prior (H, W) float32; valid (H, W)
    bool (False in splatting holes); small_depth (H/s, W/s) float32 and small_image (H/s, W/s, 3)
    uint8 after leaving the window.
    """

    frame: int
    pose_cw: torch.Tensor
    image: np.ndarray | None
    depth: torch.Tensor | None
    valid: torch.Tensor | None = None
    prior: torch.Tensor | None = None  # the depth module's depth, locked and fused (the BA prior)
    small_depth: np.ndarray | None = None
    small_image: np.ndarray | None = None
    segment: int = 0  # map segment: a restart after a long loss begins a new one (own pose and scale)
    normal: torch.Tensor | None = None  # (3, H, W) camera-frame unit normals (depth.normals), in the window
    small_normal: np.ndarray | None = None  # (H/s, W/s, 3) float32 after leaving the window
    features: Features | None = None  # sparse features (`slam.features`), kept for the whole run


@dataclass(frozen=True)
class KeyframeView:
    """A consistent snapshot of one keyframe (what tracking against it needs)."""

    id: int
    frame: int
    pose_cw: torch.Tensor
    image: np.ndarray
    depth: torch.Tensor
    valid: torch.Tensor


class Map:
    """Frames, keyframes, the local window, keyframe edges and recent images; thread-safe.

    Args:
        intrinsics: (4,) fx, fy, cx, cy at the network size (the map's current estimate; the mapper
            refines the focal length of uncalibrated video).
        device: where the map's tensors live.
        thumb_stride: every frame keeps a grey copy of every `thumb_stride`-th pixel (`thumb`, for the
            final alignment of every frame, `slam.filler`; 19 KB a frame at 240x320 and 2); None
            keeps none.
    """

    def __init__(self, intrinsics: torch.Tensor, device: torch.device, thumb_stride: int | None = 2) -> None:
        self._lock = threading.RLock()
        self.device = device
        self._intr = intrinsics.to(device=device, dtype=torch.float64)
        self._frames: list[FrameState] = []
        self._keyframes: list[Keyframe] = []
        self._window: list[int] = []  # keyframe ids, oldest first
        self._images: OrderedDict[int, np.ndarray] = OrderedDict()  # frame index -> image
        self._thumb_stride = thumb_stride
        self._thumbs: list[np.ndarray | None] = []  # frame index -> (H/s, W/s) uint8 grey
        self._edges: set[tuple[int, int]] = set()  # keyframe pairs (a, b) with a flow edge a -> b
        self._loops: set[tuple[int, int]] = set()  # keyframe pairs (a < b) seen to overlap (loop closures)
        self._last_good = 0  # newest frame that was not lost
        self._segments = 1  # segment ids handed out

    # ------------------------------------------------------------------------------------ reads
    @property
    def intrinsics(self) -> torch.Tensor:
        """(4,) float64, the current estimate."""
        with self._lock:
            return self._intr

    def num_frames(self) -> int:
        with self._lock:
            return len(self._frames)

    def num_keyframes(self) -> int:
        with self._lock:
            return len(self._keyframes)

    def window(self, upto: int | None = None) -> list[int]:
        """Keyframe ids of the local window, oldest first; with `upto`, the window up to and including
        that keyframe (in concurrent mode the tracker may have made newer ones that are not mapped yet).
        """
        with self._lock:
            if upto is None:
                return list(self._window)
            if upto not in self._window:
                raise V2DError(f"keyframe {upto} is not in the window {self._window}")
            return self._window[: self._window.index(upto) + 1]

    def window_frames(self) -> set[int]:
        """Frame indices of the window's keyframes."""
        with self._lock:
            return {self._keyframes[k].frame for k in self._window}

    def frame(self, f: int) -> FrameState:
        """A copy of frame f's state."""
        with self._lock:
            return dataclasses.replace(self._frames[f])

    def frames(self) -> list[FrameState]:
        """Copies of every frame's state."""
        with self._lock:
            return [dataclasses.replace(s) for s in self._frames]

    def keyframe(self, kid: int) -> Keyframe:
        """A shallow copy of keyframe kid (its tensors are never modified in place)."""
        with self._lock:
            return dataclasses.replace(self._keyframes[kid])

    def keyframes(self, ids: Iterable[int] | None = None) -> list[Keyframe]:
        with self._lock:
            ids = range(len(self._keyframes)) if ids is None else ids
            return [dataclasses.replace(self._keyframes[k]) for k in ids]

    def reference(self) -> KeyframeView:
        """The newest window keyframe: the one frames are tracked against."""
        with self._lock:
            kid = self._window[-1]
            kf = self._keyframes[kid]
            return KeyframeView(kid, kf.frame, kf.pose_cw, kf.image, kf.depth, kf.valid)

    def frame_pose(self, f: int) -> torch.Tensor:
        """World->camera pose of frame f (7,) float64."""
        with self._lock:
            st = self._frames[f]
            return se3_mul(st.rel_cw, self._keyframes[st.keyframe].pose_cw)

    def recent_poses(self, count: int) -> torch.Tensor:
        """World->camera poses of the last `count` frames (fewer at the start), oldest first, read
        together. Shapes: -> (min(count, N), 7) float64."""
        with self._lock:
            frames = range(max(0, len(self._frames) - count), len(self._frames))
            return torch.stack([se3_mul(self._frames[f].rel_cw, self._keyframes[self._frames[f].keyframe].pose_cw)
                                for f in frames])

    def frame_poses(self) -> torch.Tensor:
        """World->camera poses of every frame (N, 7) float64."""
        with self._lock:
            if not self._frames:
                return torch.zeros(0, 7, dtype=torch.float64, device=self.device)
            rel = torch.stack([s.rel_cw for s in self._frames])
            kf = torch.stack([self._keyframes[s.keyframe].pose_cw for s in self._frames])
            return se3_mul(rel, kf)

    def image(self, f: int) -> np.ndarray | None:
        """Frame f's image if it is still buffered."""
        with self._lock:
            return self._images.get(f)

    def thumb(self, f: int) -> np.ndarray | None:
        """Frame f's grey copy at `thumb_stride` ((H/s, W/s) uint8), kept for the whole run (None
        without `thumb_stride`)."""
        with self._lock:
            return self._thumbs[f] if 0 <= f < len(self._thumbs) else None

    def images(self) -> dict[int, np.ndarray]:
        """The buffered images, oldest first (a snapshot: later trimming does not affect it)."""
        with self._lock:
            return dict(self._images)

    def edges(self) -> set[tuple[int, int]]:
        """Keyframe pairs (a, b) the last optimisations used as flow edges a -> b."""
        with self._lock:
            return set(self._edges)

    def loops(self) -> set[tuple[int, int]]:
        """Keyframe pairs (a, b), a < b, recorded by `add_loop` (the global bundle adjustment's loop edges)."""
        with self._lock:
            return set(self._loops)

    # ------------------------------------------------------------------------------------ tracker writes
    def add_frame(self, state: FrameState, image: np.ndarray) -> int:
        """Append the next frame's state and buffer its image; returns its index. A lost frame holds
        the pose of the newest frame that was not lost (its `rel_cw` is set to give that pose).

        Shapes: state.rel_cw (7,) float64; image (H, W, 3) uint8.
        """
        with self._lock:
            if state.lost:
                held = se3_mul(self._frames[self._last_good].rel_cw,
                               self._keyframes[self._frames[self._last_good].keyframe].pose_cw)
                ref = self._keyframes[state.keyframe].pose_cw
                state = dataclasses.replace(state, rel_cw=se3_mul(held, se3_inv(ref)))
            self._frames.append(state)
            s = self._thumb_stride
            self._thumbs.append(None if s is None else _grey(image[::s, ::s]))
            f = len(self._frames) - 1
            if not state.lost:
                self._last_good = f
            self._images[f] = image
            return f

    def bridge(self, f: int) -> list[int]:
        """Frame f has a pose after a run of lost frames (it was tracked or relocalised, or it is the
        first keyframe of a segment just merged into the one before the run): give each of them the
        pose interpolated on SE(3) between the last frame with a pose before the run and f (by frame
        index: constant velocity across the gap), mark them `interpolated` and no longer lost.
        Nothing happens when the two ends lie in different segments (different scales). Returns
        the indices of the frames bridged."""
        with self._lock:
            run = []
            g = f - 1
            while g >= 0 and self._frames[g].lost and not self._frames[g].is_keyframe:
                run.append(g)
                g -= 1
            if not run or g < 0 or self._segment_of(g) != self._segment_of(f):
                return []
            self._interpolate(run, g, f)
            for h in run:
                self._frames[h] = dataclasses.replace(self._frames[h], lost=False, interpolated=True)
            return sorted(run)

    def interpolate(self, frames: Iterable[int], a: int, b: int) -> None:
        """Give `frames` the poses interpolated on SE(3) between frames a and b by frame index
        (constant velocity), as `bridge` does; e.g. again after a and b were moved."""
        with self._lock:
            self._interpolate(list(frames), a, b)

    def _interpolate(self, frames: list[int], a: int, b: int) -> None:
        pa, pb = self._pose(a), self._pose(b)
        step = se3_log(se3_mul(pb, se3_inv(pa)))
        for h in frames:
            pose = se3_mul(se3_exp(step * ((h - a) / (b - a))), pa)
            st = self._frames[h]
            rel = normalized_pose(se3_mul(pose, se3_inv(self._keyframes[st.keyframe].pose_cw)))
            self._frames[h] = dataclasses.replace(st, rel_cw=rel)

    def _segment_of(self, f: int) -> int:
        return self._keyframes[self._frames[f].keyframe].segment

    def _pose(self, f: int) -> torch.Tensor:
        st = self._frames[f]
        return se3_mul(st.rel_cw, self._keyframes[st.keyframe].pose_cw)

    def new_segment(self) -> int:
        """A new segment id (for the keyframe of a restart)."""
        with self._lock:
            self._segments += 1
            return self._segments - 1

    def segments(self) -> dict[int, list[int]]:
        """Segment id -> its keyframe ids, oldest first."""
        with self._lock:
            out: dict[int, list[int]] = {}
            for kid, kf in enumerate(self._keyframes):
                out.setdefault(kf.segment, []).append(kid)
            return out

    def merge_segment(self, segment: int, into: int, rotation: torch.Tensor, translation: torch.Tensor,
                      scale: float) -> None:
        """Re-express segment `segment` in the world and scale of segment `into` and join them.

        The similarity maps a world point of `segment` to `into`'s: X' = scale R X + t. Keyframe poses
        become R_k' = R_k R^T, t_k' = scale t_k - R_k' t; depths (and priors, strided copies) and the
        translations of frames relative to the segment's keyframes are multiplied by `scale`.

        Shapes: rotation (3, 3); translation (3,) float64.
        """
        with self._lock:
            R = rotation.to(self._intr)
            t = translation.to(self._intr)
            moved = set()
            for kid, kf in enumerate(self._keyframes):
                if kf.segment != segment:
                    continue
                moved.add(kid)
                Rk = quat_to_matrix(kf.pose_cw[3:]) @ R.T
                tk = scale * kf.pose_cw[:3] - Rk @ t
                changes: dict = {"pose_cw": normalized_pose(torch.cat([tk, matrix_to_quat(Rk)])), "segment": into}
                for name in ("depth", "prior", "small_depth"):
                    value = getattr(kf, name)
                    if value is not None:
                        changes[name] = value * scale
                self._keyframes[kid] = dataclasses.replace(kf, **changes)
            for f, st in enumerate(self._frames):
                if st.keyframe in moved:
                    rel = torch.cat([st.rel_cw[:3] * scale, st.rel_cw[3:]])
                    self._frames[f] = dataclasses.replace(st, rel_cw=rel)

    def drop_last_frame(self) -> None:
        """Forget the newest frame (it is tracked again, against a new keyframe)."""
        with self._lock:
            f = len(self._frames) - 1
            self._frames.pop()
            self._thumbs.pop()
            self._images.pop(f, None)
            if self._last_good == f:
                self._last_good = next((g for g in range(f - 1, -1, -1) if not self._frames[g].lost), 0)

    def add_keyframe(self, kf: Keyframe, frame: int, at_frame_pose: bool = False) -> int:
        """Make frame `frame` a keyframe and append it to the window; its pose is kf.pose_cw, or with
        `at_frame_pose` the frame's current pose (read under the lock, so a window the mapper moves
        meanwhile is followed). Shapes: kf.pose_cw (7,) float64; kf.depth (H, W)."""
        with self._lock:
            if at_frame_pose:
                st = self._frames[frame]
                pose = normalized_pose(se3_mul(st.rel_cw, self._keyframes[st.keyframe].pose_cw))
                kf = dataclasses.replace(kf, pose_cw=pose)
            kid = len(self._keyframes)
            self._keyframes.append(kf)
            self._window.append(kid)
            # a keyframe has a pose of its own (a restart's frame was lost until it began a segment)
            self._frames[frame] = dataclasses.replace(self._frames[frame], keyframe=kid, is_keyframe=True, lost=False,
                                                      rel_cw=se3_identity((), dtype=torch.float64, device=self.device))
            return kid

    def trim_images(self, max_frames: int) -> None:
        """Drop buffered images older than the window's oldest keyframe and beyond `max_frames`."""
        with self._lock:
            oldest = self._keyframes[self._window[0]].frame if self._window else len(self._frames)
            for f in [f for f in self._images if f < oldest]:
                del self._images[f]
            while len(self._images) > max_frames:
                self._images.popitem(last=False)

    # ------------------------------------------------------------------------------------ mapper writes
    def set_intrinsics(self, intrinsics: torch.Tensor) -> None:
        with self._lock:
            self._intr = intrinsics.to(device=self.device, dtype=torch.float64)

    def update_keyframe(self, kid: int, **changes: object) -> None:
        """Replace fields of keyframe kid (pose_cw, depth, valid, prior, features, ...)."""
        with self._lock:
            self._keyframes[kid] = dataclasses.replace(self._keyframes[kid], **changes)

    def set_keyframe_poses(self, poses_cw: dict[int, torch.Tensor]) -> None:
        """Move keyframes (id -> new world->camera pose) in one step. Window keyframes newer than all
        of them (made by the tracker while these were optimised) move rigidly with the newest one,
        so they keep their pose relative to it."""
        if not poses_cw:
            return
        with self._lock:
            newest = max(poses_cw)
            delta = se3_mul(se3_inv(self._keyframes[newest].pose_cw), poses_cw[newest])  # old^-1 new
            for kid, pose in poses_cw.items():
                self._keyframes[kid] = dataclasses.replace(self._keyframes[kid], pose_cw=pose)
            for kid in self._window:
                if kid > newest:
                    kf = self._keyframes[kid]
                    self._keyframes[kid] = dataclasses.replace(kf, pose_cw=normalized_pose(se3_mul(kf.pose_cw, delta)))

    def move_frame(self, f: int, pose_cw: torch.Tensor) -> None:
        """Set frame f's world->camera pose (stored relative to its keyframe)."""
        with self._lock:
            st = self._frames[f]
            rel = normalized_pose(se3_mul(pose_cw, se3_inv(self._keyframes[st.keyframe].pose_cw)))
            self._frames[f] = dataclasses.replace(st, rel_cw=rel)

    def add_loop(self, a: int, b: int) -> None:
        """Record that keyframes a and b see the same place (a loop closure or relocalisation), so the
        global bundle adjustment joins them with a flow edge whatever their current poses say."""
        with self._lock:
            n = len(self._keyframes)
            if a == b or not (0 <= a < n and 0 <= b < n):
                raise V2DError(f"add_loop: expected two different keyframe ids in [0, {n}), got ({a}, {b})")
            self._loops.add((min(a, b), max(a, b)))

    def set_edges(self, pairs: Iterable[tuple[int, int]]) -> None:
        with self._lock:
            self._edges = set(pairs)

    def retire(self, kid: int, stride: int,
               on_retire: Callable[[int, np.ndarray, torch.Tensor, np.ndarray, np.ndarray | None], None]
               | None = None) -> bool:
        """Keyframe kid leaves the window: hand out its final depth, keep a strided copy for the cloud.

        `on_retire(frame, depth (H, W) float32 ndarray with 0 where unknown, pose_cw (7,), image, normal
        (H, W, 3) float32 camera-frame unit normals or None)` is called with the final depth. Returns
        False when kid was retired before.
        """
        with self._lock:
            kf = self._keyframes[kid]
            if kf.image is None:
                return False
            if kid in self._window:
                self._window.remove(kid)
            self._edges = {e for e in self._edges if kid not in e}
            depth = np.where(kf.valid.cpu().numpy(), kf.depth.cpu().numpy(), 0.0).astype(np.float32)
            normal = None if kf.normal is None else np.ascontiguousarray(kf.normal.permute(1, 2, 0).cpu().numpy(),
                                                                         dtype=np.float32)
            self._keyframes[kid] = dataclasses.replace(
                kf, image=None, depth=None, valid=None, prior=None, normal=None,
                small_depth=depth[::stride, ::stride].copy(), small_image=kf.image[::stride, ::stride].copy(),
                small_normal=None if normal is None else normal[::stride, ::stride].copy())
        if on_retire is not None:
            on_retire(kf.frame, depth, kf.pose_cw.clone(), kf.image, normal)
        return True
