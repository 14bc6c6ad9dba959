"""training.step_times: the wrapper `make train-export` times its steps with, and the table it ends with."""
from __future__ import annotations

import sys
from pathlib import Path

from training.step_times import main, read_session


def test_steps_are_timed_per_session_and_missing_ones_show_as_skipped(tmp_path: Path, capsys) -> None:
    tsv = tmp_path / "run" / "timings.tsv"
    ok = [sys.executable, "-c", "pass"]
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    assert main(["run", "--file", str(tsv), "--session", "old", "--step", "train", "--", *ok]) == 0
    assert main(["run", "--file", str(tsv), "--session", "now", "--step", "calibrate", "--", *ok]) == 0
    assert main(["run", "--file", str(tsv), "--session", "now", "--step", "evaluate", "--", *failing]) == 3
    recorded = read_session(tsv, "now")
    assert set(recorded) == {"calibrate", "evaluate"} and recorded["evaluate"].returncode == 3
    assert all(t.seconds > 0 for t in recorded.values())
    capsys.readouterr()
    assert main(["table", "--file", str(tsv), "--session", "now", "train", "calibrate", "evaluate"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["train"] == ["skipped", "0.0"]  # recorded in another make run only
    assert rows["calibrate"][0] == "ok" and rows["evaluate"][:2] == ["failed", "(3)"]
    assert abs(float(rows["total"][0]) - sum(t.seconds for t in recorded.values())) <= 0.05 + 1e-9
