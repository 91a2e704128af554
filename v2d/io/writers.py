"""Atomic writers for v2d's output files.

Every file is written to a temporary file in the same directory and moved into place with
`os.replace`, so a crash or a full disk never leaves a half-written file under the final name.
`staged_output` does the same for a whole output directory: a run writes into a staging
directory that replaces the outputs only when the run succeeds; staging directories left by killed
runs into the same output are removed by the next one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from v2d.errors import InputError, ShapeError

__all__ = ["atomic_write", "write_bytes", "write_text", "write_json", "write_npy", "write_depth_png",
           "write_normal_png", "write_image_png", "write_image_jpg", "write_tum", "ensure_dir", "staged_output",
           "check_output_path", "atomic_write_named", "append_csv", "truncate_csv"]

_log = logging.getLogger(__name__)


def ensure_dir(path: str | Path) -> Path:
    """Create `path` (and parents) and check it is a writable directory; InputError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise InputError(f"output directory {path} is not writable")
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_output_path(path: str | Path, suffix: str | None, option: str) -> Path:
    """An output file path (ending in `suffix` unless it is None) whose directory exists and is
    writable; InputError, naming `option`, otherwise."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise InputError(f"{option} {path}: expected a file name ending in {suffix}")
    if path.is_dir():
        raise InputError(f"{option} {path}: is a directory")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{option} {path}: {parent} is not a directory")
    if not parent.is_dir():
        raise InputError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: directory {parent} is not writable")
    return path


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call `write(file_object)` on a temporary file next to `path`, then rename it to `path`."""

    def by_name(name: str) -> None:
        with open(name, mode) as f:
            write(f)

    return atomic_write_named(path, by_name, suffix=".tmp")


def atomic_write_named(path: str | Path, write: Callable[[str], None], suffix: str | None = None,
                       what: str = "") -> Path:
    """`atomic_write` for writers that take a file name rather than a file object (Open3D, which also
    picks the format from the name's suffix): `write(name)` fills a temporary file next to `path`
    whose name ends in `suffix` (default: path's), which is then renamed to `path`. An OSError
    from any step becomes InputError("cannot write {what}{path}: ...")."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix if suffix is None
                                   else suffix)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {what}{path}: {exc.strerror or exc}") from None
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def write_json(path: str | Path, obj: Any) -> Path:
    """JSON with sorted keys and indentation; numpy scalars/arrays are converted, and NaN/Inf become
    null (strict JSON has no NaN; e.g. a metric with no valid pixel)."""

    def clean(o: Any) -> Any:
        if isinstance(o, float | np.floating):
            return float(o) if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        if isinstance(o, np.ndarray):
            return clean(o.tolist())
        return o

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    text = json.dumps(clean(obj), indent=2, sort_keys=True, default=default, allow_nan=False)
    return write_text(path, text + "\n")


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, array))


def _encode_png(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise InputError(f"cannot encode an image of shape {image.shape} and dtype {image.dtype} as PNG")
    return buf.tobytes()


def write_depth_png(path: str | Path, depth: np.ndarray, scale: float = 1000.0) -> Path:
    """Depth (H, W) in scene units as 16-bit PNG of depth*scale (millimetres for metres); 0 = invalid.

    Values that do not fit 16 bits (or are not finite/positive) are written as 0.
    """
    d = np.asarray(depth, dtype=np.float64) * scale
    ok = np.isfinite(d) & (d > 0) & (d < 65535.5)
    out = np.where(ok, np.round(d), 0).astype(np.uint16)
    return write_bytes(path, _encode_png(out))


def write_normal_png(path: str | Path, normals: np.ndarray) -> Path:
    """Unit normals (H, W, 3) (x, y, z in the camera frame) as a 16-bit RGB PNG of (n + 1) / 2 * 65535,
    the usual normal-map colours (a wall facing the camera is (0.5, 0.5, 0));
    pixels whose normal is not finite or not unit length (e.g. 0) are written as 0 (invalid).
    `v2d.io.results.read_normal_png` reads it back."""
    n = np.asarray(normals, dtype=np.float64)
    if n.ndim != 3 or n.shape[2] != 3:
        raise ShapeError(f"write_normal_png: expected normals (H, W, 3), got {n.shape}")
    ok = np.isfinite(n).all(-1) & (np.abs(np.linalg.norm(np.nan_to_num(n), axis=-1) - 1) < 1e-2)
    out = np.where(ok[..., None], np.round((np.clip(n, -1, 1) + 1) / 2 * 65535), 0).astype(np.uint16)
    return write_bytes(path, _encode_png(out[..., ::-1]))


def write_image_png(path: str | Path, rgb: np.ndarray) -> Path:
    """RGB uint8 image (H, W, 3) as PNG."""
    rgb = np.ascontiguousarray(rgb)
    return write_bytes(path, _encode_png(rgb[..., ::-1] if rgb.ndim == 3 else rgb))


def write_image_jpg(path: str | Path, rgb: np.ndarray, quality: int = 95) -> Path:
    """RGB uint8 image (H, W, 3) as JPEG."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise InputError(f"cannot encode an image of shape {rgb.shape} and dtype {rgb.dtype} as JPEG")
    return write_bytes(path, buf.tobytes())


def write_tum(path: str | Path, timestamps: np.ndarray, poses_wc: np.ndarray) -> Path:
    """TUM trajectory: one line `timestamp tx ty tz qx qy qz qw` per pose (camera->world).

    Shapes: timestamps (N,), poses_wc (N, 7) in lietorch layout [tx, ty, tz, qx, qy, qz, qw]
    (the same order TUM files use).
    """
    timestamps = np.asarray(timestamps, dtype=np.float64)
    poses_wc = np.asarray(poses_wc, dtype=np.float64)
    if poses_wc.ndim != 2 or poses_wc.shape[1] != 7 or timestamps.shape != (poses_wc.shape[0],):
        raise InputError(f"write_tum: expected timestamps (N,) and poses (N, 7), got {timestamps.shape} "
                         f"and {poses_wc.shape}")
    lines = [" ".join([f"{t:.6f}"] + [f"{v:.9f}" for v in p]) for t, p in zip(timestamps, poses_wc, strict=True)]
    return write_text(path, "# timestamp tx ty tz qx qy qz qw\n" + "\n".join(lines) + "\n")


def append_csv(path: str | Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    """Append rows to a CSV log (header `keys` when the file is new; other entries ignored, floats
    with 6 significant digits). A log, not an output: lines are appended as training goes."""
    if not rows:
        return
    path = Path(path)
    new = not path.exists()
    if not new:  # a log from another version keeps its own columns
        with path.open(newline="") as f:
            keys = next(csv.reader(f), None) or keys
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()})


def truncate_csv(path: str | Path, step: int) -> None:
    """Drop the rows of a CSV log whose first column (a step) is after `step` (a resumed run
    computes them again), atomically."""
    path = Path(path)
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        write_text(path, "".join(lines[:1] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) <= step]))


@contextlib.contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """Context manager: write a run's outputs into the yielded staging directory; they reach out_dir on success.

    Checks first that out_dir (or its nearest existing parent) is a writable directory (InputError
    otherwise), so enter it before any heavy work. The stage is a hidden directory
    `.NAME.partial-HOST-BOOT-PID-START-XXXXXXXX` next to out_dir (inside out_dir when that already
    exists but its parent is not writable or is on another filesystem): HOST names the machine and
    PID namespace, BOOT the boot, PID and START (clock ticks after boot) the process that owns it.
    On success, a new out_dir is the renamed stage; into an existing out_dir each top-level entry is
    moved, a directory (e.g. `depth/`) replacing the old one as a whole so old and new outputs never
    mix; other files in out_dir are kept. On any exception (also KeyboardInterrupt) the stage and the
    parents created for it are removed, out_dir is untouched, and the exception propagates.

    A process killed outright (SIGKILL, power loss) cannot remove its stage; the next staged_output
    into the same out_dir does, logging each at INFO: a directory of exactly that name pattern for
    this NAME whose owner is gone (no process PID started at START on this machine, or the machine
    has rebooted since). Stages of live runs, of other machines or PID namespaces and anything else
    are left alone; without /proc (not Linux) nothing is removed.
    """
    out_dir = Path(out_dir)
    _check_writable(out_dir)
    _remove_stale_stages(out_dir)
    missing = [p for p in out_dir.parents if not p.exists()]  # deepest first
    stage = None

    def discard() -> None:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for p in missing:
            with contextlib.suppress(OSError):
                p.rmdir()

    try:
        for p in reversed(missing):
            p.mkdir(exist_ok=True)
        host, boot, start = _identity()
        stage = Path(tempfile.mkdtemp(dir=_stage_parent(out_dir),
                                      prefix=f".{out_dir.name}.partial-{host}-{boot}-{os.getpid()}-{start}-"))
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp creates 0700; a new out_dir gets the usual permissions
    except OSError as exc:
        discard()
        raise InputError(f"cannot create output directory {out_dir}: {exc.strerror or exc}") from None
    try:
        yield stage
        _commit(stage, out_dir)
    except BaseException:
        discard()
        raise


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _process(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of a process, from /proc; None when there is none."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": the command name may hold spaces
    return fields[0], int(fields[19])


def _identity() -> tuple[str, str, int]:
    """This process's (host, boot, start) as written into its stage names: 8 hex digits for the machine
    and PID namespace (PIDs compare only within one), 8 for the boot, and its start time (0 without /proc)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    machine = f"{_read('/etc/machine-id')}|{socket.gethostname()}|{pid_ns}"
    boot = (_read("/proc/sys/kernel/random/boot_id") or "0" * 8).replace("-", "")[:8]
    me = _process(os.getpid())
    return hashlib.sha1(machine.encode()).hexdigest()[:8], boot, me[1] if me else 0


def _stale_reason(host: str, boot: str, pid: int, start: int, me: tuple[str, str, int]) -> str | None:
    """Why the process that named a stage (host, boot, pid, start) is gone, or None when it may be alive;
    `me` is `_identity()`."""
    if host != me[0] or me[2] == 0:
        return None  # another machine or PID namespace, or no /proc: no way to tell
    if boot != me[1]:
        return "the machine rebooted since"
    owner = _process(pid)
    if owner is None or owner[1] != start:
        return f"process {pid} is gone"
    if owner[0] in ("Z", "X"):
        return f"process {pid} is dead (a zombie)"
    return None


def _remove_stale_stages(out_dir: Path) -> None:
    """Remove the stages of out_dir whose owning process is gone (see `staged_output`), logging each."""
    fields = r"([0-9a-f]{8})-([0-9a-f]{8})-(\d+)-(\d+)-[a-z0-9_]{8}"  # host, boot, pid, start, mkdtemp's
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.partial-{fields}")
    me = _identity()
    for where in dict.fromkeys((out_dir.parent, out_dir)):  # beside out_dir, or inside it (see _stage_parent)
        try:
            entries = list(os.scandir(where))
        except OSError:
            continue
        for entry in entries:
            m = pattern.fullmatch(entry.name)
            if m is None or not entry.is_dir(follow_symlinks=False):
                continue
            reason = _stale_reason(m[1], m[2], int(m[3]), int(m[4]), me)
            if reason is None:
                continue
            try:
                shutil.rmtree(entry.path)
            except FileNotFoundError:
                continue  # another run removed it first
            except OSError as exc:
                _log.warning("cannot remove the stale staging directory %s: %s", entry.path, exc.strerror or exc)
                continue
            _log.info("removed the stale staging directory %s of a killed run (%s)", entry.path, reason)


def _check_writable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output directory {out_dir} is not a directory")
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"output directory {out_dir} is not a directory ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"output directory {out_dir} is not writable")


def _stage_parent(out_dir: Path) -> Path:
    """Where the stage goes: beside out_dir, so that committing is a rename on one filesystem."""
    parent = out_dir.parent
    if out_dir.is_dir() and (not os.access(parent, os.W_OK | os.X_OK) or parent.stat().st_dev != out_dir.stat().st_dev):
        return out_dir  # e.g. out_dir is a home directory or a mount point
    return parent


def _commit(stage: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        try:
            os.rename(stage, out_dir)
        except OSError as exc:
            raise InputError(f"cannot move the outputs into {out_dir}: {exc.strerror or exc}") from None
        return
    entries = sorted(stage.iterdir())
    old = Path(tempfile.mkdtemp(dir=stage, prefix=".old-"))
    moved = []  # (old entry now in `old`, its place in out_dir)
    placed = []  # new entries now in out_dir
    try:
        for k, entry in enumerate(entries):
            target = out_dir / entry.name
            if os.path.lexists(target):  # move every old entry aside first, so a failure can undo all
                os.rename(target, old / str(k))
                moved.append((old / str(k), target))
            os.rename(entry, target)
            placed.append(target)
    except BaseException as exc:
        for target in placed:  # undo: take the new entries out, put every old one back
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        for aside, target in moved:
            os.rename(aside, target)
        if isinstance(exc, OSError):
            raise InputError(f"cannot move the outputs into {out_dir}: {exc.strerror or exc}") from None
        raise
    shutil.rmtree(stage)
