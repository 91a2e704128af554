"""Streaming frame input: exact lengths, order, resizing, one-pass videos, and clear errors for bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from v2d.errors import InputError
from v2d.io.datasets import iter_frames, open_sequence, parse_intrinsics, parse_size, select_frames

H, W = 48, 64
N = 9


def _frame(k: int, h: int = H, w: int = W) -> np.ndarray:
    """RGB frame whose mean brightness encodes k (survives MJPG compression and area resizing)."""
    img = np.full((h, w, 3), 20 + 20 * k, dtype=np.uint8)
    img[..., 2] = 10  # distinct channels: catches BGR/RGB swaps
    return img


def _brightness(rgb: np.ndarray) -> int:
    return round((float(rgb[..., 0].mean()) - 20) / 20)


def write_folder(root: Path, n: int = N) -> Path:
    root.mkdir(parents=True)
    for k in range(n):
        cv2.imwrite(str(root / f"{k:04d}.png"), cv2.cvtColor(_frame(k), cv2.COLOR_RGB2BGR))
    return root


def write_video(path: Path, n: int = N) -> Path:
    fourcc = "MJPG" if path.suffix == ".avi" else "mp4v"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 30, (W, H))
    for k in range(n):
        out.write(cv2.cvtColor(_frame(k), cv2.COLOR_RGB2BGR))
    out.release()
    return path


@pytest.fixture(params=["folder", "avi", "mp4"])
def source(request, tmp_path) -> Path:
    if request.param == "folder":
        return write_folder(tmp_path / "imgs")
    return write_video(tmp_path / f"clip.{request.param}")


def test_streams_the_selected_frames_in_order_resized(source):
    seq = open_sequence(source, require_intrinsics=False)
    assert len(seq) == N and seq.intrinsics is None
    np.testing.assert_array_equal(seq.timestamps, np.arange(N))
    idx = list(select_frames(len(seq), stride=3))  # a range
    assert idx == [0, 3, 6]
    frames = list(iter_frames(seq, idx))
    assert [k for k, _ in frames] == idx
    assert all(rgb.shape == (H, W, 3) and rgb.dtype == np.uint8 for _, rgb in frames)
    assert [_brightness(rgb) for _, rgb in frames] == idx
    assert all(float(rgb[..., 2].mean()) < 15 for _, rgb in frames)  # RGB order, not BGR (blue is 10)
    small = list(iter_frames(seq, [1, 8], size=(32, 40)))
    assert [k for k, _ in small] == [1, 8] and all(rgb.shape == (32, 40, 3) for _, rgb in small)
    assert [_brightness(rgb) for _, rgb in small] == [1, 8]


def count_decoding(monkeypatch) -> list[int]:
    """Patch cv2.VideoCapture to count the frames each capture decodes (successful grab and read
    calls); returns the counts, one per capture in opening order."""
    real = cv2.VideoCapture
    counts: list[int] = []

    class CountingCapture:
        def __init__(self, *args) -> None:
            self._cap, self._i = real(*args), len(counts)
            counts.append(0)

        def grab(self) -> bool:
            ok = self._cap.grab()
            counts[self._i] += ok
            return ok

        def read(self) -> tuple[bool, np.ndarray | None]:
            ok, bgr = self._cap.read()
            counts[self._i] += ok
            return ok, bgr

        def __getattr__(self, name: str):
            return getattr(self._cap, name)

    monkeypatch.setattr(cv2, "VideoCapture", CountingCapture)
    return counts


def test_video_length_is_learnt_by_streaming_it_once(tmp_path, monkeypatch):
    """Opening a video decodes nothing; an open-ended selection streams it once, to its end, and then
    its length is known; --max-frames stops the decoding at the last selected frame."""
    path = write_video(tmp_path / "clip.avi")
    counts = count_decoding(monkeypatch)
    seq = open_sequence(path, require_intrinsics=False)
    assert seq.num_frames is None and seq.frame_count_estimate == N and counts == [0]
    assert [k for k, _ in iter_frames(seq, select_frames(seq.num_frames, stride=4))] == [0, 4, 8]
    assert counts == [0, N]  # every frame decoded once
    assert seq.num_frames == N and len(seq) == N and len(counts) == 2
    np.testing.assert_array_equal(seq.frame_timestamps([0, 4, 8]), [0, 4, 8])

    seq = open_sequence(path, require_intrinsics=False)
    assert [k for k, _ in iter_frames(seq, select_frames(None, stride=2, max_frames=3))] == [0, 2, 4]
    assert counts[-1] == 5 and seq.num_frames is None  # stopped at frame 4, length still unknown
    with pytest.raises(InputError, match=r"must increase and be >= 0, got \[-1, 2\]"):
        list(iter_frames(seq, [-1, 2]))
    assert len(seq) == N and counts[-1] == N  # len() counts on demand, with a pass of its own


def test_one_video_frame_is_the_streamed_frame(tmp_path):
    seq = open_sequence(write_video(tmp_path / "clip.avi"), intrinsics=[50.0, 50.0, 32.0, 24.0])
    streamed = dict(iter_frames(seq, range(N)))
    for k in (0, 4, N - 1):
        assert np.array_equal(seq.image(k), streamed[k]) and _brightness(seq.image(k)) == k
    seq.timestamps = np.arange(N + 2, dtype=np.float64)  # as if the file were truncated after opening
    with pytest.raises(InputError, match=f"cannot read video frame {N + 1}"):
        seq.image(N + 1)


def test_video_ending_early_stops_the_stream(tmp_path, caplog):
    seq = open_sequence(write_video(tmp_path / "clip.avi"), require_intrinsics=False)
    seq.timestamps = np.arange(N + 5, dtype=np.float64)  # as if the file were truncated after opening
    with caplog.at_level(logging.WARNING, logger="v2d.io.datasets"):
        assert [k for k, _ in iter_frames(seq, [2, N - 1, N + 1, N + 3])] == [2, N - 1]
    assert f"video ended after {N} frames, before frame {N + 1}" in caplog.text


def test_mixed_sizes_and_unreadable_images_name_the_file(tmp_path):
    root = write_folder(tmp_path / "imgs")
    cv2.imwrite(str(root / "0005.png"), _frame(5, H + 4, W))
    seq = open_sequence(root, require_intrinsics=False)
    assert len(list(iter_frames(seq, [0, 4]))) == 2
    with pytest.raises(InputError, match=rf"0005.png: image size {H + 4}x{W} differs from the first frame's "
                                         rf"{H}x{W} \(mixed sizes\)"):
        list(iter_frames(seq, [0, 5], size=(H + 4, W)))
    (root / "0007.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"cannot read image .*0007.png"):
        list(iter_frames(seq, [6, 7]))
    with pytest.raises(InputError, match="must increase"):
        list(iter_frames(seq, [3, 2]))
    with pytest.raises(InputError, match=rf"lie in \[0, {N}\)"):
        list(iter_frames(seq, [0, N]))


@pytest.mark.parametrize("name, data", [("empty.mp4", b""), ("notes.avi", b"this is not a video\n" * 50)])
def test_unreadable_video_is_an_input_error(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match=f"cannot read any frame from video {path}"):
        open_sequence(path, require_intrinsics=False)


def test_folder_without_images_is_an_input_error(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images, video or known dataset layout"):
        open_sequence(tmp_path / "docs", require_intrinsics=False)


def test_intrinsics_are_optional_only_when_allowed(tmp_path):
    root = write_folder(tmp_path / "imgs")
    with pytest.raises(InputError, match="no intrinsics given"):
        open_sequence(root)
    assert open_sequence(root, require_intrinsics=False).intrinsics is None
    (root / "intrinsics.txt").write_text("50 51 32 24\n")
    np.testing.assert_array_equal(open_sequence(root, require_intrinsics=False).intrinsics, [50, 51, 32, 24])
    np.testing.assert_array_equal(open_sequence(root, [60.0, 60.0, 30.0, 20.0]).intrinsics, [60, 60, 30, 20])


def test_tum_without_intrinsics(tmp_path):
    root = tmp_path / "tum"
    write_folder(root / "rgb")
    lines = [f"{100 + k / 30:.6f} rgb/{k:04d}.png" for k in range(N)]
    (root / "rgb.txt").write_text("# rgb\n" + "\n".join(lines) + "\n")
    with pytest.raises(InputError, match="TUM sequences carry no intrinsics"):
        open_sequence(root)
    seq = open_sequence(root, require_intrinsics=False)
    assert seq.layout == "tum" and len(seq) == N and seq.intrinsics is None


def test_select_frames():
    assert list(select_frames(10)) == list(range(10))
    assert list(select_frames(10, stride=4)) == [0, 4, 8]
    assert list(select_frames(10, stride=2, max_frames=3, start=1)) == [1, 3, 5]
    assert list(select_frames(3, start=5)) == []
    assert list(select_frames(None, stride=3, max_frames=4, start=2)) == [2, 5, 8, 11]  # length unknown
    assert select_frames(None, stride=3)[:3] == range(0, 9, 3)  # open-ended, not expanded
    for kwargs, quoted in (({"stride": 0}, "got 0"), ({"start": -1}, "got -1"), ({"max_frames": 0}, "got 0")):
        with pytest.raises(InputError, match=quoted):
            select_frames(10, **kwargs)


def test_parse_size():
    assert parse_size("240x320") == (240, 320)
    assert parse_size(" 32X64 ") == (32, 64)
    for bad in ("240", "240x", "x320", "240x322", "28x32", "-240x320", "240.0x320", "axb", "240x320x3", ""):
        with pytest.raises(InputError, match=f"got '{bad}'"):
            parse_size(bad)


def test_parse_intrinsics(tmp_path):
    np.testing.assert_array_equal(parse_intrinsics("500,501.5,320,240"), [500, 501.5, 320, 240])
    f = tmp_path / "K.txt"
    f.write_text("500 0 320\n0 500 240\n0 0 1\n")
    np.testing.assert_array_equal(parse_intrinsics(str(f)), [500, 500, 320, 240])
    for bad in ("500,500,320", "500,500,320,240,1", "a,b,c,d", "0,500,320,240", "500,-1,320,240",
                "nan,500,320,240", "500,500,inf,240", "", str(tmp_path / "missing.txt")):
        with pytest.raises(InputError, match=f"got '{bad}'"):
            parse_intrinsics(bad)
