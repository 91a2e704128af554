"""staged_output: a run's outputs appear all at once on success and not at all on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from v2d.errors import InputError
from v2d.io.writers import ensure_dir, staged_output, write_json, write_text


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> content of every file under root (directories implied)."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _write_run(stage: Path, tag: str, depth_names: list[str]) -> None:
    write_json(stage / "summary.json", {"run": tag})
    depth = ensure_dir(stage / "depth")
    for name in depth_names:
        write_text(depth / name, tag)


def test_success_into_a_new_directory(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with staged_output(out) as stage:
        assert stage.parent == out.parent and stage.name.startswith(".out.partial-") and not out.exists()
        _write_run(stage, "new", ["0.png", "1.png"])
    assert _tree(out) == {"summary.json": '{\n  "run": "new"\n}\n', "depth/0.png": "new", "depth/1.png": "new"}
    assert os.listdir(out.parent) == ["out"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def test_rerun_replaces_outputs_and_keeps_unrelated_files(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as stage:
        _write_run(stage, "old", ["0.png", "1.png", "2.png"])
    write_text(out / "notes.txt", "mine")
    with staged_output(out) as stage:
        _write_run(stage, "new", ["0.png"])
    assert _tree(out) == {"summary.json": '{\n  "run": "new"\n}\n', "depth/0.png": "new", "notes.txt": "mine"}
    assert os.listdir(tmp_path) == ["out"]


def test_a_file_replaced_by_a_directory_and_back(tmp_path):
    out = ensure_dir(tmp_path / "out")
    write_text(out / "depth", "a file where the run puts a directory")
    ensure_dir(out / "summary.json")
    with staged_output(out) as stage:
        _write_run(stage, "new", ["0.png"])
    assert _tree(out) == {"summary.json": '{\n  "run": "new"\n}\n', "depth/0.png": "new"}


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_nothing_behind(tmp_path, error):
    out = tmp_path / "new" / "out"
    with pytest.raises(error), staged_output(out) as stage:
        _write_run(stage, "new", ["0.png"])
        raise error("tracking failed")
    assert os.listdir(tmp_path) == []  # neither out nor the parent created for it, nor a stage

    old = tmp_path / "old"
    with staged_output(old) as stage:
        _write_run(stage, "old", ["0.png", "1.png"])
    before = _tree(old)
    with pytest.raises(error), staged_output(old) as stage:
        _write_run(stage, "new", ["0.png"])
        raise error("tracking failed")
    assert _tree(old) == before and os.listdir(tmp_path) == ["old"]


def test_output_that_is_a_file_is_an_input_error(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(InputError, match=f"output directory {f} is not a directory"):
        with staged_output(f):
            pytest.fail("the body must not run")
    with pytest.raises(InputError, match=f"output directory {f / 'sub'} is not a directory"):
        with staged_output(f / "sub"):
            pytest.fail("the body must not run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_is_an_input_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for out in (locked, locked / "out", locked / "a" / "out"):
            with pytest.raises(InputError, match=f"output directory {out} is not writable"):
                with staged_output(out):
                    pytest.fail("the body must not run")
    finally:
        locked.chmod(0o755)
    assert os.listdir(locked) == []


def test_unwritable_output_is_checked_with_os_access(tmp_path, monkeypatch):
    """The same check as above, where the tests run as root (which may write anywhere)."""
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    for out in (tmp_path, tmp_path / "a" / "out"):
        with pytest.raises(InputError, match=f"output directory {out} is not writable"):
            with staged_output(out):
                pytest.fail("the body must not run")
    assert os.listdir(tmp_path) == []


def test_existing_output_in_an_unwritable_parent_is_staged_inside(tmp_path, monkeypatch):
    out = ensure_dir(tmp_path / "home")
    write_text(out / "keep.txt", "mine")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with staged_output(out) as stage:
        assert stage.parent == out
        _write_run(stage, "new", ["0.png"])
    assert _tree(out) == {"summary.json": '{\n  "run": "new"\n}\n', "depth/0.png": "new", "keep.txt": "mine"}
    assert os.listdir(tmp_path) == ["home"]
