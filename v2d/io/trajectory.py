"""Reading camera trajectories in the formats the field uses.

Formats (camera->world poses; `read_trajectory` detects the format when `fmt="auto"`):
- `tum`: text, one line `timestamp tx ty tz qx qy qz qw` per pose (TUM RGB-D, v2d's trajectory.txt).
- `kitti`: text, one line per pose with the 12 numbers of the 3x4 matrix [R | t], row-major; no
  timestamps, so the line index is used (`time_unit` "index").
- `euroc`: the EuRoC ground-truth CSV (`#timestamp [ns], p_RS_R_x, ..., q_RS_w, ...`); timestamps in
  seconds.
- `7scenes`: a folder of `frame-NNNNNN.pose.txt` files, each a 4x4 camera->world matrix; a pose's
  position in the folder (sorted by frame number) is its timestamp, as `v2d run` numbers the frames
  of a 7-Scenes sequence (so a folder starting at frame-000100 starts at 0 in both).
- a `v2d run` output directory: its `trajectory.txt`.

The TUM, KITTI and EuRoC parsers are evo's (`evo.tools.file_interface`), so files evo reads, we read.
On top, every pose is checked: quaternions within QUAT_NORM_TOL of unit length (then normalised;
published ground truth is written with 4 decimals), rotation matrices orthonormal, no NaN; poses
are put in time order and a repeated timestamp keeps its first pose, with a warning.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from v2d.errors import InputError

__all__ = ["FORMATS", "TIME_UNITS", "read_trajectory", "detect_format"]

_log = logging.getLogger(__name__)

FORMATS = ("auto", "tum", "kitti", "euroc", "7scenes")
TIME_UNITS = {"tum": "s", "euroc": "s", "kitti": "index", "7scenes": "index"}
QUAT_NORM_TOL = 1e-2  # | |q| - 1 | allowed before normalising
ROTATION_TOL = 1e-3  # max |R R^T - I| of a rotation matrix
_SEVEN_SCENES = re.compile(r"frame-(\d+)\.pose\.txt$")


def detect_format(path: str | Path) -> str:
    """The format of `path` (one of FORMATS without "auto"), judged from its layout and first data line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "trajectory.txt").is_file():
            return "tum"
        if any(_SEVEN_SCENES.search(p.name) for p in path.iterdir()):
            return "7scenes"
        raise InputError(f"{path}: a folder with neither trajectory.txt (a v2d output) nor frame-*.pose.txt "
                         "(7-Scenes) in it")
    try:
        with path.open("r", encoding="utf-8") as f:
            lines = [ln.strip() for _, ln in zip(range(200), f, strict=False)]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as a text trajectory ({exc.__class__.__name__})") from None
    data = [ln for ln in lines if ln and not ln.startswith("#")]
    if not data:
        raise InputError(f"{path}: no poses in the file")
    first = data[0]
    if "," in first:
        return "euroc"
    cols = len(first.split())
    if cols == 8:
        return "tum"
    if cols == 12:
        return "kitti"
    raise InputError(f"{path}: cannot tell the trajectory format: a line has {cols} numbers (TUM has 8, KITTI 12, "
                     "EuRoC is comma-separated); give --format")


def _from_evo(traj) -> np.ndarray:  # evo PosePath3D -> (N, 7) [t, qx, qy, qz, qw]
    q_wxyz = np.asarray(traj.orientations_quat_wxyz, dtype=np.float64)
    return np.concatenate([np.asarray(traj.positions_xyz, dtype=np.float64), q_wxyz[:, [1, 2, 3, 0]]], axis=1)


def _read_7scenes(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial.transform import Rotation

    from v2d.io.datasets import read_pose_matrix

    files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _SEVEN_SCENES.search(p.name)))
    T = np.stack([read_pose_matrix(p) for _, p in files]) if files else np.zeros((0, 4, 4))
    poses = np.concatenate([T[:, :3, 3], Rotation.from_matrix(T[:, :3, :3]).as_quat()], axis=1) if files \
        else np.zeros((0, 7))
    return np.arange(len(files), dtype=np.float64), poses


def _check_rotations(path: Path, traj) -> None:  # evo PosePath3D read from rotation matrices (KITTI)
    R = np.asarray(traj.poses_se3)[:, :3, :3]
    err = np.abs(R @ np.swapaxes(R, 1, 2) - np.eye(3)).max(axis=(1, 2))
    bad = np.flatnonzero((err > ROTATION_TOL) | (np.linalg.det(R) < 0))
    if bad.size:
        raise InputError(f"{path}: pose {bad[0]} (line {bad[0] + 1}) has a rotation part that is not a rotation "
                         f"(|R R^T - I| = {err[bad[0]]:.3g}, or a reflection)")


def _tidy(path: Path, t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit quaternions (refusing ones far from unit length), time order, one pose per timestamp."""
    norm = np.linalg.norm(p[:, 3:], axis=1)
    bad = np.flatnonzero(np.abs(norm - 1) > QUAT_NORM_TOL)
    if bad.size:
        raise InputError(f"{path}: pose {bad[0]} (t = {t[bad[0]]:.6f}) has a quaternion of length {norm[bad[0]]:.4g}; "
                         f"expected unit length (within {QUAT_NORM_TOL})")
    p = np.concatenate([p[:, :3], p[:, 3:] / norm[:, None]], axis=1)
    order = np.argsort(t, kind="stable")
    t, p = t[order], p[order]
    keep = np.concatenate([[True], np.diff(t) > 0])
    if not keep.all():
        _log.warning("%s: %d repeated timestamp(s); keeping the first pose of each", path, int((~keep).sum()))
    return t[keep], p[keep]


def read_trajectory(path: str | Path, fmt: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Read a camera->world trajectory.

    Returns timestamps (N,) float64, increasing (seconds; the pose index for KITTI and 7-Scenes, see
    TIME_UNITS) and poses_wc (N, 7) float64 [tx, ty, tz, qx, qy, qz, qw] (lietorch layout, TUM order)
    with unit quaternions. Raises InputError for a missing, unreadable or malformed file, invalid
    rotations, or no poses.
    """
    from evo.tools import file_interface

    path = Path(path)
    if fmt not in FORMATS:
        raise InputError(f"trajectory format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        fmt = detect_format(path)
    if path.is_dir() and fmt == "tum":
        path = path / "trajectory.txt"
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    try:
        if fmt == "7scenes":
            if not path.is_dir():
                raise InputError(f"{path}: a 7-Scenes trajectory is a folder of frame-*.pose.txt files")
            t, p = _read_7scenes(path)
        elif fmt == "tum":
            traj = file_interface.read_tum_trajectory_file(str(path))
            t, p = np.asarray(traj.timestamps, dtype=np.float64), _from_evo(traj)
        elif fmt == "euroc":
            traj = file_interface.read_euroc_csv_trajectory(str(path))
            t, p = np.asarray(traj.timestamps, dtype=np.float64), _from_evo(traj)
        else:
            traj = file_interface.read_kitti_poses_file(str(path))
            _check_rotations(path, traj)
            p = _from_evo(traj)
            t = np.arange(len(p), dtype=np.float64)
    except InputError:
        raise
    except (file_interface.FileInterfaceException, ValueError, IndexError, OSError, UnicodeDecodeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise InputError(f"{path}: not a valid {fmt} trajectory ({detail})") from None
    if len(p) == 0:
        raise InputError(f"{path}: no poses in the file")
    if not np.isfinite(p).all() or not np.isfinite(t).all():
        raise InputError(f"{path}: NaN or Inf in the trajectory")
    return _tidy(path, t, p)
