"""The run loop: frames in, trajectory, keyframe depth, fused cloud and a summary out.

    summary = run_slam("video.mp4", "out/", cfg, RunOptions(stride=2))

`run_slam` opens the input (video, image folder, 7-Scenes, TUM, ScanNet; `v2d.io.datasets`),
streams the selected frames (resized to the network size, intrinsics scaled with them) through
`slam.system.SlamSystem` and writes, into `out_dir`:

- `trajectory.txt`: every processed frame's camera->world pose, TUM format, dataset timestamps
  (or the frame index);
- `depth/NNNNNN.png` (16-bit, millimetres when the scene unit is metres) and `depth/NNNNNN.npy`
  (float32) for each keyframe, named by input frame index;
- `cloud.ply`: the keyframes' depth fused into a coloured cloud, each point checked against
  neighbouring keyframes (`slam.fusion.fuse_keyframes`);
- `summary.json`: counts, lost/static/textureless frames, warnings, timing, intrinsics, config, and
  the global bundle adjustment's report (`global_ba`) and the final alignment of every frame's
  (`fill_frames`).

With `slam.global_ba` (`slam.backend`), the run ends with a global bundle adjustment that moves the
keyframes and corrects their depth at the cloud's size; the depth files, written when each keyframe
left the window, are then corrected by the upsampled ratio (`write_outputs`). With
`slam.fill_frames` (`slam.filler`) every frame between keyframes is then aligned to the final map.
`seconds` and `fps` exclude both (`global_ba.seconds`, `fill_frames.seconds`).

All of it is staged in a hidden directory next to `out_dir` and moved into place only when the
run succeeds (`v2d.io.writers.staged_output`): a failed run leaves nothing behind.

Without intrinsics (none given, none in the dataset) or with `uncalibrated=True`, the run starts
from fx = fy = 1.2 * width, principal point at the centre, and optimises the focal length.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kernels import ops
from slam.backend import upsample_ratio
from slam.config import RunConfig, SlamConfig
from slam.map import release_heap
from slam.system import SlamResult, SlamSystem
from v2d import __version__
from v2d.config import to_dict
from v2d.errors import InputError
from v2d.geometry.camera import resize_intrinsics
from v2d.geometry.lie import se3_inv
from v2d.io.datasets import iter_frames, open_sequence, select_frames
from v2d.io.results import keyframe_name
from v2d.io.writers import (
    ensure_dir,
    staged_output,
    write_depth_png,
    write_image_jpg,
    write_image_png,
    write_json,
    write_normal_png,
    write_npy,
    write_tum,
)
from v2d.model import load_model

__all__ = ["RunOptions", "fuse_cloud", "run_slam", "track_frames", "write_outputs", "UNCALIBRATED_FOCAL"]

_log = logging.getLogger(__name__)

UNCALIBRATED_FOCAL = 1.2  # initial fx = fy = UNCALIBRATED_FOCAL * width without calibration


@dataclass(frozen=True)
class RunOptions:
    """How `run_slam` reads its input.

    Attributes:
        stride: use every stride-th input frame.
        max_frames: stop after this many used frames (None = all).
        size: (H, W) the frames are resized to (None = `data.height` x `data.width`).
        intrinsics: fx, fy, cx, cy at the input's size, overriding the dataset's (None = the dataset's).
        uncalibrated: ignore any intrinsics and optimise the focal length.
        progress: show a tqdm bar.
        device: where the networks and the map run ("cpu", "cuda", "cuda:1", ...).
        save_confidence: write each frame's tracking confidence to confidence/NAME.png.
        refine: after the run, refine the keyframe depth on the video (`slam.refine.refine_run`,
            `cfg.refine`); summary.json's `refine` entry reports it.
    """

    stride: int = 1
    max_frames: int | None = None
    size: tuple[int, int] | None = None
    intrinsics: np.ndarray | None = None
    uncalibrated: bool = False
    progress: bool = True
    device: str = "cpu"
    save_confidence: bool = False
    refine: bool = False


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def track_frames(frames: Iterable[np.ndarray], count: int | None, cfg: RunConfig, size: tuple[int, int],
                 intrinsics: np.ndarray | None, out: Path | None, names: Sequence[int] | None = None,
                 progress: bool = True, on_keyframe: Callable[[int, np.ndarray], None] | None = None,
                 device: str | torch.device = "cpu", save_confidence: bool = False
                 ) -> tuple[SlamResult, dict[str, Any]]:
    """Run the front end over `frames` (any size, resized to `size`); write each keyframe's depth to
    out/depth/NAME.png (16-bit mm) and .npy (float32), its colour image to out/images/NAME.jpg and,
    with `depth.normals`, its normals to out/normal/NAME.png (`v2d.io.writers.write_normal_png`).
    With `save_confidence`, each tracked frame's confidence map (`SlamSystem` on_track: the weight
    the pose solve gave each keyframe pixel, 0-1 -> 0-255; above 1, where the learned update
    up-weights, saturates) to out/confidence/NAME.png, on the tracking grid.

    Shapes: frames: (H0, W0, 3) uint8 RGB each; intrinsics (4,) at (H0, W0), or None (uncalibrated).
    `count` is the progress bar's total (None: unknown, e.g. a video's frames are not counted).
    `names[f]` is frame f's input index (depth file names; default f). `on_keyframe(f, depth)` sees
    each keyframe's final depth (H, W) too (the demo evaluates it); it and the depth writer run in
    the mapper's thread when `slam.concurrent`. Returns the result and run facts.
    """
    from tqdm import tqdm

    device = torch.device(device)
    model = load_model(cfg).to(device)  # first: a missing or wrong weights file fails before any frame is read
    H, W = size
    system: SlamSystem | None = None
    calibrated = intrinsics is not None
    t0 = time.perf_counter()

    depth_dir = image_dir = conf_dir = normal_dir = None
    if out is not None:
        depth_dir, image_dir = ensure_dir(out / "depth"), ensure_dir(out / "images")
        conf_dir = ensure_dir(out / "confidence") if save_confidence else None
        normal_dir = ensure_dir(out / "normal") if cfg.depth.normals else None

    def tracked(f: int, confidence: np.ndarray) -> None:
        name = keyframe_name(names[f] if names else f)
        write_image_png(conf_dir / f"{name}.png", np.round(np.clip(confidence, 0.0, 1.0) * 255).astype(np.uint8))

    def keyframe_done(f: int, depth: np.ndarray, pose_cw: torch.Tensor, image: np.ndarray,
                      normal: np.ndarray | None) -> None:
        name = keyframe_name(names[f] if names else f)
        if depth_dir is not None:
            write_depth_png(depth_dir / f"{name}.png", depth)
            write_npy(depth_dir / f"{name}.npy", depth)
            write_image_jpg(image_dir / f"{name}.jpg", image)
            if normal is not None and normal_dir is not None:
                write_normal_png(normal_dir / f"{name}.png", normal)
        if on_keyframe is not None:
            on_keyframe(f, depth)

    bar = tqdm(total=count, unit="frame", disable=not progress, dynamic_ncols=True, desc="v2d slam")
    n = 0
    try:
        for image in frames:
            if system is None:
                h0, w0 = image.shape[:2]
                if not calibrated:  # square pixels at the input's size; resizing may change the aspect
                    f0 = UNCALIBRATED_FOCAL * w0
                    intrinsics = np.array([f0, f0, (w0 - 1) / 2, (h0 - 1) / 2])
                intr = resize_intrinsics(torch.as_tensor(intrinsics, dtype=torch.float64), (h0, w0), (H, W))
                system = SlamSystem(model, cfg, intr, size, calibrated=calibrated, on_keyframe=keyframe_done,
                                    device=device, on_track=tracked if conf_dir is not None else None)
                if not calibrated:
                    system.warn(f"no camera intrinsics: running uncalibrated from fx = fy = {UNCALIBRATED_FOCAL} x "
                                "width, optimising the focal length (give --intrinsics for better results)")
            system.add_frame(_resize(image, size))
            n += 1
            bar.update(1)
            if system.initialised:
                bar.set_postfix(kf=system.num_keyframes, lost=system.lost_count, refresh=False)
        if system is None or n < 2:
            raise InputError(f"the input gave {n} frame(s); SLAM needs at least 2")
        result = system.finish()
    finally:
        bar.close()
        if system is not None:
            system.close()  # after an error or Ctrl-C: stops the mapper thread
    final = (result.global_ba.seconds if result.global_ba else 0.0) + (result.filler.seconds if result.filler else 0.0)
    seconds = time.perf_counter() - t0 - final
    facts = {"seconds": seconds, "fps": n / seconds, "frames": n, "calibrated": calibrated}
    return result, facts


def write_outputs(out: Path, result: SlamResult, timestamps: np.ndarray, cfg: RunConfig, facts: dict[str, Any],
                  extra: dict[str, Any] | None = None, names: Sequence[int] | None = None) -> dict[str, Any]:
    """Write trajectory.txt, cloud.ply and summary.json (depth/ and images/ are written while tracking).

    `names[f]` is frame f's input index, as given to `track_frames` (default f).
    """
    sc = cfg.slam
    release_heap()
    _correct_depths(out, result, names)
    poses_wc = se3_inv(result.poses_cw)
    write_tum(out / "trajectory.txt", timestamps, poses_wc.numpy())
    cloud = fuse_cloud(out / "cloud.ply", result.cloud_depths, result.cloud_images, result.keyframe_poses_cw,
                       result.intrinsics, result.cloud_stride, sc, normals=result.cloud_normals or None)
    fx, fy, cx, cy = result.intrinsics.tolist()
    frames = result.frames
    marked = {name: [f for f, st in enumerate(frames) if getattr(st, attr)]
              for name, attr in (("lost", "lost"), ("interpolated", "interpolated"), ("static", "static"),
                                    ("textureless", "textureless"))}
    tracked = [st.quality for st in frames if not st.is_keyframe and not st.lost]
    summary = {
        "version": __version__,
        "kernels": "extension" if ops.extension_available() else "reference",
        "frames": facts["frames"],
        "keyframes": len(result.keyframe_frames),
        "keyframe_frames": result.keyframe_frames,  # rows of trajectory.txt
        "keyframe_files": [keyframe_name(names[f] if names else f) for f in result.keyframe_frames],
        "lost_frames": len(marked["lost"]),
        "interpolated_frames": len(marked["interpolated"]),  # lost, then bridged after tracking resumed
        "marked_frames": marked,
        "restarts": result.restarts,
        # a restart begins a new map segment (own pose and scale) until it is merged into an earlier one
        "segments": len(result.segments),
        "segment_keyframes": result.segments,  # rows of trajectory.txt of each segment's keyframes
        "segment_merges": result.merges,
        "loops": len(result.loops),
        "loop_frames": [list(p) for p in result.loops],  # frame pairs (rows of trajectory.txt) of each loop
        "recovered_frames": result.recovered,
        "relocalisations": result.relocalised,
        **cloud,
        "seconds": facts["seconds"],  # model loading to the last frame's tracking
        "seconds_total": facts.get("seconds_total"),  # including opening the input
        "fps": facts["fps"],
        "image_size": [cfg.data.height, cfg.data.width],
        "intrinsics": {"fx": fx, "fy": fy, "cx": cx, "cy": cy, "calibrated": facts["calibrated"],
                       "note": "at the network input size"},
        "tracking": {
            "flow_source": cfg.motion.flow_source,
            "mean_confidence": float(np.mean([q.confidence for q in tracked])) if tracked else None,
            "mean_overlap": float(np.mean([q.overlap for q in tracked])) if tracked else None,
            "mean_residual_px": float(np.mean([q.residual for q in tracked])) if tracked else None,
        },
        "warnings": result.warnings,
        "global_ba": result.global_ba.as_dict() if result.global_ba else {"enabled": False},
        "fill_frames": {"enabled": True, **result.filler.as_dict()} if result.filler else {"enabled": False},
        "config": to_dict(cfg),
    }
    summary.update(extra or {})
    write_json(out / "summary.json", summary)
    return summary


def fuse_cloud(path: Path, depths: Sequence[np.ndarray | torch.Tensor], images: Sequence[np.ndarray],
               poses_cw: torch.Tensor, intrinsics: torch.Tensor, stride: int, sc: SlamConfig,
               normals: Sequence[np.ndarray | None] | None = None) -> dict[str, Any]:
    """Fuse the keyframes' depth into a coloured cloud (`slam.fusion.fuse_keyframes`) and write it to
    path, with normals when any keyframe has the depth module's (`depth.normals`).

    Shapes: depths, images: K x (h, w) and (h, w, 3) uint8 on the cloud's grid (every `stride`-th
    pixel of the network size); poses_cw (K, 7); intrinsics (4,) at the network size; normals K x
    (h, w, 3) camera frame or None each. Returns the summary's entries {"points": N, "cloud_voxel":
    voxel, "cloud_normals": bool}.
    """
    from slam.fusion import fuse_keyframes, write_ply

    fx, fy, cx, cy = intrinsics.tolist()
    s = stride
    intr_small = torch.tensor([fx / s, fy / s, cx / s, cy / s], dtype=torch.float64)  # pixel (i, j) = (s i, s j)
    voxel = sc.cloud_voxel
    if voxel == 0:  # automatic: one cloud pixel's footprint at the median keyframe depth
        med = np.median(np.concatenate([np.asarray(d)[np.asarray(d) > 0] for d in depths]
                                       + [np.ones(1, np.float32)]))
        voxel = float(med) / max(fx / s, fy / s)
    if normals is not None and all(n is None for n in normals):
        normals = None
    points, colors, point_normals = fuse_keyframes(depths, images, poses_cw, intr_small, neighbours=sc.cloud_neighbours,
                                                   rel_tol=sc.cloud_tolerance, min_views=sc.cloud_min_views,
                                                   voxel=voxel, normals=normals)
    write_ply(path, points, colors, point_normals)
    return {"points": int(points.shape[0]), "cloud_voxel": voxel, "cloud_normals": point_normals is not None}


def _correct_depths(out: Path, result: SlamResult, names: Sequence[int] | None) -> None:
    """Apply the global bundle adjustment's depth corrections to the keyframes' depth files: each
    keyframe's new / old inverse-depth ratio, upsampled bilinearly from the cloud's grid to full size,
    divides depth/NAME.npy, and depth/NAME.png is written again from the result."""
    report = result.global_ba
    if report is None or not report.kept or not (out / "depth").is_dir():
        return
    for kid, ratio in report.depth_ratio.items():
        name = keyframe_name(names[result.keyframe_frames[kid]] if names else result.keyframe_frames[kid])
        depth = np.load(out / "depth" / f"{name}.npy")
        scale = upsample_ratio(ratio, result.cloud_stride, depth.shape)
        depth = np.where(depth > 0, depth / scale, 0.0).astype(np.float32)
        write_npy(out / "depth" / f"{name}.npy", depth)
        write_depth_png(out / "depth" / f"{name}.png", depth)


def run_slam(source: str | Path, out_dir: str | Path, cfg: RunConfig, opts: RunOptions = RunOptions()
             ) -> dict[str, Any]:
    """Run SLAM on a video, image folder or dataset sequence and write the outputs to out_dir.

    Raises InputError (bad input, unwritable output), ConfigError, ShapeError; nothing is left in
    out_dir then. Returns the summary written to summary.json.
    """
    size = opts.size or (cfg.data.height, cfg.data.width)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, height=size[0], width=size[1]))
    with staged_output(out_dir) as stage:
        t0 = time.perf_counter()
        seq = open_sequence(source, opts.intrinsics, require_intrinsics=False)
        # A video's length is unknown until it is streamed (counting it would decode it twice): its
        # selection is open-ended and track_frames checks that it gave at least 2 frames.
        indices = select_frames(seq.num_frames, opts.stride, opts.max_frames)
        if seq.num_frames is not None and len(indices) < 2:
            raise InputError(f"{source}: {len(indices)} frame(s) selected (of {len(seq)}, stride {opts.stride}); "
                             "SLAM needs at least 2")
        total = len(indices) if seq.num_frames is not None else \
            len(select_frames(seq.frame_count_estimate or 0, opts.stride, opts.max_frames)) or None
        intr = None if opts.uncalibrated else seq.intrinsics
        frames = (rgb for _, rgb in iter_frames(seq, indices))
        result, facts = track_frames(frames, total, cfg, size, intr, stage, names=indices,
                                     progress=opts.progress, device=opts.device,
                                     save_confidence=opts.save_confidence)
        n = facts["frames"]
        timestamps = seq.frame_timestamps(indices[:n])
        # input_frames: None when a video was not streamed to its end (--max-frames) and so not counted
        extra = {"input": {"path": str(source), "layout": seq.layout, "input_frames": seq.num_frames,
                           "stride": opts.stride, "max_frames": opts.max_frames}}
        facts["seconds_total"] = time.perf_counter() - t0
        summary = write_outputs(stage, result, timestamps, cfg, facts, extra, names=indices)
        if opts.refine:
            from slam.refine import refine_run

            summary = refine_run(stage, stage, cfg, progress=opts.progress, device=opts.device)
    _log.info("%d frames, %d keyframes, %d lost, %.1f frames/s -> %s", n, summary["keyframes"],
              summary["lost_frames"], facts["fps"], out_dir)
    return summary
