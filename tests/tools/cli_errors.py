"""What every CLI test of a bad input checks: exactly one error line on stderr, naming the problem."""

from __future__ import annotations


def one_line_error(capsys, *needles: str) -> str:
    """The single non-log line on stderr (asserted), which must contain every needle."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert len(err) == 1, err
    assert "error: " in err[0], err[0]
    for n in needles:
        assert n in err[0], err[0]
    return err[0]
