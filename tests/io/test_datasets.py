"""Dataset readers: every layout round-trips a rendered synthetic sequence; bad data names the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from v2d.data.clips import ClipConfig
from v2d.data.synthetic import render_sequence
from v2d.errors import InputError
from v2d.geometry.lie import se3_inv, se3_mul
from v2d.io.datasets import SequenceClips, open_sequence, read_intrinsics

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
H, W = 48, 64


@pytest.fixture(scope="module")
def seq():
    return render_sequence(2, 7, height=H, width=W)


def _wc(seq) -> np.ndarray:
    """Camera-to-world 4x4 matrices of the synthetic poses."""
    from v2d.geometry.lie import quat_to_matrix

    p = se3_inv(seq.poses_cw)
    T = np.tile(np.eye(4), (len(p), 1, 1))
    T[:, :3, :3] = quat_to_matrix(p[:, 3:]).numpy()
    T[:, :3, 3] = p[:, :3].numpy()
    return T


def _bgr(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2BGR)


def write_7scenes(root: Path, seq) -> Path:
    root.mkdir(parents=True)
    for k, T in enumerate(_wc(seq)):
        cv2.imwrite(str(root / f"frame-{k:06d}.color.png"), _bgr(seq.images[k]))
        cv2.imwrite(str(root / f"frame-{k:06d}.depth.png"), np.round(seq.depths[k] * 1000).astype(np.uint16))
        np.savetxt(root / f"frame-{k:06d}.pose.txt", T)
    fx, fy, cx, cy = seq.intrinsics.tolist()
    np.savetxt(root / "camera-intrinsics.txt", [[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    return root


def write_tum(root: Path, seq) -> Path:
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    p = se3_inv(seq.poses_cw).numpy()
    rgb, dep, gt = ["# rgb"], ["# depth"], ["# gt"]
    for k in range(len(p)):
        t = 100.0 + k / 30
        cv2.imwrite(str(root / "rgb" / f"{t:.6f}.png"), _bgr(seq.images[k]))
        cv2.imwrite(str(root / "depth" / f"{t + 0.005:.6f}.png"), np.round(seq.depths[k] * 5000).astype(np.uint16))
        rgb.append(f"{t:.6f} rgb/{t:.6f}.png")
        dep.append(f"{t + 0.005:.6f} depth/{t + 0.005:.6f}.png")
        gt.append(f"{t + 0.001:.6f} " + " ".join(f"{v:.9f}" for v in p[k]))
    for name, lines in (("rgb.txt", rgb), ("depth.txt", dep), ("groundtruth.txt", gt)):
        (root / name).write_text("\n".join(lines) + "\n")
    (root / "intrinsics.txt").write_text(" ".join(map(str, seq.intrinsics.tolist())))
    return root


def write_scannet(root: Path, seq) -> Path:
    for d in ("color", "depth", "pose", "intrinsic"):
        (root / d).mkdir(parents=True)
    for k, T in enumerate(_wc(seq)):
        cv2.imwrite(str(root / "color" / f"{k}.png"), _bgr(seq.images[k]))
        cv2.imwrite(str(root / "depth" / f"{k}.png"), np.round(seq.depths[k] * 1000).astype(np.uint16))
        np.savetxt(root / "pose" / f"{k}.txt", T)
    K = np.eye(4)
    K[0, 0], K[1, 1], K[0, 2], K[1, 2] = seq.intrinsics.tolist()
    np.savetxt(root / "intrinsic" / "intrinsic_color.txt", K)
    return root


@pytest.mark.parametrize("writer, layout", [(write_7scenes, "7scenes"), (write_tum, "tum"),
                                            (write_scannet, "scannet")])
def test_layouts_round_trip_the_ground_truth(tmp_path, seq, writer, layout):
    s = open_sequence(writer(tmp_path / layout, seq))
    assert s.layout == layout and len(s) == 7
    np.testing.assert_allclose(s.intrinsics, seq.intrinsics.numpy())
    clips = SequenceClips(s, ClipConfig(frames=3, stride=2, keyframe="middle", flip=False, jitter=0.0), H, W)
    assert len(clips) == 7 - 4
    c = clips[1]  # frames 1, 3, 5 -> keyframe 3 first
    order = [3, 1, 5]
    assert c["images"].shape == (3, 3, H, W) and c["depths"].shape == (3, H, W)
    assert torch.equal((c["images"] * 255).round().byte().permute(0, 2, 3, 1),
                       torch.from_numpy(seq.images[order]))
    np.testing.assert_allclose(c["depths"].numpy(), seq.depths[order], atol=6e-4)  # mm / 0.2 mm storage
    rel = se3_mul(c["poses_cw"].double(), se3_inv(seq.poses_cw[order]))
    assert rel[:, :3].abs().max() < 1e-5 and (rel[:, 6].abs() - 1).abs().max() < 1e-6
    # With augmentation on, some clips come mirrored (cx moves to W - 1 - cx) and colours change.
    aug = SequenceClips(s, ClipConfig(frames=3, stride=2, flip=True, jitter=0.1), H, W, seed=1)
    items = [aug[k] for k in range(len(aug))] + [SequenceClips(s, aug.cfg, H, W, seed=2)[k] for k in range(3)]
    assert any(torch.allclose(it["intrinsics"][2], W - 1 - s.intrinsics[2] * torch.ones(())) for it in items)
    assert torch.equal(aug[1]["images"], aug[1]["images"])  # deterministic per (seed, k)


def test_image_folder_and_video_need_intrinsics(tmp_path, seq):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(7):
        cv2.imwrite(str(folder / f"{k:04d}.png"), _bgr(seq.images[k]))
    with pytest.raises(InputError, match="no intrinsics given"):
        open_sequence(folder)
    s = open_sequence(folder, intrinsics=[50.0, 50.0, 31.5, 23.5])
    assert s.layout == "images" and len(s) == 7 and s.image(2).shape == (H, W, 3) and s.depth(0) is None
    video = tmp_path / "clip.avi"
    out = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (W, H))
    for k in range(7):
        out.write(_bgr(seq.images[k]))
    out.release()
    (tmp_path / "intrinsics.txt").write_text("50 50 31.5 23.5\n")
    v = open_sequence(video)
    assert v.layout == "video" and len(v) == 7 and v.image(6).shape == (H, W, 3)
    with pytest.raises(InputError, match="training needs both"):
        SequenceClips(v, ClipConfig(), H, W)


def test_bad_data_names_the_file(tmp_path, seq):
    root = write_7scenes(tmp_path / "s", seq)
    (root / "frame-000003.depth.png").unlink()
    with pytest.raises(InputError, match=r"missing depth map: .*frame-000003.depth.png"):
        open_sequence(root)
    root = write_7scenes(tmp_path / "t", seq)
    (root / "frame-000002.color.png").write_bytes(b"garbage")
    s = open_sequence(root)
    with pytest.raises(InputError, match=r"cannot read image .*frame-000002.color.png"):
        SequenceClips(s, ClipConfig(frames=3, stride=1), H, W)[0]
    (root / "camera-intrinsics.txt").write_text("1 2 3\n")
    with pytest.raises(InputError, match="expected 4 numbers .* or a 3x3 matrix, got 3"):
        open_sequence(root)
    bad = tmp_path / "k.txt"
    bad.write_text("100 0 50 0 -100 40 0 0 1")
    with pytest.raises(InputError, match="positive focal lengths"):
        read_intrinsics(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images, video or known dataset layout"):
        open_sequence(tmp_path / "empty")
    with pytest.raises(InputError, match="input not found"):
        open_sequence(tmp_path / "nope")
    with pytest.raises(InputError, match="needs 9"):
        SequenceClips(open_sequence(write_7scenes(tmp_path / "u", seq)), ClipConfig(frames=5, stride=2), H, W)


@pytest.mark.skipif(not (SHARED / "7scenes-redkitchen").is_dir(), reason="needs ../shared/data/7scenes-redkitchen")
def test_reads_the_shared_7scenes_sequence():
    s = open_sequence(SHARED / "7scenes-redkitchen")
    assert s.layout == "7scenes" and len(s) == 500
    np.testing.assert_allclose(s.intrinsics, [585, 585, 320, 240])
    c = SequenceClips(s, ClipConfig(frames=5, stride=2, flip=False), 240, 320)[100]
    valid = c["depths"][c["depths"] > 0]
    assert c["images"].shape == (5, 3, 240, 320) and 0.3 < valid.median() < 5.0
    assert torch.allclose(c["intrinsics"], torch.tensor([292.5, 292.5, 159.75, 119.75]))
