"""Test-time refinement's building blocks (v2d.adapt): two-view triangulation, the multi-view
consistent points, the neighbour views, and an adapter that undoes a damaged depth module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v2d.adapt import AdaptScene, DepthAdapter, RefineConfig, neighbour_views, triangulate
from v2d.data.synthetic import render_sequence
from v2d.errors import ShapeError
from v2d.geometry.camera import reproject
from v2d.geometry.lie import se3_exp
from v2d.metrics import depth_metrics


@pytest.fixture(scope="module")
def seq():
    return render_sequence(seed=3, num_frames=13, height=96, width=128)


def _scene(seq, frames, depths=None) -> AdaptScene:
    images = np.stack([np.asarray(seq.images[f]) for f in frames])
    gt = np.stack([np.asarray(seq.depths[f], dtype=np.float32) for f in frames])
    return AdaptScene(images, seq.poses_cw[frames].double(), seq.intrinsics.double(),
                      gt if depths is None else depths)


def test_triangulation_recovers_depth_parallax_and_epipolar_error():
    torch.manual_seed(0)
    intr = torch.tensor([100.0, 100.0, 63.5, 47.5], dtype=torch.float64)
    pose_i = se3_exp(torch.tensor([0.0, 0.0, 0.0, 0.02, -0.01, 0.0], dtype=torch.float64))
    pose_j = se3_exp(torch.tensor([0.3, 0.05, 0.0, 0.01, 0.05, 0.02], dtype=torch.float64))
    depth = 1.5 + torch.rand(96, 128, dtype=torch.float64) * 3
    coords, _ = reproject(1.0 / depth, pose_i, pose_j, intr)
    v, u = torch.meshgrid(torch.arange(96.0, dtype=torch.float64), torch.arange(128.0, dtype=torch.float64),
                          indexing="ij")
    ci = torch.stack([u, v], -1)
    z, par, epi = triangulate(ci, coords, pose_i, pose_j, intr)
    assert torch.allclose(z, depth, rtol=1e-9)
    assert float(epi.max()) < 1e-6
    # a 0.3 m baseline at 1.5-4.5 m: between 2*atan(0.15/4.5) and 2*atan(0.15/1.5) at most, some degrees
    assert 2.0 < float(par.median()) < 12.0
    # a match moved along the image's x axis: off the epipolar line (nearly horizontal here) by less
    # than the move, and the depth changes
    z2, _, epi2 = triangulate(ci, coords + torch.tensor([0.0, 2.0], dtype=torch.float64), pose_i, pose_j, intr)
    assert float(epi2.median()) > 1.0
    assert float(((z2 - depth).abs() / depth).median()) > 1e-3
    # no baseline: no point passes the filter sparse_targets applies (positive depth, some parallax)
    z3, par3, _ = triangulate(ci, ci, pose_i, pose_i, intr)
    assert not bool(((z3 > 1e-3) & (par3 >= 0.1)).any())


def test_sparse_points_match_the_ground_truth_depth(seq):
    frames = [0, 3, 6, 9, 12]
    scene = _scene(seq, frames)
    cfg = RefineConfig()
    ad = DepthAdapter(_tiny_depth(), scene, cfg)
    ad.prepare()
    pix, z = ad.targets[2]
    assert len(z) > 0.05 * 96 * 128  # a textured synthetic scene: many points
    gt = torch.from_numpy(scene.depths[2])[pix[:, 0], pix[:, 1]]
    rel = ((z - gt).abs() / gt)
    assert float(rel.median()) < 0.02 and float((rel < 0.1).float().mean()) > 0.9
    # without the depth-edge filter, the background beside near objects comes out too near
    unfiltered = DepthAdapter(_tiny_depth(), scene, RefineConfig(flow_edge=0.0))
    unfiltered.prepare()
    pix0, z0 = unfiltered.targets[2]
    rel0 = (z0 - torch.from_numpy(scene.depths[2])[pix0[:, 0], pix0[:, 1]]).abs() / \
        torch.from_numpy(scene.depths[2])[pix0[:, 0], pix0[:, 1]]
    assert len(z0) > len(z) and float(rel0.mean()) > 2 * float(rel.mean())
    # the points need two agreeing views: an end keyframe with one neighbour within reach 1 has none
    ad1 = DepthAdapter(_tiny_depth(), scene, RefineConfig(reach=1))
    ad1.prepare()
    assert 0 not in ad1.targets and len(ad1.targets[2][1]) > 0


def test_neighbour_views_stay_in_their_segment():
    views = neighbour_views([[0, 1, 2, 3, 4], [5, 6], [7]], 3)
    assert views[0] == [1, 2, 3] and views[2] == [1, 3, 0] and views[4] == [3, 2, 1]
    assert views[5] == [6] and views[6] == [5] and views[7] == []


def test_scene_rejects_bad_input(seq):
    scene = _scene(seq, [0, 3])
    with pytest.raises(ShapeError):
        AdaptScene(scene.images, scene.poses_cw[:1], scene.intrinsics, scene.depths)
    with pytest.raises(ShapeError):
        AdaptScene(scene.images, scene.poses_cw, scene.intrinsics, scene.depths[:, :10])
    with pytest.raises(ShapeError):
        AdaptScene(scene.images, scene.poses_cw, scene.intrinsics, scene.depths, segments=[[0]])


def _tiny_depth():
    from v2d.depth import DepthConfig, DepthModule

    torch.manual_seed(0)
    return DepthModule(DepthConfig(hypotheses=16))


def _abs_rel(depths: dict[int, torch.Tensor], scene: AdaptScene) -> float:
    return float(np.mean([depth_metrics(depths[k].numpy(), scene.depths[k])["abs_rel"] for k in depths]))


def test_refinement_undoes_a_damaged_depth_module(seq):
    """The shipped depth module with its matching damaged: refinement on the video alone (no ground
    truth) brings its depth AbsRel well down, and the held-out check sees it."""
    from slam.config import RunConfig
    from v2d.model import load_model

    model = load_model(RunConfig())
    torch.manual_seed(1)
    with torch.no_grad():  # noise of 0.3 x each weight tensor's spread on the 3D matching and the heads
        for p in [*model.depth.matching.parameters(), *model.depth.heads.parameters()]:
            if p.dim() > 1:
                p.add_(0.3 * p.std() * torch.randn_like(p))
    frames = [0, 2, 4, 6, 8, 10, 12]
    gt = _scene(seq, frames)
    # the run's depth came from the damaged network: the prior pulls toward it, not toward the truth
    probe = DepthAdapter(model.depth, gt, RefineConfig())
    damaged = probe.predict()
    scene = _scene(seq, frames, np.stack([damaged[k].numpy() for k in range(len(frames))]))
    ad = DepthAdapter(model.depth, scene, RefineConfig(steps=60, lr=3e-4, validation_every=3))
    report = ad.fit()
    before, after = _abs_rel(damaged, gt), _abs_rel(ad.predict(), gt)
    assert after < 0.9 * before, (before, after)  # measured: 0.084 -> 0.071
    assert report.improved and report.error_adapted < report.error_network
    assert report.steps == 60 and report.loss_last < report.loss_first
    # the module passed in is not changed
    assert torch.equal(probe.predict()[0], damaged[0])
