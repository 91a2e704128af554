"""slam.vis_scene, vis_render and vis_mesh: frustum and view geometry, ground-truth alignment, cloud
checks, offscreen renders, TSDF mesh.

Runs are fake: output directories written from a synthetic sequence's exact depths and poses
(`make_fake_run`), so no SLAM runs here. Open3D renders offscreen through its EGL fallback.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from slam import vis_mesh, vis_render, vis_scene
from slam.fusion import write_ply
from tests.fake_run import write_fake_run
from v2d.data.synthetic import SyntheticSequence, render_sequence
from v2d.errors import InputError
from v2d.geometry.lie import se3_act, se3_inv
from v2d.io.results import RunOutputs, load_run
from v2d.io.writers import write_tum

H, W = 48, 64
FRAMES = 12
KEYFRAMES = [0, 3, 6, 9, 11]
RENDER = (480, 360)  # width, height of the test renders
COLOUR_TOL = 0.08  # a pixel "has" a colour when every channel is this close


@functools.cache
def sequence() -> SyntheticSequence:
    """The synthetic sequence of the fake runs (rendered once per test session; read only)."""
    return render_sequence(seed=3, num_frames=FRAMES, height=H, width=W, speed=2.0)


def gt_points(seq: SyntheticSequence, frames: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """World points and RGB colours in [0, 1] of the frames' valid depth pixels (exact surface samples)."""
    fx, fy, cx, cy = seq.intrinsics.tolist()
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    pts, cols = [], []
    for f in frames:
        d = np.asarray(seq.depths[f], dtype=np.float64)
        ok = d > 0
        cam = np.stack([(u - cx) / fx * d, (v - cy) / fy * d, d], axis=-1)[ok]
        T_wc = vis_scene.pose_matrices(se3_inv(seq.poses_cw[f]).numpy()[None])[0]
        pts.append(cam @ T_wc[:3, :3].T + T_wc[:3, 3])
        cols.append(np.asarray(seq.images[f])[ok] / 255.0)
    return np.concatenate(pts), np.concatenate(cols)


def make_fake_run(root: Path, seq: SyntheticSequence, cloud: bool = True, gt_bump: float = 0.0,
                  depth_scale: float = 1.0) -> Path:
    """`tests.fake_run.write_fake_run` of KEYFRAMES (depth times `depth_scale`) plus cloud.ply (the exact
    surface samples, or empty) and trajectory_gt.txt: the trajectory with a smooth bump of `gt_bump`
    (scene units) in world y, which no Sim3 alignment removes, so both trajectories stay visible; no
    file when gt_bump is 0.
    """
    depths = {f: np.asarray(seq.depths[f], dtype=np.float32) * depth_scale for f in KEYFRAMES}
    write_fake_run(root, seq, KEYFRAMES, depths=depths)
    if gt_bump:
        bumped = se3_inv(seq.poses_cw).numpy()
        bumped[:, 1] += gt_bump * np.sin(np.pi * np.arange(FRAMES) / (FRAMES - 1))
        write_tum(root / "trajectory_gt.txt", np.asarray(seq.timestamps, dtype=np.float64), bumped)
    pts, cols = gt_points(seq, KEYFRAMES) if cloud else (np.zeros((0, 3)), np.zeros((0, 3)))
    write_ply(root / "cloud.ply", pts, cols)
    return root


@pytest.fixture(scope="module")
def seq() -> SyntheticSequence:
    return sequence()


@pytest.fixture(scope="module")
def run_dir(seq, tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("vis") / "run", seq, gt_bump=0.15)


def _colour_pixels(png: Path, colour: tuple[float, float, float]) -> int:
    rgb = cv2.imread(str(png), cv2.IMREAD_COLOR)[..., ::-1] / 255.0
    return int((np.abs(rgb - np.asarray(colour)) < COLOUR_TOL).all(-1).sum())


# --------------------------------------------------------------------------------------------------
# geometry


def test_pose_matrices_act_like_the_lie_group():
    rng = np.random.default_rng(0)
    q = Rotation.random(5, random_state=1).as_quat()
    poses = np.concatenate([rng.normal(size=(5, 3)), q], axis=1)
    p = rng.normal(size=(5, 3))
    T = vis_scene.pose_matrices(poses)
    import torch

    expected = se3_act(torch.from_numpy(poses), torch.from_numpy(p)).numpy()
    assert np.allclose(np.einsum("nij,nj->ni", T[:, :3, :3], p) + T[:, :3, 3], expected, atol=1e-12)
    assert np.allclose(T[:, 3], [0, 0, 0, 1])


def test_frustum_apex_is_the_camera_centre_and_corners_project_to_the_image_corners():
    T_wc = vis_scene.pose_matrices(np.concatenate([[0.3, -1.2, 2.0], Rotation.from_euler("xyz", [10, -35, 70],
                                                                                    degrees=True).as_quat()]))[0]
    intr = np.array([120.0, 110.0, 70.0, 45.0])  # principal point off centre
    size = (90, 160)
    pts = vis_scene.frustum_points(T_wc, intr, size, depth=0.7)
    assert pts.shape == (5, 3)
    assert np.allclose(pts[0], T_wc[:3, 3])
    T_cw = np.linalg.inv(T_wc)
    cam = pts[1:] @ T_cw[:3, :3].T + T_cw[:3, 3]
    assert np.allclose(cam[:, 2], 0.7)
    uv = np.stack([intr[0] * cam[:, 0] / cam[:, 2] + intr[2], intr[1] * cam[:, 1] / cam[:, 2] + intr[3]], axis=1)
    assert np.allclose(uv, [[-0.5, -0.5], [159.5, -0.5], [159.5, 89.5], [-0.5, 89.5]])
    assert {tuple(e) for e in vis_scene.FRUSTUM_LINES} >= {(0, 1), (0, 2), (0, 3), (0, 4)}  # apex to every corner


def test_overview_looks_at_the_centre_and_sees_every_camera(run_dir):
    scene = vis_scene.build_scene(load_run(run_dir))
    w, h = RENDER
    E = vis_render.overview_extrinsic(scene, w, h)
    assert np.allclose(E[:3, :3] @ E[:3, :3].T, np.eye(3), atol=1e-9)
    f = (h / 2) / np.tan(np.radians(vis_render.VIEW_FOV_DEG) / 2)

    def project(p):
        c = p @ E[:3, :3].T + E[:3, 3]
        assert (c[:, 2] > 0).all()
        return np.stack([f * c[:, 0] / c[:, 2] + w / 2 - 0.5, f * c[:, 1] / c[:, 2] + h / 2 - 0.5], axis=1)

    assert np.allclose(project(scene.centre[None]), [[w / 2 - 0.5, h / 2 - 0.5]], atol=1e-6)
    uv = project(scene.positions)
    assert (uv >= 0).all() and (uv[:, 0] < w).all() and (uv[:, 1] < h).all()
    # above the cameras: the cameras' up direction points up in the image (negative v)
    top, bottom = project(np.stack([scene.centre + 0.1 * scene.up, scene.centre]))
    assert top[1] < bottom[1]


# --------------------------------------------------------------------------------------------------
# inputs


def _helix(n: int) -> np.ndarray:
    s = np.linspace(0, 3, n)
    q = Rotation.from_euler("y", s[:, None]).as_quat()
    return np.concatenate([np.stack([np.cos(s), 0.3 * s, np.sin(s)], 1), q], axis=1)


def _fake_outputs(t: np.ndarray, poses: np.ndarray) -> RunOutputs:
    return RunOutputs(root=Path("."), timestamps=t, poses_wc=poses, keyframe_rows=[0], keyframe_files=["000000"],
                      intrinsics=np.array([50.0, 50, 32, 24]), image_size=(48, 64), summary={})


def test_align_ground_truth_undoes_a_sim3_and_matches_timestamps():
    est = _helix(40)
    t = np.arange(40) / 30.0
    out = _fake_outputs(t, est)
    R = Rotation.from_euler("xyz", [20, -50, 110], degrees=True)
    gt = est.copy()
    gt[:, :3] = 2.5 * R.apply(est[:, :3]) + [1.0, -2.0, 0.5]
    gt[:, 3:] = (R * Rotation.from_quat(est[:, 3:])).as_quat()
    # ground truth at twice the rate, slightly offset in time: every other pose matches within max_diff
    t_gt = np.concatenate([t + 0.002, t + 1 / 60.0])
    gt_all = np.concatenate([gt, gt + [[10, 10, 10, 0, 0, 0, 0]]])
    order = np.argsort(t_gt)
    aligned = vis_scene.align_ground_truth(out, t_gt[order], gt_all[order])
    assert aligned.shape == (40, 3)
    assert np.allclose(aligned, est[:, :3], atol=1e-6)


def test_align_ground_truth_needs_matching_timestamps():
    est = _helix(10)
    with pytest.raises(InputError, match="none of its timestamps"):
        vis_scene.align_ground_truth(_fake_outputs(np.arange(10.0), est), np.arange(10.0) + 100, est)
    with pytest.raises(InputError, match="2 of its timestamps match"):
        vis_scene.align_ground_truth(_fake_outputs(np.arange(10.0), est), np.arange(8.0, 18.0), est)


def test_read_cloud_accepts_an_empty_cloud_and_rejects_corrupt_files(tmp_path, run_dir):
    empty = tmp_path / "empty.ply"
    write_ply(empty, np.zeros((0, 3)), np.zeros((0, 3)))
    assert len(vis_scene.read_cloud(empty).points) == 0
    good = (run_dir / "cloud.ply").read_bytes()
    assert len(vis_scene.read_cloud(run_dir / "cloud.ply").points) == len(gt_points(sequence(), KEYFRAMES)[0])
    cases = {"truncated": good[: len(good) // 2], "truncated ": good[:-3], "not a PLY": b"\x00garbage" * 20,
             "not a PLY ": b"", "corrupt PLY header": good[:40]}
    for needle, data in cases.items():
        path = tmp_path / "bad.ply"
        path.write_bytes(data)
        with pytest.raises(InputError, match=needle.strip()):
            vis_scene.read_cloud(path)
    with pytest.raises(InputError, match="missing"):
        vis_scene.read_cloud(tmp_path / "none.ply")


# --------------------------------------------------------------------------------------------------
# rendering


def test_headless_render_is_not_blank_and_has_the_requested_size(run_dir, tmp_path):
    png = tmp_path / "view.png"
    w, h = RENDER
    stats = vis_render.render_headless(load_run(run_dir), png, w, h)
    img = cv2.imread(str(png), cv2.IMREAD_COLOR)
    assert img.shape == (h, w, 3)
    assert img.std() > 20  # not a flat image
    assert stats["object_fraction"] > 0.1  # the cloud covers a good part of the view
    assert stats["points"] > 1000 and stats["keyframes"] == len(KEYFRAMES) and stats["gt_poses"] == 0
    assert _colour_pixels(png, vis_scene.COLOUR_ESTIMATE) > 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_render_shows_the_ground_truth_the_highlight_and_the_cloud(run_dir, seq, tmp_path):
    run = load_run(run_dir)
    w, h = RENDER
    without = vis_render.render_headless(run, tmp_path / "a.png", w, h)
    with_gt = vis_render.render_headless(run, tmp_path / "b.png", w, h, gt=run_dir / "trajectory_gt.txt")
    assert with_gt["gt_poses"] == FRAMES
    assert _colour_pixels(tmp_path / "b.png", vis_scene.COLOUR_GROUND_TRUTH) > 20
    assert _colour_pixels(tmp_path / "a.png", vis_scene.COLOUR_GROUND_TRUTH) < 3
    assert _colour_pixels(tmp_path / "a.png", vis_scene.COLOUR_HIGHLIGHT) < 3
    vis_render.render_headless(run, tmp_path / "c.png", w, h, keyframe=2)
    assert _colour_pixels(tmp_path / "c.png", vis_scene.COLOUR_HIGHLIGHT) > 50
    no_cloud = make_fake_run(tmp_path / "nocloud", seq, cloud=False)
    cameras_only = vis_render.render_headless(load_run(no_cloud), tmp_path / "d.png", w, h)
    assert cameras_only["points"] == 0
    assert 0 < cameras_only["object_fraction"] < without["object_fraction"] / 3


def test_viewer_keys_step_through_the_keyframes(run_dir):
    """The interactive viewer's set-up and key callbacks, in an offscreen window (only `vis.run()` and
    the display check are left untested)."""
    scene = vis_scene.build_scene(load_run(run_dir), highlight=0)
    w, h = RENDER
    overview = vis_render.overview_extrinsic(scene, w, h)
    window = vis_render.open_window(scene, w, h, overview, visible=False, keys=True)
    try:
        keys = vis_render.attach_keys(window, scene, overview)
        ctl = window.get_view_control()
        first = np.asarray(scene.highlight.vertices).copy()
        assert keys["next"](window) and scene.highlighted == 1
        assert np.allclose(ctl.convert_to_pinhole_camera_parameters().extrinsic,
                           vis_render.keyframe_extrinsic(scene, 1))
        assert not np.allclose(np.asarray(scene.highlight.vertices), first)  # the frustum moved
        buf = np.asarray(window.capture_screen_float_buffer(do_render=True))
        assert ((np.abs(buf - vis_scene.COLOUR_HIGHLIGHT) < COLOUR_TOL).all(-1)).sum() > 50
        keys["previous"](window)
        keys["previous"](window)
        assert scene.highlighted == len(KEYFRAMES) - 1  # cyclic
        assert keys["overview"](window)
        assert np.allclose(ctl.convert_to_pinhole_camera_parameters().extrinsic, overview)
    finally:
        window.destroy_window()


def test_render_rejects_bad_paths_and_keyframes(run_dir, tmp_path):
    run = load_run(run_dir)
    with pytest.raises(InputError, match=r"\.png"):
        vis_render.render_headless(run, tmp_path / "view.jpg")
    with pytest.raises(InputError, match="does not exist"):
        vis_render.render_headless(run, tmp_path / "no" / "view.png")
    with pytest.raises(InputError, match="keyframe 9"):
        vis_render.render_headless(run, tmp_path / "view.png", keyframe=9)
    assert not (tmp_path / "view.png").exists()


# --------------------------------------------------------------------------------------------------
# TSDF mesh


def test_tsdf_mesh_lies_on_the_surface(run_dir, seq, tmp_path):
    import open3d as o3d

    mesh, stats = vis_mesh.tsdf_mesh(load_run(run_dir))
    assert stats["vertices"] > 500 and stats["triangles"] > 500 and stats["coloured"]
    assert mesh.has_vertex_colors()
    surface = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(gt_points(seq, list(range(FRAMES)))[0]))
    verts = o3d.geometry.PointCloud(mesh.vertices)
    dist = np.asarray(verts.compute_point_cloud_distance(surface))
    # Measured 0.23 and 0.56 voxels (the voxel is one pixel footprint, 5 cm, here); half-pixel
    # misregistration gives 0.51 and 1.0, a wrong pose far more.
    voxel = stats["voxel"]
    assert np.median(dist) < 0.4 * voxel, (np.median(dist), voxel)
    assert np.percentile(dist, 90) < 1.0 * voxel, (np.percentile(dist, 90), voxel)
    path = vis_mesh.write_mesh(mesh, tmp_path / "mesh.ply")
    back = o3d.io.read_triangle_mesh(str(path))
    assert len(back.triangles) == stats["triangles"]
    assert not list(tmp_path.glob(".mesh.ply.*"))


def test_tsdf_mesh_scales_with_the_scene(run_dir, seq, tmp_path):
    """A run in other units (depths and poses x10) gives the same mesh, x10: nothing assumes metres."""
    small = vis_mesh.tsdf_mesh(load_run(run_dir))[1]
    scaled = make_fake_run(tmp_path / "x10", seq, depth_scale=10.0)
    t = load_run(scaled)
    poses = t.poses_wc.copy()
    poses[:, :3] *= 10
    write_tum(scaled / "trajectory.txt", t.timestamps, poses)
    big = vis_mesh.tsdf_mesh(load_run(scaled))[1]
    assert big["voxel"] == pytest.approx(10 * small["voxel"])
    assert big["triangles"] == pytest.approx(small["triangles"], rel=0.05)


def test_tsdf_mesh_without_valid_depth_is_an_input_error(seq, tmp_path):
    run = make_fake_run(tmp_path / "run", seq, depth_scale=0.0)
    with pytest.raises(InputError, match="no keyframe has a valid depth"):
        vis_mesh.tsdf_mesh(load_run(run))


def test_write_mesh_checks_the_path(run_dir, tmp_path):
    mesh, _ = vis_mesh.tsdf_mesh(load_run(run_dir))
    with pytest.raises(InputError, match=r"\.ply"):
        vis_mesh.write_mesh(mesh, tmp_path / "mesh.obj")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        vis_mesh.write_mesh(mesh, blocker / "mesh.ply")


def test_tsdf_mesh_takes_the_predicted_normals(run_dir, seq, tmp_path):
    """With normal/ PNGs (the depth module's normals; here those of the ground-truth depth, a perfect
    normal head), the mesh's vertex normals are theirs: closer to the surface's than the TSDF's own."""
    import shutil

    import torch
    from scipy.spatial import cKDTree

    from v2d.geometry.normals import angular_error, normals_from_depth
    from v2d.io.writers import write_normal_png

    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    run = load_run(run_copy)
    (run_copy / "normal").mkdir()
    for k in range(len(run.keyframe_rows)):
        n, _ = normals_from_depth(torch.from_numpy(run.depth(k)).double(), torch.from_numpy(run.intrinsics).double())
        write_normal_png(run_copy / "normal" / f"{run.keyframe_files[k]}.png", n.numpy())
    geometric, _ = vis_mesh.tsdf_mesh(load_run(run_dir))
    predicted, stats = vis_mesh.tsdf_mesh(load_run(run_copy))
    assert stats["normals"] == "predicted"
    # The true normal at each vertex: the nearest ground-truth surface point's, from the GT depth.
    pts, nrm = [], []
    for f in range(0, FRAMES, 2):
        d = torch.from_numpy(np.asarray(seq.depths[f])).double()
        n, ok = normals_from_depth(d, seq.intrinsics)
        T_wc = vis_scene.pose_matrices(se3_inv(seq.poses_cw[f]).numpy()[None])[0]
        fx, fy, cx, cy = seq.intrinsics.tolist()
        v, u = np.mgrid[0:H, 0:W].astype(np.float64)
        dd, okk = d.numpy(), ok.numpy()
        cam = np.stack([(u - cx) / fx * dd, (v - cy) / fy * dd, dd], -1)[okk]
        pts.append(cam @ T_wc[:3, :3].T + T_wc[:3, 3])
        nrm.append(n.numpy()[okk] @ T_wc[:3, :3].T)
    tree, truth = cKDTree(np.concatenate(pts)), np.concatenate(nrm)

    def median_error(mesh) -> float:
        _, idx = tree.query(np.asarray(mesh.vertices))
        return float(np.median(angular_error(torch.from_numpy(np.asarray(mesh.vertex_normals)),
                                             torch.from_numpy(truth[idx])).numpy()))

    assert median_error(predicted) < 0.5 * median_error(geometric), (median_error(predicted), median_error(geometric))
