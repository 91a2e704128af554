"""v2d.features: the XFeat weights (installed, hash-checked, reproducing a stored reference), clear
errors for missing or corrupt weight files, and what registration relies on from each kind of
feature (matches that follow the image content, retrieval by appearance)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from v2d.errors import InputError, ShapeError
from v2d.features import FEATURE_KINDS, WEIGHTS, check_weights, make_extractor, weights_folder

REFERENCE = Path(__file__).parent / "reference" / "xfeat_keypoints.npz"


def fixed_image(h: int = 240, w: int = 320) -> np.ndarray:
    """A deterministic textured image (OpenCV drawing from a seeded generator): the reference input.

    Shapes: -> (h, w, 3) uint8 RGB.
    """
    import cv2

    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 128, np.uint8)
    for _ in range(120):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, [w, h]))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(3, 25)), colour, -1)
        else:
            dx, dy = (int(v) for v in rng.integers(4, 40, 2))
            cv2.rectangle(img, (x, y), (x + dx, y + dy), colour, -1)
    return img


@pytest.fixture(scope="module")
def xfeat():
    return make_extractor("xfeat", 500)


def test_installed_weights_pass_the_checksum():
    paths = check_weights()
    assert set(paths) == set(WEIGHTS) == {"xfeat", "lighterglue"}
    for name, path in paths.items():
        assert path.parent == weights_folder() and path.name == WEIGHTS[name][0] and path.stat().st_size > 1_000_000


def test_weights_reproduce_the_stored_reference_keypoints(xfeat):
    """kornia's XFeat with the installed weights finds the keypoints and descriptors stored when the
    pins were set (regenerate with `python -m tests.test_features` after a deliberate upgrade)."""
    ref = np.load(REFERENCE)
    feats = xfeat.extract(fixed_image())
    assert len(feats) == int(ref["count"])
    k = len(ref["keypoints"])
    np.testing.assert_allclose(feats.keypoints[:k], ref["keypoints"], atol=1e-3)
    cos = (feats.descriptors[:k].astype(np.float32) * ref["descriptors"].astype(np.float32)).sum(1)
    assert cos.min() > 0.999, cos.min()


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_a_missing_weight_file_is_one_clear_error(tmp_path, name):
    for other, (file, _) in WEIGHTS.items():  # a folder with every file but one
        if other != name:
            shutil.copy(weights_folder() / file, tmp_path / file)
    missing = tmp_path / WEIGHTS[name][0]
    with pytest.raises(InputError, match="missing") as e:
        make_extractor("xfeat", 100, weights=tmp_path)
    assert str(missing) in str(e.value) and "requirements-weights.txt" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncated"])
def test_a_corrupt_weight_file_is_one_clear_error(tmp_path, content):
    file, sha = WEIGHTS["xfeat"]
    bad = tmp_path / file
    bad.write_bytes((weights_folder() / file).read_bytes()[:1000] if content == "truncated" else content)
    with pytest.raises(InputError, match="corrupt") as e:
        check_weights(tmp_path, ("xfeat",))
    assert str(bad) in str(e.value) and sha[:12] in str(e.value) and "reinstall" in str(e.value)


def test_plain_matching_needs_no_lighterglue_file(tmp_path):
    file = WEIGHTS["xfeat"][0]
    shutil.copy(weights_folder() / file, tmp_path / file)
    ex = make_extractor("xfeat", 100, weights=tmp_path, careful=False)
    assert not ex.has_careful_match


def test_unknown_kind_is_an_error():
    with pytest.raises(InputError, match="unknown kind 'sift'"):
        make_extractor("sift", 100)


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_bad_images_are_refused(kind):
    ex = make_extractor(kind, 100)
    for bad in (np.zeros((24, 32), np.uint8), np.zeros((24, 32, 3), np.float32), np.zeros((24, 32, 4), np.uint8)):
        with pytest.raises(ShapeError, match="features"):
            ex.extract(bad)


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_matches_follow_a_shift_of_the_image(kind):
    """The image moved by (12, 7) px: most matches say so, within 3 px (what PnP-RANSAC relies on;
    XFeat's keypoints come from a heatmap on 8x8 cells and are not shift-equivariant to the pixel:
    about 80 % of its matches land within 3 px here, ORB's 97 %)."""
    img = fixed_image(272, 352)
    a, b = img[16:256, 8:328], img[23:263, 20:340]  # b's pixel (x, y) is a's (x + 12, y + 7)
    ex = make_extractor(kind, 500)
    fa, fb = ex.extract(np.ascontiguousarray(a)), ex.extract(np.ascontiguousarray(b))
    pairs = ex.match(fa, fb)
    assert len(pairs) >= 100, len(pairs)
    d = fa.keypoints[pairs[:, 0]] - fb.keypoints[pairs[:, 1]]
    right = np.linalg.norm(d - np.array([12.0, 7.0]), axis=1) < 3.0
    assert right.mean() > 0.7, right.mean()
    assert ex.match(fa, ex.extract(np.full_like(a, 128))).shape == (0, 2)  # a blank image: no keypoints


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_careful_matching_follows_a_shift_too(kind):
    img = fixed_image(272, 352)
    a, b = img[16:256, 8:328], img[23:263, 20:340]
    ex = make_extractor(kind, 500)
    fa, fb = ex.extract(np.ascontiguousarray(a)), ex.extract(np.ascontiguousarray(b))
    pairs = ex.careful_match(fa, fb, (240, 320))
    assert ex.has_careful_match == (kind == "xfeat") and len(pairs) >= 100
    d = fa.keypoints[pairs[:, 0]] - fb.keypoints[pairs[:, 1]]
    assert (np.linalg.norm(d - np.array([12.0, 7.0]), axis=1) < 3.0).mean() > 0.8


@pytest.mark.parametrize("kind", FEATURE_KINDS)
def test_global_descriptors_rank_the_same_place_first(kind):
    img = fixed_image(272, 352)
    other = np.ascontiguousarray(fixed_image(240, 320)[::-1, ::-1])  # the same kind of texture, another layout
    ex = make_extractor(kind, 500)
    query = ex.extract(np.ascontiguousarray(img[20:260, 12:332]))
    near, far = ex.extract(np.ascontiguousarray(img[16:256, 8:328])), ex.extract(other)
    sims = ex.similarity(query, [far, near])
    assert sims.shape == (2,) and sims[1] > sims[0]
    assert abs(float(np.linalg.norm(query.global_desc)) - 1.0) < 1e-5


def _write_reference() -> None:
    feats = make_extractor("xfeat", 500).extract(fixed_image())
    np.savez_compressed(REFERENCE, count=len(feats), keypoints=feats.keypoints[:100],
                        descriptors=feats.descriptors[:100])
    print(f"wrote {REFERENCE}: {len(feats)} keypoints, the first 100 stored")


if __name__ == "__main__":
    _write_reference()
