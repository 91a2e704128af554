"""Readers of video datasets, behind one interface, and clips cut from them for training.

`open_sequence(path)` detects the layout and returns a `Sequence` (frames with optional depth,
poses and timestamps, plus intrinsics):

- 7-Scenes: `frame-NNNNNN.color.{png,jpg}`, `.depth.png` (uint16 mm), `.pose.txt` (4x4
  camera-to-world), `camera-intrinsics.txt` (3x3) in one folder (`seq-XX` folders of a scene);
- TUM RGB-D: `rgb.txt`, `depth.txt` (png, 1/5000 m), `groundtruth.txt` (timestamp tx ty tz qx qy qz
  qw, camera-to-world); frames are associated by nearest timestamp (within 0.02 s);
- ScanNet export: `color/N.jpg`, `depth/N.png` (mm), `pose/N.txt` (4x4 camera-to-world),
  `intrinsic/intrinsic_color.txt` (4x4); depth maps are resized to the colour images;
- a plain folder of images (sorted by name) or a video file (OpenCV), with intrinsics from a file
  (3x3 matrix or `fx fy cx cy`) or given explicitly; no ground truth.

Image folders, videos and TUM sequences may come without intrinsics when the caller allows it
(`require_intrinsics=False`, for uncalibrated SLAM); `Sequence.intrinsics` is None then.

`iter_frames(seq, indices, size)` streams the selected frames (a video is decoded in one pass and
never held in memory); `select_frames`, `parse_size` and `parse_intrinsics` turn command-line
choices into frame indices, an image size and intrinsics. A video's frame count is not known when
it is opened (containers only estimate it): `Sequence.num_frames` is None until a stream reaches the
video's end, so a run decodes it once; `len(seq)` counts it on demand (a decoding pass of its own).

`SequenceClips` cuts clips (keyframe + neighbours, `ClipConfig`) from a sequence, resized to the
training size with the intrinsics scaled to match, in the same dict format as `SyntheticClips`.

Bad data is an `InputError` naming the file (unreadable image, missing depth or pose file,
malformed intrinsics): a training run fails clearly on it rather than skipping samples silently.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from v2d.data.clips import ClipConfig, augment
from v2d.errors import InputError
from v2d.geometry.camera import resize_intrinsics
from v2d.geometry.lie import matrix_to_quat, quat_to_matrix

__all__ = ["Sequence", "SequenceClips", "open_sequence", "read_intrinsics", "read_depth_map", "read_pose_matrix",
           "IMAGE_SUFFIXES", "iter_frames", "select_frames", "parse_size", "parse_intrinsics"]

_log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


@dataclass
class Sequence:
    """A video with optional ground truth.

    Attributes (N frames):
        images: N image paths, or None for a video (`video` holds its path).
        depths: N depth-map paths (or None), with `depth_scale` metres per stored unit.
        poses_wc: (N, 4, 4) float64 camera-to-world matrices, or None.
        timestamps: (N,) float64 seconds (the frame index when the dataset has none), or None for a
            video whose frames are not counted yet (its timestamps are the frame indices).
        intrinsics: (4,) float64 fx, fy, cx, cy at the images' size, or None when unknown.
        layout: detected layout name.
        frame_count_estimate: a video container's frame count (CAP_PROP_FRAME_COUNT, often
            approximate), or None; for progress bars only.
    """

    images: list[Path] | None
    intrinsics: np.ndarray | None
    timestamps: np.ndarray | None
    layout: str
    depths: list[Path] | None = None
    depth_scale: float = 1e-3
    poses_wc: np.ndarray | None = None
    video: Path | None = None
    frame_count_estimate: int | None = None

    @property
    def num_frames(self) -> int | None:
        """The number of frames if known without decoding: None for a video not yet streamed to its end."""
        return None if self.timestamps is None else len(self.timestamps)

    def __len__(self) -> int:
        """The number of frames; a video's is counted on demand (a decoding pass, once)."""
        if self.timestamps is None:
            self.timestamps = np.arange(_count_video_frames(self.video), dtype=np.float64)
        return len(self.timestamps)

    def frame_timestamps(self, indices: Iterable[int]) -> np.ndarray:
        """Timestamps of the frames `indices` (a video's are the frame indices: no counting needed).

        Shapes: -> (len(indices),) float64
        """
        indices = np.asarray(list(indices), dtype=np.int64)
        if self.video is not None:
            return indices.astype(np.float64)
        return np.asarray(self.timestamps, dtype=np.float64)[indices]

    def image(self, k: int) -> np.ndarray:
        """Frame k as (H, W, 3) uint8 RGB. A video is decoded up to frame k on every call: use
        `iter_frames` for many frames."""
        if self.video is not None:
            for _, _, rgb in _stream_video(self, [k]):
                return rgb
            raise InputError(f"{self.video}: cannot read video frame {k}")
        return read_image(self.images[k])

    def depth(self, k: int) -> np.ndarray | None:
        """Depth of frame k as (H, W) float32 metres (0 = unknown), or None without depth."""
        if self.depths is None:
            return None
        return read_depth_map(self.depths[k], 1.0 / self.depth_scale)


PNG_NO_READING = 65535  # 7-Scenes marks pixels without a depth reading with the largest 16-bit value


def read_depth_map(path: str | Path, png_scale: float = 1000.0) -> np.ndarray:
    """A depth map as (H, W) float32 with 0 where unknown: `.npy` (real numbers, used as is) or a
    single-channel 16-bit PNG divided by `png_scale` (1000: millimetres; 5000: TUM), where 0 and
    65535 (7-Scenes' "no reading") are unknown. InputError for anything else.

    Shapes: -> (H, W) float32
    """
    import cv2

    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            d = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"{path}: not a readable .npy file ({exc.__class__.__name__})") from None
        if d.ndim != 2 or not (np.issubdtype(d.dtype, np.floating) or np.issubdtype(d.dtype, np.integer)):
            raise InputError(f"{path}: expected a 2-D real-valued depth map, got shape {d.shape} and dtype {d.dtype}")
        d = d.astype(np.float32)
    elif path.suffix.lower() == ".png":
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise InputError(f"{path}: cannot read depth map (not a readable PNG)")
        if raw.dtype != np.uint16 or raw.ndim != 2:
            raise InputError(f"{path}: cannot read depth map: expected a single-channel 16-bit PNG, got dtype "
                             f"{raw.dtype} and shape {raw.shape}")
        d = np.where(raw == PNG_NO_READING, 0, raw).astype(np.float32) / np.float32(png_scale)
    else:
        raise InputError(f"{path}: expected a .npy or 16-bit .png depth map")
    return np.where(np.isfinite(d) & (d > 0), d, 0.0).astype(np.float32)


def read_image(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _open_video(path: Path):  # -> cv2.VideoCapture
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise InputError(f"cannot read any frame from video {path}")
    return cap


def _frame_count_estimate(path: Path) -> int | None:
    """The container's frame count (no decoding; often approximate), or None when it gives none.
    InputError when OpenCV cannot open the video."""
    import cv2

    cap = _open_video(path)
    try:
        n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    finally:
        cap.release()
    return int(n) if n > 0 else None


def _count_video_frames(path: Path) -> int:
    """Exact frame count: containers' frame counts are estimates, so decode once (without keeping frames)."""
    cap = _open_video(path)
    try:
        if not cap.read()[0]:
            raise InputError(f"cannot read any frame from video {path}")
        n = 1
        while cap.grab():
            n += 1
    finally:
        cap.release()
    return n


def _stream_video(seq: Sequence, indices: Iterable[int]) -> Iterator[tuple[int, str, np.ndarray]]:
    """(k, name, rgb) for the wanted frames (increasing) of a video in one decoding pass.

    The stream ends with the video: normally when its length was not known (which it then records in
    `seq.timestamps`), with a warning when it was (the file changed since it was counted). InputError
    when the video has no frame at all.
    """
    import cv2

    path = seq.video
    cap = _open_video(path)
    try:
        pos = 0  # index of the frame the next grab() returns
        for k in indices:
            while pos <= k:
                if not cap.grab():
                    if pos == 0:
                        raise InputError(f"cannot read any frame from video {path}")
                    if seq.timestamps is None:
                        seq.timestamps = np.arange(pos, dtype=np.float64)
                    else:
                        _log.warning("%s: video ended after %d frames, before frame %d", path, pos, k)
                    return
                pos += 1
            ok, bgr = cap.retrieve()
            if not ok:
                raise InputError(f"{path}: cannot decode video frame {k}")
            yield k, f"{path}, video frame {k}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def _numbers(path: Path, count: int | None = None) -> np.ndarray:
    try:
        values = np.array([float(x) for x in path.read_text().split()], dtype=np.float64)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    except ValueError:
        raise InputError(f"{path}: expected numbers only") from None
    if count is not None and values.size != count:
        raise InputError(f"{path}: expected {count} numbers, got {values.size}")
    if not np.isfinite(values).all():
        raise InputError(f"{path}: NaN or Inf in the values")
    return values


def read_intrinsics(path: str | Path) -> np.ndarray:
    """fx, fy, cx, cy from a file holding a 3x3 (or 4x4) K matrix or the four numbers.

    Shapes: returns (4,) float64.
    """
    path = Path(path)
    v = _numbers(path)
    if v.size == 4:
        k = v
    elif v.size in (9, 16):
        K = v.reshape(3, 3) if v.size == 9 else v.reshape(4, 4)[:3, :3]
        if abs(K[0, 1]) > 1e-9 or abs(K[1, 0]) > 1e-9 or abs(K[2, 2] - 1) > 1e-9:
            raise InputError(f"{path}: expected a pinhole K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]], got {K.tolist()}")
        k = np.array([K[0, 0], K[1, 1], K[0, 2], K[1, 2]])
    else:
        raise InputError(f"{path}: expected 4 numbers (fx fy cx cy) or a 3x3 matrix, got {v.size} numbers")
    if k[0] <= 0 or k[1] <= 0:
        raise InputError(f"{path}: expected positive focal lengths, got fx={k[0]}, fy={k[1]}")
    return k


def read_pose_matrix(path: str | Path) -> np.ndarray:
    """A 4x4 rigid transform (16 numbers, row-major) from a text file, as 7-Scenes and ScanNet store
    poses; InputError unless the last row is 0 0 0 1 and the rotation is orthonormal with det +1.

    Shapes: returns (4, 4) float64.
    """
    path = Path(path)
    T = _numbers(path, 16).reshape(4, 4)
    if np.abs(T[3] - [0, 0, 0, 1]).max() > 1e-6:
        raise InputError(f"{path}: expected a 4x4 rigid transform with last row 0 0 0 1")
    R = T[:3, :3]
    if np.abs(R @ R.T - np.eye(3)).max() > 1e-3 or np.linalg.det(R) < 0:
        raise InputError(f"{path}: the rotation part is not a rotation (not orthonormal, or a reflection)")
    return T


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"missing {what}: {path}")
    return path


# ---------------------------------------------------------------------------------------------- layouts


def _open_7scenes(root: Path) -> Sequence:
    colors = sorted(p for p in root.glob("frame-*.color.*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not colors:
        raise InputError(f"{root}: no frame-NNNNNN.color images")
    stems = [p.name.split(".color")[0] for p in colors]
    depths = [_need(root / f"{s}.depth.png", "depth map") for s in stems]
    poses = np.stack([read_pose_matrix(_need(root / f"{s}.pose.txt", "pose file")) for s in stems])
    intr_file = root / "camera-intrinsics.txt"
    if not intr_file.exists():
        intr_file = root.parent / "camera-intrinsics.txt"
    intr = read_intrinsics(_need(intr_file, "intrinsics file camera-intrinsics.txt"))
    return Sequence(images=colors, depths=depths, depth_scale=1e-3, poses_wc=poses, intrinsics=intr,
                    timestamps=np.arange(len(colors), dtype=np.float64), layout="7scenes")


def _tum_list(path: Path) -> list[tuple[float, str]]:
    rows = []
    for line in _need(path, "TUM list").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            rows.append((float(parts[0]), " ".join(parts[1:])))
        except (ValueError, IndexError):
            raise InputError(f"{path}: malformed line {line!r}") from None
    return rows


def _associate(a: np.ndarray, b: np.ndarray, max_diff: float) -> np.ndarray:
    """Index into b of the nearest timestamp for each of a (-1 when farther than max_diff)."""
    idx = np.clip(np.searchsorted(b, a), 1, len(b) - 1)
    left, right = b[idx - 1], b[idx]
    best = np.where(np.abs(a - left) <= np.abs(a - right), idx - 1, idx)
    return np.where(np.abs(b[best] - a) <= max_diff, best, -1)


def _open_tum(root: Path, intrinsics: np.ndarray | None, require_intrinsics: bool) -> Sequence:
    rgb = _tum_list(root / "rgb.txt")
    depth = _tum_list(root / "depth.txt") if (root / "depth.txt").exists() else []
    gt = _tum_list(root / "groundtruth.txt") if (root / "groundtruth.txt").exists() else []
    if not rgb:
        raise InputError(f"{root / 'rgb.txt'}: no frames listed")
    t = np.array([r[0] for r in rgb])
    keep = np.ones(len(t), dtype=bool)
    depth_paths = None
    if depth:
        di = _associate(t, np.array([d[0] for d in depth]), 0.02)
        keep &= di >= 0
    poses = None
    if gt:
        gts = np.array([g[0] for g in gt])
        gi = _associate(t, gts, 0.02)
        keep &= gi >= 0
    if not keep.any():
        raise InputError(f"{root}: no rgb frame has depth/ground truth within 0.02 s")
    images = [_need(root / rgb[k][1], "image") for k in np.flatnonzero(keep)]
    if depth:
        depth_paths = [_need(root / depth[di[k]][1], "depth map") for k in np.flatnonzero(keep)]
    if gt:
        vals = []
        for k in np.flatnonzero(keep):
            try:
                vals.append([float(x) for x in gt[gi[k]][1].split()])
            except ValueError:
                raise InputError(f"{root / 'groundtruth.txt'}: malformed pose at t={gt[gi[k]][0]}") from None
        v = torch.tensor(vals, dtype=torch.float64)
        if v.shape[1] != 7:
            raise InputError(f"{root / 'groundtruth.txt'}: expected 'timestamp tx ty tz qx qy qz qw' lines")
        poses = np.tile(np.eye(4), (len(v), 1, 1))
        poses[:, :3, :3] = quat_to_matrix(v[:, 3:] / v[:, 3:].norm(dim=-1, keepdim=True)).numpy()
        poses[:, :3, 3] = v[:, :3].numpy()
    if intrinsics is None:
        f = root / "intrinsics.txt"
        intrinsics = read_intrinsics(f) if f.exists() else None
    if intrinsics is None and require_intrinsics:
        raise InputError(f"{root}: TUM sequences carry no intrinsics; put fx fy cx cy in {root / 'intrinsics.txt'}")
    return Sequence(images=images, depths=depth_paths, depth_scale=1 / 5000, poses_wc=poses, intrinsics=intrinsics,
                    timestamps=t[keep], layout="tum")


def _open_scannet(root: Path) -> Sequence:
    def index(p: Path) -> int:
        return int(re.sub(r"\D", "", p.stem) or -1)

    colors = sorted((p for p in (root / "color").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=index)
    if not colors:
        raise InputError(f"{root / 'color'}: no images")
    depths = [_need(root / "depth" / f"{p.stem}.png", "depth map") for p in colors] if (root / "depth").is_dir() \
        else None
    poses = None
    if (root / "pose").is_dir():
        poses = np.stack([read_pose_matrix(_need(root / "pose" / f"{p.stem}.txt", "pose file")) for p in colors])
        if not np.isfinite(poses).all():
            raise InputError(f"{root / 'pose'}: invalid (inf) poses")
    intr = read_intrinsics(_need(root / "intrinsic" / "intrinsic_color.txt", "intrinsics file"))
    return Sequence(images=colors, depths=depths, depth_scale=1e-3, poses_wc=poses, intrinsics=intr,
                    timestamps=np.array([index(p) for p in colors], dtype=np.float64), layout="scannet")


def open_sequence(path: str | Path, intrinsics: np.ndarray | str | Path | None = None, *,
                  require_intrinsics: bool = True) -> Sequence:
    """Open a dataset folder, an image folder or a video file (layout auto-detected).

    `intrinsics` (fx, fy, cx, cy, or a file) overrides the dataset's; image folders, videos and TUM
    sequences need it (or an `intrinsics.txt` next to the images) unless `require_intrinsics` is
    False, in which case `seq.intrinsics` is None without them. A video is only opened here, not
    decoded: its frame count is unknown (`Sequence.num_frames` is None) until it is streamed to its
    end or `len(seq)` counts it; its timestamps are frame indices.
    """
    path = Path(path)
    if isinstance(intrinsics, str | Path):
        intrinsics = read_intrinsics(intrinsics)
    elif intrinsics is not None:
        intrinsics = np.asarray(intrinsics, dtype=np.float64)
        if intrinsics.shape != (4,) or not np.isfinite(intrinsics).all() or min(intrinsics[:2]) <= 0:
            raise InputError(f"intrinsics: expected 4 finite numbers fx fy cx cy with fx, fy > 0, got {intrinsics}")
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_file():
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise InputError(f"{path}: not a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder")
        seq = Sequence(images=None, video=path, intrinsics=None, layout="video", timestamps=None,
                       frame_count_estimate=_frame_count_estimate(path))
        return _with_intrinsics(seq, intrinsics, path.with_name("intrinsics.txt"), require_intrinsics)
    if any(path.glob("frame-*.color.*")):
        seq = _open_7scenes(path)
    elif (path / "rgb.txt").exists():
        return _open_tum(path, intrinsics, require_intrinsics)
    elif (path / "color").is_dir() and (path / "intrinsic").is_dir():
        seq = _open_scannet(path)
    else:
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise InputError(f"{path}: no images, video or known dataset layout found")
        seq = Sequence(images=images, intrinsics=None, timestamps=np.arange(len(images), dtype=np.float64),
                       layout="images")
        return _with_intrinsics(seq, intrinsics, path / "intrinsics.txt", require_intrinsics)
    if intrinsics is not None:
        seq.intrinsics = intrinsics
    return seq


def _with_intrinsics(seq: Sequence, intrinsics: np.ndarray | None, default_file: Path, required: bool) -> Sequence:
    if intrinsics is None and (required or default_file.exists()):
        if not default_file.exists():
            raise InputError(f"{seq.video or default_file.parent}: no intrinsics given and no {default_file}")
        intrinsics = read_intrinsics(default_file)
    seq.intrinsics = intrinsics
    return seq


# ---------------------------------------------------------------------------------------------- streaming


def iter_frames(seq: Sequence, indices: Iterable[int], size: tuple[int, int] | None = None
                ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (k, rgb) for each frame index k, reading one frame at a time.

    `indices` must be strictly increasing, from 0, and below `seq.num_frames` when that is known. A
    range is not expanded, so a video of unknown length is read with an open-ended range
    (`select_frames(None, ...)`): the stream ends with the video, whose length is then known. A video
    is decoded in a single pass (skipped frames are grabbed, not converted) and memory does not grow
    with its length; if a video of known length ends before the last wanted frame, iteration stops
    there (a warning is logged; count what you get).
    Every frame must have the size of the first one yielded (checked before resizing); `size` =
    (height, width) resizes with area interpolation. InputError for unreadable or mixed-size frames.

    Shapes: rgb (H, W, 3) uint8, or (height, width, 3) with `size`.
    """
    import cv2

    if not isinstance(indices, range):
        indices = [int(k) for k in indices]
    n = seq.num_frames
    increasing = indices.step > 0 if isinstance(indices, range) else \
        all(b > a for a, b in zip(indices, indices[1:], strict=False))
    if not increasing or (len(indices) and (indices[0] < 0 or (n is not None and indices[-1] >= n))):
        where = "be >= 0" if n is None else f"lie in [0, {n})"
        raise InputError(f"frame indices must increase and {where}, got {_short(indices)}")
    if seq.video is not None:
        frames = _stream_video(seq, indices)
    else:
        frames = ((k, str(seq.images[k]), read_image(seq.images[k])) for k in indices)
    hw0 = None
    for k, name, rgb in frames:
        hw = rgb.shape[:2]
        hw0 = hw0 or hw
        if hw != hw0:
            raise InputError(f"{name}: image size {hw[0]}x{hw[1]} differs from the first frame's "
                             f"{hw0[0]}x{hw0[1]} (mixed sizes)")
        if size is not None and hw != tuple(size):
            rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        yield k, rgb


def _short(values: list[int] | range) -> str:
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, ...] ({len(values)} values)"


def select_frames(num_frames: int | None, stride: int = 1, max_frames: int | None = None, start: int = 0
                  ) -> range:
    """Frame indices start, start + stride, ... below num_frames, at most max_frames of them.

    `num_frames` None (a video's length, unknown before it is streamed) leaves the range open-ended
    (up to sys.maxsize) unless max_frames bounds it: `iter_frames` then stops where the video ends.
    """
    if stride < 1:
        raise InputError(f"stride must be >= 1, got {stride}")
    if start < 0:
        raise InputError(f"start frame must be >= 0, got {start}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max_frames must be >= 1 (or None for all), got {max_frames}")
    return range(start, sys.maxsize if num_frames is None else num_frames, stride)[:max_frames]


def parse_size(text: str) -> tuple[int, int]:
    """(height, width) from "HxW", e.g. "240x320"; both multiples of 4 and >= 32 (the networks downsample by 4)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    hw = (int(m[1]), int(m[2])) if m else None
    if hw is None or min(hw) < 32 or hw[0] % 4 or hw[1] % 4:
        raise InputError(f"size: expected HEIGHTxWIDTH with both multiples of 4 and >= 32 (e.g. 240x320), "
                         f"got {text!r}")
    return hw


def parse_intrinsics(text: str) -> np.ndarray:
    """fx, fy, cx, cy from "fx,fy,cx,cy" or from a file (see `read_intrinsics`).

    Shapes: returns (4,) float64.
    """
    if Path(text).is_file():
        return read_intrinsics(text)
    try:
        k = np.array([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        k = None
    if k is None or k.shape != (4,) or not np.isfinite(k).all() or min(k[:2]) <= 0:
        raise InputError(f"intrinsics: expected an intrinsics file or fx,fy,cx,cy (4 finite numbers, fx and fy > 0), "
                         f"got {text!r}")
    return k


# ---------------------------------------------------------------------------------------------- clips


class SequenceClips(torch.utils.data.Dataset):
    """Clips of a sequence with ground truth, resized to (height, width) (same dicts as SyntheticClips).

    Clip k starts at frame k; its frames are k, k + stride, ... (`cfg.frames` of them), the
    keyframe moved to index 0 (`cfg.keyframe`). Images are resized (area) to the training size and
    the intrinsics scaled with them; depth maps are resized with nearest neighbours (no mixing of
    valid and invalid pixels). Poses become world->camera in lietorch layout. `augment` applies the
    clip config's flips and colour jitter, seeded by (seed, k).
    """

    def __init__(self, seq: Sequence, cfg: ClipConfig, height: int, width: int, seed: int = 0) -> None:
        if seq.depths is None or seq.poses_wc is None:
            raise InputError(f"{seq.layout} sequence has no depth or poses: training needs both")
        if seq.intrinsics is None:
            raise InputError(f"{seq.layout} sequence has no intrinsics: training needs them")
        span = (cfg.frames - 1) * cfg.stride + 1
        if len(seq) < span:
            raise InputError(f"sequence has {len(seq)} frames; a clip of {cfg.frames} at stride {cfg.stride} "
                             f"needs {span}")
        self.seq, self.cfg, self.height, self.width, self.span = seq, cfg, height, width, span
        self.seed = seed

    def __len__(self) -> int:
        return len(self.seq) - self.span + 1

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        import cv2

        cfg = self.cfg
        idx = [k + i * cfg.stride for i in range(cfg.frames)]
        if cfg.keyframe == "middle":
            mid = idx[len(idx) // 2]
            idx = [mid] + [i for i in idx if i != mid]
        imgs, deps = [], []
        hw0 = None
        for i in idx:
            img = self.seq.image(i)
            hw0 = hw0 or img.shape[:2]
            if img.shape[:2] != hw0:
                raise InputError(f"frame {self.seq.images[i]}: size {img.shape[:2]} differs from {hw0}")
            imgs.append(cv2.resize(img, (self.width, self.height), interpolation=cv2.INTER_AREA))
            d = self.seq.depth(i)
            deps.append(cv2.resize(d, (self.width, self.height), interpolation=cv2.INTER_NEAREST))
        T_cw = np.linalg.inv(self.seq.poses_wc[idx])
        R = torch.from_numpy(T_cw[:, :3, :3])
        poses = torch.cat([torch.from_numpy(T_cw[:, :3, 3]), matrix_to_quat(R)], dim=-1)
        intr = resize_intrinsics(torch.from_numpy(self.seq.intrinsics), hw0, (self.height, self.width))
        clip = {
            "images": torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0,
            "depths": torch.from_numpy(np.stack(deps)).float(),
            "poses_cw": poses.float(),
            "intrinsics": intr.float(),
        }
        return augment(clip, cfg, np.random.default_rng([self.seed, int(k)]))
