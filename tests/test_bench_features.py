"""bench/features.py: the smoke run (the rendered 60-degree pair) registers with LighterGlue only."""

from __future__ import annotations

import json

from bench import features


def test_smoke_run_writes_every_method(tmp_path, capsys):
    out = tmp_path / "features.json"
    assert features.main(["--synthetic", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {f"jump-60deg/{m}" for m in features.METHODS}
    assert res["jump-60deg/xfeat+lg"]["good"] == 1 and res["jump-60deg/orb"]["registered"] == 0
    for r in res.values():
        assert r["pairs"] == 1 and r["extract_ms"] > 0
    assert "xfeat+lg" in capsys.readouterr().out
