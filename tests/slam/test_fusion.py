"""slam.fusion: z-buffered splatting, multi-view consistency, fused clouds and PLY output.

Analytic cases use a fronto-parallel plane seen by a camera translated sideways (a point at depth Z
moves by fx * b / Z pixels); the others use the exact depth and poses of frames of a synthetic
sequence (only the keyframes are rendered: the same frames `render_sequence` gives, in a third of
the time).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from slam.fusion import fuse_keyframes, splat_depth, write_ply
from v2d.data.synthetic import default_intrinsics, make_scene, make_trajectory, render_views
from v2d.errors import InputError, NumericalError, ShapeError
from v2d.geometry.camera import project, reproject, valid_reprojection
from v2d.geometry.lie import quat_to_matrix, se3_act, se3_identity, se3_inv

F64 = torch.float64
H, W = 96, 128
KEYFRAMES = [0, 4, 8, 12]  # consecutive ones at most 0.2 m and 8 degrees apart (trajectory bounds)
INTR = torch.tensor([100.0, 100.0, (W - 1) / 2, (H - 1) / 2], dtype=F64)


def _pose_at(x: float) -> torch.Tensor:
    """World->camera pose of a camera with identity rotation whose centre is at (x, 0, 0)."""
    T = se3_identity(dtype=F64)
    T[0] = -x
    return T


@pytest.fixture(scope="module")
def kf() -> tuple[list[np.ndarray], list[np.ndarray], torch.Tensor, torch.Tensor]:
    """Depths (H, W), images (H, W, 3), poses_cw (K, 7) and intrinsics (4,) of the keyframes."""
    scene = make_scene(0)
    poses = make_trajectory(scene, 0, KEYFRAMES[-1] + 1)[KEYFRAMES]
    intr = default_intrinsics(H, W)
    images, depths = render_views(scene, poses, intr, H, W)
    return list(depths), list(images), poses, intr


# --------------------------------------------------------------------------------------------------
# splat_depth


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_splat_identity_returns_the_depth_with_invalid_pixels_zero(dtype: torch.dtype) -> None:
    depth = torch.rand(H, W, generator=torch.Generator().manual_seed(0), dtype=dtype) * 5 + 0.5
    depth[10, :20] = 0.0
    depth[20, 5] = torch.nan
    depth[30, 7] = torch.inf
    pose = torch.tensor([0.3, -0.2, 1.0, 0.1, 0.2, -0.3, 0.9], dtype=F64)
    pose[3:] /= pose[3:].norm()
    out = splat_depth(depth, pose, pose, INTR)
    assert out.dtype == dtype and out.shape == (H, W)
    expected = torch.where(torch.isfinite(depth), depth, 0.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=0.0)


def test_splat_sideways_translation_shifts_a_plane() -> None:
    depth = torch.full((H, W), 2.0, dtype=F64)
    out = splat_depth(depth, _pose_at(0.0), _pose_at(0.1), INTR)  # shift fx * 0.1 / 2 = 5 px to the left
    assert torch.equal(out[:, : W - 5], torch.full((H, W - 5), 2.0, dtype=F64))
    assert torch.equal(out[:, W - 5 :], torch.zeros(H, 5, dtype=F64))


def test_splat_z_buffer_keeps_the_nearer_surface() -> None:
    # Background at 4 m shifts by 5 px, a strip at 1 m (source columns 40-59) by 20 px: in the
    # destination the strip (columns 20-39) covers background from source columns 25-39 and leaves
    # a disocclusion hole at columns 40-54.
    depth = torch.full((H, W), 4.0, dtype=F64)
    depth[:, 40:60] = 1.0
    out = splat_depth(depth, _pose_at(0.0), _pose_at(0.2), INTR)
    assert torch.equal(out[:, 20:40], torch.ones(H, 20, dtype=F64))
    assert torch.equal(out[:, 40:55], torch.zeros(H, 15, dtype=F64))
    assert torch.equal(out[:, 55 : W - 5], torch.full((H, W - 60), 4.0, dtype=F64))


def test_splat_matches_rendered_depth(kf) -> None:
    depths, _, poses, intr = kf
    for i, j in [(0, 1), (1, 3)]:  # frames 0 -> 4 and 4 -> 12
        out = splat_depth(torch.from_numpy(depths[i]), poses[i], poses[j], intr)
        hit = out > 0
        rel = ((out - torch.from_numpy(depths[j])).abs() / out)[hit]
        assert hit.float().mean() > 0.75, (i, j)  # the rest: outside view i, and nearest-pixel holes
        assert (rel < 0.02).float().mean() > 0.97, (i, j)


def test_splat_rejects_bad_inputs() -> None:
    depth = torch.ones(H, W)
    with pytest.raises(ShapeError, match="depth"):
        splat_depth(torch.ones(1, H, W), _pose_at(0), _pose_at(0), INTR)
    with pytest.raises(ShapeError, match="pose_cw_dst"):
        splat_depth(depth, _pose_at(0), _pose_at(0)[:6], INTR)
    with pytest.raises(NumericalError, match="pose_cw_src"):
        splat_depth(depth, torch.full((7,), torch.nan), _pose_at(0), INTR)
    with pytest.raises(ShapeError, match="fx > 0"):
        splat_depth(depth, _pose_at(0), _pose_at(0), torch.tensor([0.0, 1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------------------------------
# fuse_keyframes


def test_fused_points_lie_on_the_scene(kf) -> None:
    depths, images, poses, intr = kf
    points, colors, _ = fuse_keyframes(depths, images, poses, intr)
    assert points.dtype == np.float64 and colors.dtype == np.float64
    assert points.shape == colors.shape and points.shape[1] == 3
    assert len(points) > 0.9 * len(KEYFRAMES) * H * W
    assert colors.min() >= 0.0 and colors.max() <= 1.0

    # Seen from keyframe 0, a point is on the visible surface (same depth) or behind it (occluded);
    # a point in front of it would be a floater.
    X = se3_act(poses[0], torch.from_numpy(points))
    col, row = torch.floor(project(X, intr) + 0.5).unbind(-1)
    inside = (X[:, 2] > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
    z = X[inside, 2]
    d0 = torch.from_numpy(depths[0]).double()[row[inside].long(), col[inside].long()]
    rel = (z - d0) / d0
    assert inside.float().mean() > 0.7
    assert (rel.abs() < 0.02).float().mean() > 0.9
    assert (rel < -0.05).float().mean() < 0.01


def _kept(depths, poses, intr, **options) -> list[torch.Tensor]:
    """Which pixels of each keyframe fuse_keyframes keeps: colour (k, row, col) tells where a point is from."""
    rows, cols = np.mgrid[0:H, 0:W]
    images = [np.stack([np.full((H, W), k), rows, cols], -1).astype(np.uint8) for k in range(len(depths))]
    _, colors, _ = fuse_keyframes(depths, images, poses, intr, **options)
    k, r, c = np.round(colors * 255).astype(np.int64).T
    masks = torch.zeros(len(depths), H, W, dtype=torch.bool)
    masks[k, r, c] = True
    assert int(masks.sum()) == len(colors)  # every point from a distinct pixel
    return list(masks)


def _visible_in_all(depths: list[np.ndarray], poses: torch.Tensor, intr: torch.Tensor, k: int,
                    neighbours: list[int]) -> torch.Tensor:
    """Pixels of k that land inside every neighbour image (bilinear-valid region, v2d.geometry)."""
    mask = torch.ones(H, W, dtype=torch.bool)
    for n in neighbours:
        inv = 1.0 / torch.from_numpy(depths[k]).double()
        coords, z = reproject(inv, poses[k], poses[n], intr)
        mask &= valid_reprojection(inv, coords, z, min_depth=0.0)
    return mask


def test_fusion_keeps_the_pixels_every_neighbour_agrees_with(kf) -> None:
    depths, _, poses, intr = kf
    kept = _kept(depths, poses, intr, neighbours=2, min_views=3)  # keyframe 1: neighbours 0, 2 and 3
    visible = _visible_in_all(depths, poses, intr, 1, [0, 2, 3])
    assert visible.float().mean() > 0.5
    assert kept[1][visible].float().mean() > 0.95  # the rest: occlusions, silhouettes
    assert not kept[0].any() and not kept[3].any()  # two neighbours each: 3 views cannot agree
    assert kept[1].float().mean() < visible.float().mean() + 0.05  # what one neighbour misses is dropped


def test_fusion_drops_a_keyframe_at_the_wrong_scale(kf) -> None:
    depths, _, poses, intr = kf
    depths = list(depths)
    depths[1] = depths[1] * 1.3
    kept = _kept(depths, poses, intr, neighbours=1)  # keyframe 1 against 0 and 2
    assert kept[1].float().mean() < 0.02
    assert kept[0].float().mean() < 0.02  # its only neighbour is keyframe 1
    assert kept[2].float().mean() > 0.5 and kept[3].float().mean() > 0.5  # they agree with each other


def test_fusion_drops_a_corrupted_keyframe(kf) -> None:
    depths, _, poses, intr = kf
    depths = list(depths)
    depths[2] = np.random.default_rng(0).uniform(0.5, 10.0, (H, W)).astype(np.float32)
    # Colour tells where a point comes from: white from the corrupted keyframe, black otherwise.
    images = [np.full((H, W, 3), 255 if k == 2 else 0, dtype=np.uint8) for k in range(len(KEYFRAMES))]
    _, colors, _ = fuse_keyframes(depths, images, poses, intr)
    assert (colors[:, 0] == 1.0).sum() < 0.1 * H * W
    assert (colors[:, 0] == 0.0).sum() > 0.85 * 3 * H * W


def test_fusion_with_too_few_neighbours_keeps_nothing(kf) -> None:
    depths, images, poses, intr = kf
    points, colors, _ = fuse_keyframes(depths, images, poses, intr, neighbours=1, min_views=3)
    assert points.shape == (0, 3) and colors.shape == (0, 3) and points.dtype == np.float64


def test_fusion_filters_invalid_and_far_pixels_of_a_single_keyframe(kf, caplog) -> None:
    depths, images, poses, intr = kf
    depth = depths[0].copy()
    depth[:10] = 0.0
    depth[10:20] = np.nan
    with caplog.at_level(logging.WARNING, logger="slam.fusion"):
        points, _, _ = fuse_keyframes([depth], images[:1], poses[:1], intr, max_depth=3.0)
    assert "one keyframe" in caplog.text
    valid = np.isfinite(depth) & (depth > 0) & (depth <= 3.0)
    assert len(points) == valid.sum() > 0
    z = se3_act(poses[0], torch.from_numpy(points))[:, 2]
    assert float(z.max()) <= 3.0 + 1e-6


def test_voxel_downsampling_reduces_the_cloud(kf) -> None:
    depths, images, poses, intr = kf
    points, _, _ = fuse_keyframes(depths, images, poses, intr)
    small, colors, _ = fuse_keyframes(depths, images, poses, intr, voxel=0.05)
    assert 0 < len(small) < 0.5 * len(points)
    assert small.dtype == np.float64 and colors.shape == small.shape
    assert colors.min() >= 0.0 and colors.max() <= 1.0


def test_fusion_rejects_bad_inputs(kf) -> None:
    depths, images, poses, intr = kf
    with pytest.raises(ShapeError, match="images"):
        fuse_keyframes(depths, images[:3], poses, intr)
    with pytest.raises(ShapeError, match="poses_cw"):
        fuse_keyframes(depths, images, poses[:3], intr)
    with pytest.raises(ShapeError, match=r"images\[1\]"):
        fuse_keyframes(depths, [images[0], images[1][:, :-1]] + images[2:], poses, intr)
    with pytest.raises(ShapeError, match=r"depths\[3\]"):
        fuse_keyframes(depths[:3] + [depths[3][:-1]], images, poses, intr)
    bad = poses.clone()
    bad[2, 0] = torch.inf
    with pytest.raises(NumericalError, match="poses_cw"):
        fuse_keyframes(depths, images, bad, intr)
    with pytest.raises(NumericalError, match="intrinsics"):
        fuse_keyframes(depths, images, poses, torch.tensor([torch.nan, 1.0, 2.0, 3.0], dtype=F64))
    with pytest.raises(InputError, match="rel_tol"):
        fuse_keyframes(depths, images, poses, intr, rel_tol=-0.1)


# --------------------------------------------------------------------------------------------------
# write_ply


def test_write_ply_round_trip(tmp_path) -> None:
    o3d = pytest.importorskip("open3d")
    rng = np.random.default_rng(0)
    points, colors = rng.normal(size=(500, 3)) * 3, rng.uniform(size=(500, 3))
    path = write_ply(tmp_path / "cloud.ply", points, colors)
    assert path == tmp_path / "cloud.ply" and sorted(p.name for p in tmp_path.iterdir()) == ["cloud.ply"]
    assert path.read_bytes().startswith(b"ply\nformat binary_little_endian")
    cloud = o3d.io.read_point_cloud(str(path))
    np.testing.assert_allclose(np.asarray(cloud.points), points, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cloud.colors), colors, rtol=0, atol=1 / 255)


def test_write_ply_empty_cloud(tmp_path) -> None:
    o3d = pytest.importorskip("open3d")
    path = write_ply(tmp_path / "empty.ply", np.zeros((0, 3)), np.zeros((0, 3)))
    assert b"element vertex 0\n" in path.read_bytes()
    assert len(o3d.io.read_point_cloud(str(path)).points) == 0


def test_write_ply_failures_raise_and_leave_no_temp_file(tmp_path) -> None:
    points, colors = np.zeros((3, 3)), np.zeros((3, 3))
    with pytest.raises(InputError, match="cannot write point cloud"):
        write_ply(tmp_path / "missing" / "cloud.ply", points, colors)
    (tmp_path / "taken").mkdir()  # the temporary file is written, then cannot replace a directory
    with pytest.raises(InputError, match="cannot write point cloud"):
        write_ply(tmp_path / "taken", points, colors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    with pytest.raises(ShapeError):
        write_ply(tmp_path / "c.ply", points, colors[:2])
    with pytest.raises(NumericalError):
        write_ply(tmp_path / "c.ply", np.full((3, 3), np.nan), colors)


def test_fused_normals_are_rotated_into_the_world_and_averaged_per_voxel() -> None:
    pose = torch.tensor([0.1, -0.2, 0.3, 0.2, -0.1, 0.3, 0.9], dtype=F64)
    pose[3:] /= pose[3:].norm()
    depth = np.full((H, W), 2.0, np.float32)  # a wall 2 m in front of the camera, facing it
    image = np.full((H, W, 3), 128, np.uint8)
    facing = np.zeros((H, W, 3), np.float32)
    facing[..., 2] = -1
    expected = (quat_to_matrix(se3_inv(pose)[3:]) @ torch.tensor([0.0, 0.0, -1.0], dtype=F64)).numpy()
    for normals in ([facing], [None]):  # the module's normals, or those of the depth when there are none
        for voxel in (0.0, 0.05):
            points, _, n = fuse_keyframes([depth], [image], pose[None], INTR, min_views=0, voxel=voxel,
                                          normals=normals)
            assert n is not None and n.shape == points.shape
            known = np.linalg.norm(n, axis=1) > 0.5
            assert known.mean() > 0.9  # only the border has no normal from depth
            np.testing.assert_allclose(n[known], np.broadcast_to(expected, n[known].shape), atol=1e-5)
    _, _, none = fuse_keyframes([depth], [image], pose[None], INTR, min_views=0)
    assert none is None
    with pytest.raises(ShapeError, match="normal maps"):
        fuse_keyframes([depth], [image], pose[None], INTR, normals=[facing, facing])


def test_write_ply_with_normals(tmp_path) -> None:
    o3d = pytest.importorskip("open3d")
    rng = np.random.default_rng(1)
    points, colors = rng.normal(size=(50, 3)), rng.uniform(size=(50, 3))
    normals = rng.normal(size=(50, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    cloud = o3d.io.read_point_cloud(str(write_ply(tmp_path / "n.ply", points, colors, normals)))
    np.testing.assert_allclose(np.asarray(cloud.normals), normals, atol=1e-6)
    with pytest.raises(ShapeError, match="normals"):
        write_ply(tmp_path / "bad.ply", points, colors, normals[:3])
