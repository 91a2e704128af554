"""staged_output: a run's outputs appear all at once on success and not at all on failure; the stages
of killed runs are removed by the next run into the same place, and only those."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
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


# --------------------------------------------------------------------------------------------------
# stale stages of killed runs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _with_field(name: str, index: int, value: str) -> str:
    """A stage name `.NAME.partial-HOST-BOOT-PID-START-XXXXXXXX` with field `index` (0 = HOST) replaced."""
    head, fields = name.split(".partial-")
    parts = fields.split("-")
    parts[index] = value
    return head + ".partial-" + "-".join(parts)


def test_stale_stages_of_dead_runs_are_removed_and_live_ones_kept(tmp_path, caplog):
    out = tmp_path / "out"
    with staged_output(out) as live:  # this process's stage: its owner is alive
        write_text(live / "summary.json", "live")
        fields = live.name.split(".partial-")[1].split("-")
        assert fields[2] == str(os.getpid())
        dead = tmp_path / _with_field(live.name, 2, str(_dead_pid()))
        reused = tmp_path / _with_field(live.name, 3, str(int(fields[3]) + 1))  # a live pid, another start time
        rebooted = tmp_path / _with_field(live.name, 1, "0123abcd")
        foreign = tmp_path / _with_field(_with_field(live.name, 0, "0123abcd"), 2, str(_dead_pid()))
        for stale in (dead, reused, rebooted, foreign):
            ensure_dir(stale / "depth")
            write_text(stale / "depth" / "0.png", "partial")
        kept = [foreign,  # another machine or PID namespace: its pids say nothing here
                tmp_path / ".out.partial-abc123",  # not the pattern (e.g. an older v2d)
                tmp_path / _with_field(dead.name.replace(".out.", ".other."), 2, str(_dead_pid())),  # another output
                tmp_path / (dead.name + "x")]
        for k in kept[1:]:
            k.mkdir()
        a_file = tmp_path / _with_field(live.name, 2, str(_dead_pid()))
        a_file.write_text("a file, not a stage")
        with caplog.at_level(logging.INFO, logger="v2d.io.writers"), staged_output(out) as stage:
            write_text(stage / "summary.json", "second")
        assert out.is_dir() and (out / "summary.json").read_text() == "second"
        assert live.is_dir() and (live / "summary.json").read_text() == "live"
        assert not dead.exists() and not reused.exists() and not rebooted.exists()
        assert all(k.exists() for k in kept) and a_file.read_text() == "a file, not a stage"
        removed = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert len(removed) == 3 and all("removed the stale staging directory" in m for m in removed)
        assert any(str(dead) in m and "is gone" in m for m in removed)
        assert any(str(rebooted) in m and "rebooted" in m for m in removed)


def test_the_stage_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time\nfrom v2d.io.writers import staged_output, write_text\n"
            f"with staged_output({str(out)!r}) as stage:\n"
            "    write_text(stage / 'summary.json', 'killed')\n"
            "    print(stage, flush=True)\n"
            "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.PIPE, text=True)
    try:
        stage = Path(proc.stdout.readline().strip())
        assert (stage / "summary.json").read_text() == "killed"
        proc.kill()  # SIGKILL: no finally block, no cleanup in the child
        # wait for it to die without reaping it: a zombie until proc.wait() (its pid is still taken)
        assert os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT).si_status == signal.SIGKILL
        assert stage.is_dir() and not out.exists()
        with staged_output(out) as new:
            write_text(new / "summary.json", "next")
        assert not stage.exists() and os.listdir(tmp_path) == ["out"]
        assert (out / "summary.json").read_text() == "next"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
