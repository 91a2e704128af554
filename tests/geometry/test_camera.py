"""Properties of v2d.geometry.camera: projection round trips, intrinsics algebra, reprojection, masks."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from v2d.errors import ShapeError
from v2d.geometry.camera import (
    backproject,
    backproject_inv,
    check_intrinsics,
    crop_intrinsics,
    in_front,
    in_image,
    intrinsics_from_matrix,
    intrinsics_to_matrix,
    pixel_grid,
    pixel_rays,
    pose_to_rt,
    project,
    relative_pose,
    reproject,
    resize_intrinsics,
    scale_intrinsics,
    valid_reprojection,
)
from v2d.geometry.lie import se3_act, se3_exp, se3_identity, se3_inv, se3_random

F64 = torch.float64
INTR = torch.tensor([[320.0, 310.0, 159.5, 119.5], [200.0, 220.0, 150.0, 100.0]], dtype=F64)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pose_translated(t: list[float]) -> torch.Tensor:
    """World->camera pose of a camera with identity rotation whose centre is at t (so T p = p - t)."""
    T = se3_identity(dtype=F64)
    T[:3] = -torch.tensor(t, dtype=F64)
    return T


# --------------------------------------------------------------------------------------------------
# pixels, projection


def test_pixel_grid_has_pixel_centres_at_integers():
    grid = pixel_grid(3, 4, dtype=F64)
    assert grid.shape == (3, 4, 2) and grid.dtype == F64
    assert grid[2, 1].tolist() == [1.0, 2.0]  # grid[v, u] = [u, v]
    assert grid[0, 0].tolist() == [0.0, 0.0] and grid[2, 3].tolist() == [3.0, 2.0]


def test_project_inverts_backproject():
    depth = 0.5 + 5 * torch.rand(2, 12, 16, generator=_gen(1), dtype=F64)
    points = backproject(depth, INTR)
    assert points.shape == (2, 12, 16, 3)
    torch.testing.assert_close(points[..., 2], depth)
    uv = project(points, INTR[:, None, None, :])
    torch.testing.assert_close(uv, pixel_grid(12, 16, dtype=F64).expand(2, 12, 16, 2), atol=1e-12, rtol=0)
    torch.testing.assert_close(backproject_inv(1.0 / depth, INTR), points)


def test_pixel_rays_project_to_their_pixels_at_unit_depth():
    rays = pixel_rays(INTR, 12, 16)
    assert rays.shape == (2, 12, 16, 3) and rays.dtype == F64
    torch.testing.assert_close(rays[..., 2], torch.ones(2, 12, 16, dtype=F64))
    uv = project(rays, INTR[:, None, None, :])
    torch.testing.assert_close(uv, pixel_grid(12, 16, dtype=F64).expand(2, 12, 16, 2), atol=1e-12, rtol=0)
    assert pixel_rays(INTR[0].float(), 3, 4).dtype == torch.float32
    with pytest.raises(ShapeError, match=r"intrinsics: expected \(\.\.\., 4\), got \(3, 3\)"):
        pixel_rays(torch.eye(3, dtype=F64), 3, 4)


def test_backproject_broadcasts_one_intrinsics_over_a_batch():
    depth = torch.ones(3, 2, 4, 5, dtype=F64)
    assert backproject(depth, INTR[0]).shape == (3, 2, 4, 5, 3)
    assert backproject(depth, INTR[None, :, :].expand(3, 2, 4)).shape == (3, 2, 4, 5, 3)


def test_backproject_inv_of_zero_is_non_finite():
    """inv_depth = 0 (a point at infinity) cannot be a finite point; the docs promise non-finite values."""
    pts = backproject_inv(torch.zeros(4, 5, dtype=F64), INTR[0])
    assert not torch.isfinite(pts).any()


def test_project_jacobian_matches_autograd():
    g = _gen(2)
    points = torch.randn(20, 3, generator=g, dtype=F64)
    points[:, 2] = 0.5 + 3 * torch.rand(20, generator=g, dtype=F64)
    uv, J = project(points, INTR[0], jacobian=True)
    assert uv.shape == (20, 2) and J.shape == (20, 2, 3)
    J_auto = torch.autograd.functional.jacobian(lambda p: project(p, INTR[0]).sum(0), points)  # (2, 20, 3)
    torch.testing.assert_close(J, J_auto.permute(1, 0, 2), atol=1e-12, rtol=0)
    # and against central differences, independent of autograd
    eps = 1e-6
    for k in range(3):
        d = torch.zeros(3, dtype=F64)
        d[k] = eps
        fd = (project(points + d, INTR[0]) - project(points - d, INTR[0])) / (2 * eps)
        torch.testing.assert_close(J[..., k], fd, atol=1e-5, rtol=1e-6)


def test_project_gradcheck():
    points = torch.tensor([[0.3, -0.2, 2.0], [-1.0, 0.5, 0.7]], dtype=F64, requires_grad=True)
    intr = INTR[0].clone().requires_grad_()
    assert gradcheck(lambda p, k: project(p, k, jacobian=True), (points, intr))


# --------------------------------------------------------------------------------------------------
# intrinsics


def test_intrinsics_matrix_round_trip():
    K = intrinsics_to_matrix(INTR)
    assert K.shape == (2, 3, 3)
    torch.testing.assert_close(
        K[0], torch.tensor([[320.0, 0, 159.5], [0, 310.0, 119.5], [0, 0, 1]], dtype=F64)
    )
    torch.testing.assert_close(intrinsics_from_matrix(K), INTR)


def test_scale_then_inverse_scale_is_identity():
    half = scale_intrinsics(INTR, 0.5, 0.5)
    torch.testing.assert_close(scale_intrinsics(half, 2.0, 2.0), INTR)
    torch.testing.assert_close(
        resize_intrinsics(resize_intrinsics(INTR, (240, 320), (120, 160)), (120, 160), (240, 320)), INTR
    )


def test_scaled_intrinsics_move_pixel_centres_by_align_corners_false_rule():
    """A point seen at pixel centre (u, v) is seen at ((u + 0.5) sx - 0.5, (v + 0.5) sy - 0.5) once the
    image is resized by (sx, sy)."""
    sx, sy = 0.25, 1.5
    uv = torch.tensor([[0.0, 0.0], [10.0, 7.0], [319.0, 239.0]], dtype=F64)
    depth = torch.tensor([1.0, 2.5, 7.0], dtype=F64)
    fx, fy, cx, cy = INTR[0]
    points = torch.stack([(uv[:, 0] - cx) / fx * depth, (uv[:, 1] - cy) / fy * depth, depth], dim=-1)
    torch.testing.assert_close(project(points, INTR[0]), uv)
    expected = torch.stack([(uv[:, 0] + 0.5) * sx - 0.5, (uv[:, 1] + 0.5) * sy - 0.5], dim=-1)
    torch.testing.assert_close(project(points, scale_intrinsics(INTR[0], sx, sy)), expected)
    torch.testing.assert_close(
        resize_intrinsics(INTR[0], (240, 320), (360, 80)), scale_intrinsics(INTR[0], sx, sy)
    )


def test_scale_rule_agrees_with_torch_interpolate():
    """Downsampling an image of its own u coordinate by 2 (align_corners=False) gives the old u of each new
    pixel centre, which is what the scaled intrinsics predict: u = (u' + 0.5) / s - 0.5."""
    H, W = 4, 8
    ramp = pixel_grid(H, W, dtype=F64)[..., 0][None, None]
    small = F.interpolate(ramp, size=(H // 2, W // 2), mode="bilinear", align_corners=False)[0, 0]
    u_new = torch.arange(W // 2, dtype=F64)
    torch.testing.assert_close(small[0], (u_new + 0.5) / 0.5 - 0.5)


def test_crop_shifts_principal_point():
    cropped = crop_intrinsics(INTR, 10.0, 20.0)
    torch.testing.assert_close(cropped[:, :2], INTR[:, :2])
    torch.testing.assert_close(cropped[:, 2:], INTR[:, 2:] - torch.tensor([10.0, 20.0], dtype=F64))
    p = torch.tensor([0.3, -0.1, 2.0], dtype=F64)
    torch.testing.assert_close(
        project(p, cropped[0]), project(p, INTR[0]) - torch.tensor([10.0, 20.0], dtype=F64)
    )


def test_check_intrinsics_accepts_good_and_names_bad_values():
    assert check_intrinsics(INTR) is INTR
    with pytest.raises(ShapeError, match=r"intrinsics: expected \(\.\.\., 4\), got \(3, 3\)"):
        check_intrinsics(torch.eye(3))
    bad = INTR.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(
        ShapeError, match=r"expected finite values, got \[200\.0, 220\.0, nan, 100\.0\] at index \(1,\)"
    ):
        check_intrinsics(bad)
    bad = INTR.clone()
    bad[1, 1] = 0.0
    with pytest.raises(ShapeError, match=r"fx > 0 and fy > 0, got fx=200\.0, fy=0\.0 at index \(1,\)"):
        check_intrinsics(bad)
    with pytest.raises(ShapeError, match=r"fx=-1\.0"):
        check_intrinsics(torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ShapeError, match="expected a torch.Tensor"):
        check_intrinsics([1.0, 1.0, 0.0, 0.0])


# --------------------------------------------------------------------------------------------------
# poses and reprojection


def test_relative_pose_and_rt_matrix():
    Ti = se3_random(6, generator=_gen(3), dtype=F64)
    Tj = se3_random(6, generator=_gen(4), dtype=F64)
    Xw = torch.randn(6, 3, generator=_gen(5), dtype=F64)
    Tij = relative_pose(Ti, Tj)
    torch.testing.assert_close(se3_act(Tij, se3_act(Ti, Xw)), se3_act(Tj, Xw))
    Rt = pose_to_rt(Tij)
    assert Rt.shape == (6, 3, 4)
    Xi = se3_act(Ti, Xw)
    torch.testing.assert_close(Rt[..., :3] @ Xi[..., None] + Rt[..., 3:], se3_act(Tj, Xw)[..., None])


def test_reproject_with_identical_poses_gives_pixel_grid():
    inv_depth = 0.1 + torch.rand(2, 6, 7, generator=_gen(6), dtype=F64)
    T = se3_random(2, generator=_gen(7), dtype=F64)
    coords, depth_j = reproject(inv_depth, T, T, INTR)
    torch.testing.assert_close(coords, pixel_grid(6, 7, dtype=F64).expand(2, 6, 7, 2), atol=1e-10, rtol=0)
    torch.testing.assert_close(depth_j, 1.0 / inv_depth)


def test_reproject_sideways_translation_gives_analytic_disparity():
    """Fronto-parallel plane at depth Z, camera j shifted by b along x: u_j = u - fx b / Z, v_j = v."""
    Z, b = 4.0, 0.3
    H, W = 5, 8
    inv_depth = torch.full((H, W), 1.0 / Z, dtype=F64)
    coords, depth_j = reproject(inv_depth, se3_identity(dtype=F64), _pose_translated([b, 0.0, 0.0]), INTR[0])
    grid = pixel_grid(H, W, dtype=F64)
    torch.testing.assert_close(coords[..., 0], grid[..., 0] - INTR[0, 0] * b / Z)
    torch.testing.assert_close(coords[..., 1], grid[..., 1])
    torch.testing.assert_close(depth_j, torch.full((H, W), Z, dtype=F64))


def test_reproject_forward_translation_scales_about_principal_point():
    """Camera j moved forward by dz towards a plane at depth Z: offsets from (cx, cy) grow by Z / (Z - dz)."""
    Z, dz = 5.0, 1.0
    inv_depth = torch.full((4, 6), 1.0 / Z, dtype=F64)
    coords, depth_j = reproject(inv_depth, se3_identity(dtype=F64), _pose_translated([0.0, 0.0, dz]), INTR[1])
    c = INTR[1, 2:]
    torch.testing.assert_close(coords - c, (pixel_grid(4, 6, dtype=F64) - c) * Z / (Z - dz))
    torch.testing.assert_close(depth_j, torch.full((4, 6), Z - dz, dtype=F64))


def test_reproject_matches_explicit_world_round_trip_with_broadcasting():
    """coords = project(T_j T_i^-1 backproject(x, d)); one inverse-depth map against 3 target poses."""
    inv_depth = 0.2 + torch.rand(5, 6, generator=_gen(8), dtype=F64)
    Ti = se3_random(1, rot_scale=0.2, trans_scale=0.2, generator=_gen(9), dtype=F64)
    Tj = se3_random(3, rot_scale=0.2, trans_scale=0.2, generator=_gen(10), dtype=F64)
    coords, depth_j = reproject(inv_depth, Ti, Tj, INTR[0])
    assert coords.shape == (3, 5, 6, 2) and depth_j.shape == (3, 5, 6)
    X_world = se3_act(se3_inv(Ti)[:, None, None, :], backproject_inv(inv_depth, INTR[0]))
    X_j = se3_act(Tj[:, None, None, :], X_world)
    torch.testing.assert_close(coords, project(X_j, INTR[0]))
    torch.testing.assert_close(depth_j, X_j[..., 2])


def test_reproject_gradcheck():
    inv_depth = 0.3 + torch.rand(1, 2, 3, generator=_gen(11), dtype=F64)
    Ti = se3_exp(0.1 * torch.randn(1, 6, generator=_gen(12), dtype=F64))
    Tj = se3_exp(0.1 * torch.randn(1, 6, generator=_gen(13), dtype=F64))
    intr = torch.tensor([[3.0, 3.5, 1.0, 0.5]], dtype=F64)
    inputs = tuple(x.clone().requires_grad_() for x in (inv_depth, Ti, Tj, intr))
    assert gradcheck(reproject, inputs)


def test_points_at_infinity_reproject_to_finite_coordinates():
    """inv_depth = 0 still has a well-defined image (only the rotation acts); depth_j is infinite."""
    Tj = se3_exp(torch.tensor([0.5, 0.0, 0.0, 0.0, 0.05, 0.0], dtype=F64))
    coords, depth_j = reproject(torch.zeros(3, 4, dtype=F64), se3_identity(dtype=F64), Tj, INTR[0])
    assert torch.isfinite(coords).all()
    assert torch.isinf(depth_j).all()
    rot_only = Tj.clone()
    rot_only[:3] = 0
    any_depth = torch.full((3, 4), 0.5, dtype=F64)
    torch.testing.assert_close(coords, reproject(any_depth, se3_identity(dtype=F64), rot_only, INTR[0])[0])


# --------------------------------------------------------------------------------------------------
# validity masks


def test_in_front_and_in_image():
    assert in_front(torch.tensor([-1.0, 0.05, 0.2, float("nan")]), 0.1).tolist() == [
        False,
        False,
        True,
        False,
    ]
    coords = torch.tensor(
        [[0.0, 0.0], [9.0, 4.0], [9.01, 2.0], [-0.01, 2.0], [3.0, 4.5], [float("nan"), 1.0], [1.0, 1.0]]
    )
    assert in_image(coords, 5, 10).tolist() == [True, True, False, False, False, False, True]
    assert in_image(coords, 5, 10, margin=1.0).tolist() == [False, False, False, False, False, False, True]


def test_valid_reprojection_rejects_points_behind_camera_outside_image_and_bad_depth():
    """Camera j turned by 180 degrees sees nothing; a sideways shift pushes one border column out."""
    H, W = 4, 6
    inv_depth = torch.full((H, W), 0.5, dtype=F64)
    inv_depth[2, 3] = (
        0.0  # at infinity: lands inside the image with depth_j = inf, only inv_depth > 0 rejects it
    )
    inv_depth[1, 1] = -0.5
    flipped = se3_exp(torch.tensor([0.0, 0.0, 0.0, 0.0, torch.pi, 0.0], dtype=F64))
    coords, depth_j = reproject(inv_depth, se3_identity(dtype=F64), flipped, INTR[0])
    assert not valid_reprojection(inv_depth, coords, depth_j, min_depth=0.1).any()

    # fx b / Z = 200 * 0.005 * 0.5 = 0.5 pixel to the left: column 0 leaves [0, W - 1], the rest stay
    intr = torch.tensor([200.0, 200.0, 2.5, 1.5], dtype=F64)
    coords, depth_j = reproject(inv_depth, se3_identity(dtype=F64), _pose_translated([0.005, 0.0, 0.0]), intr)
    valid = valid_reprojection(inv_depth, coords, depth_j, min_depth=0.1)
    expected = torch.ones(H, W, dtype=torch.bool)
    expected[:, 0] = False
    expected[1, 1] = False  # negative inverse depth
    expected[2, 3] = False
    assert valid.tolist() == expected.tolist()
    assert not valid_reprojection(inv_depth, coords, depth_j, min_depth=2.5).any()  # all at depth 2


# --------------------------------------------------------------------------------------------------
# shape errors


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: backproject(torch.ones(4, 5), torch.ones(3)),
            r"^intrinsics: expected \(\.\.\., 4\), got \(3,\)",
        ),
        (lambda: backproject(torch.ones(5), INTR[0]), r"^depth: expected \(\.\.\., H, W\), got \(5,\)"),
        (lambda: backproject(torch.ones(3, 4, 5), INTR), r"depth \(3, 4, 5\) and intrinsics \(2, 1, 4\)"),
        (lambda: project(torch.ones(4, 2), INTR[0]), r"^points: expected \(\.\.\., 3\), got \(4, 2\)"),
        (
            lambda: reproject(torch.ones(4, 5), torch.ones(6), se3_identity(), INTR[0]),
            r"^poses_cw_i: expected",
        ),
        (lambda: pose_to_rt(torch.ones(2, 6)), r"^T: expected \(\.\.\., 7\), got \(2, 6\)"),
        (lambda: intrinsics_from_matrix(torch.ones(3, 4)), r"^K: expected \(\.\.\., 3, 3\), got \(3, 4\)"),
        (lambda: in_image(torch.ones(4, 3), 5, 5), r"^coords: expected \(\.\.\., 2\)"),
        (lambda: resize_intrinsics(INTR, (0, 10), (5, 5)), r"sizes must be positive"),
    ],
)
def test_wrong_shapes_raise_shape_error(call, message):
    with pytest.raises(ShapeError, match=message):
        call()
