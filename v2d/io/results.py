"""Reading a `v2d run` / `v2d demo` output directory back (for evaluation and visualisation).

Layout (written by slam.run):
    trajectory.txt        TUM, camera->world, one line per processed frame
    depth/NAME.npy|.png   keyframe depth (float32 metres-or-scene-units | 16-bit mm), NAME = input index
    images/NAME.jpg       keyframe colour at the network size
    cloud.ply             fused point cloud
    summary.json          counts, keyframe_frames (trajectory rows), keyframe_files (NAMEs), intrinsics
                          at the network size, image_size [H, W]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from v2d.errors import InputError

__all__ = ["RunOutputs", "keyframe_name", "load_run", "read_normal_png"]


def keyframe_name(index: int) -> str:
    """File stem of a keyframe's outputs: its input index, zero-padded to 6 digits."""
    return f"{int(index):06d}"


@dataclass
class RunOutputs:
    """A run's outputs. Shapes: timestamps (N,); poses_wc (N, 7) [t, q_xyzw] camera->world;
    keyframe_rows (K,) rows of the trajectory; intrinsics (4,) fx, fy, cx, cy at image_size (H, W)."""

    root: Path
    timestamps: np.ndarray
    poses_wc: np.ndarray
    keyframe_rows: list[int]
    keyframe_files: list[str]
    intrinsics: np.ndarray
    image_size: tuple[int, int]
    summary: dict

    @property
    def cloud_path(self) -> Path:
        return self.root / "cloud.ply"

    @property
    def keyframe_poses_wc(self) -> np.ndarray:
        """(K, 7) camera->world poses of the keyframes."""
        return self.poses_wc[self.keyframe_rows]

    def depth(self, k: int) -> np.ndarray:
        """Keyframe k's depth (H, W) float32 (0 = unknown), from the .npy (or the 16-bit PNG)."""
        from v2d.io.datasets import read_depth_map

        stem = self.root / "depth" / self.keyframe_files[k]
        npy, png = stem.with_suffix(".npy"), stem.with_suffix(".png")
        if not npy.is_file() and not png.is_file():
            raise InputError(f"{stem}.npy: keyframe {k}'s depth is missing")
        d = read_depth_map(npy if npy.is_file() else png, 1000.0)  # v2d writes millimetres to the PNG
        if d.shape != self.image_size:
            raise InputError(f"{stem}: depth of shape {d.shape}, but the run's image size is {self.image_size}")
        return d

    def normal(self, k: int) -> np.ndarray | None:
        """Keyframe k's normals (H, W, 3) float32 (camera frame, 0 = unknown) from normal/NAME.png,
        or None when the run wrote none (`depth.normals` off)."""
        path = self.root / "normal" / f"{self.keyframe_files[k]}.png"
        if not path.is_file():
            return None
        n = read_normal_png(path)
        if n.shape[:2] != self.image_size:
            raise InputError(f"{path}: normals of shape {n.shape[:2]}, but the run's image size is {self.image_size}")
        return n

    def image(self, k: int) -> np.ndarray | None:
        """Keyframe k's colour image (H, W, 3) uint8 RGB, or None when the run did not write it."""
        import cv2

        path = self.root / "images" / f"{self.keyframe_files[k]}.jpg"
        if not path.is_file():
            return None
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None or bgr.shape[:2] != self.image_size:
            raise InputError(f"{path}: unreadable, or not of the run's image size {self.image_size}")
        return np.ascontiguousarray(bgr[..., ::-1])


def load_run(path: str | Path) -> RunOutputs:
    """Open a run's output directory; InputError when it is missing, empty or inconsistent."""
    from v2d.io.trajectory import read_trajectory

    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory (expected the output directory of `v2d run`)")
    summary_path = root / "summary.json"
    if not summary_path.is_file():
        raise InputError(f"{root}: no summary.json; not an output directory of `v2d run` (or the run did not finish)")
    try:
        summary = json.loads(summary_path.read_text())
        H, W = (int(v) for v in summary["image_size"])
        intr = summary["intrinsics"]
        intrinsics = np.array([intr["fx"], intr["fy"], intr["cx"], intr["cy"]], dtype=np.float64)
        rows = [int(r) for r in summary["keyframe_frames"]]
        files = summary.get("keyframe_files")
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{summary_path}: malformed ({exc.__class__.__name__}: {exc})") from None
    if files is None:  # runs before keyframe_files existed: the depth files in order
        files = sorted(p.stem for p in (root / "depth").glob("*.npy"))
    if len(files) != len(rows):
        raise InputError(f"{root}: {len(rows)} keyframes in summary.json but {len(files)} depth maps")
    if not np.isfinite(intrinsics).all() or (intrinsics[:2] <= 0).any():
        raise InputError(f"{summary_path}: bad intrinsics {intrinsics.tolist()}")
    t, p = read_trajectory(root / "trajectory.txt", "tum")
    if rows and (min(rows) < 0 or max(rows) >= len(t)):
        raise InputError(f"{root}: keyframe rows {min(rows)}..{max(rows)} outside the {len(t)}-pose trajectory")
    return RunOutputs(root=root, timestamps=t, poses_wc=p, keyframe_rows=rows, keyframe_files=[str(f) for f in files],
                      intrinsics=intrinsics, image_size=(H, W), summary=summary)


def read_normal_png(path: str | Path) -> np.ndarray:
    """Normals written by `v2d.io.writers.write_normal_png`: (H, W, 3) float32 unit vectors, 0 where
    invalid. InputError for an unreadable file or one that is not a 16-bit 3-channel PNG."""
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.dtype != np.uint16 or raw.ndim != 3 or raw.shape[2] != 3:
        raise InputError(f"{path}: not a normal map (a 16-bit RGB PNG)")
    rgb = raw[..., ::-1]
    valid = rgb.any(axis=-1)
    n = rgb.astype(np.float32) / 65535 * 2 - 1
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6)
    return np.where(valid[..., None], n, 0).astype(np.float32)
