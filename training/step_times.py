"""Wall time of each `make train-export` step: recorded per step, printed as one table at the end.

    python -m training.step_times run --file runs/P/timings.tsv --session S --step train -- CMD ARGS...
    python -m training.step_times table --file runs/P/timings.tsv --session S data train calibrate ...

`run` runs CMD, then appends `session<TAB>step<TAB>seconds<TAB>exit code` to the file and exits with CMD's
exit code. `table` prints the listed steps of one session (one `make` invocation: the Makefile passes the
same session id to every step); a step with no line in that session was skipped by make (its output was
up to date) and shows as skipped, 0 s. Standard library only, so timing a step adds no import time to it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StepTime:
    """One finished step: its name, wall seconds and exit code."""

    step: str
    seconds: float
    returncode: int


def record(path: Path, session: str, result: StepTime) -> None:
    """Append one line for `result` to the TSV at `path` (created with its folder if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f"{session}\t{result.step}\t{result.seconds:.3f}\t{result.returncode}\n")


def timed_run(command: list[str], step: str) -> StepTime:
    """Run `command` (inheriting stdin/stdout/stderr) and measure its wall time in seconds."""
    start = time.perf_counter()
    returncode = subprocess.call(command)
    return StepTime(step, time.perf_counter() - start, returncode)


def read_session(path: Path, session: str) -> dict[str, StepTime]:
    """The steps recorded for `session` (a step recorded twice: its last line)."""
    steps: dict[str, StepTime] = {}
    if not path.is_file():
        return steps
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[0] == session:
            steps[parts[1]] = StepTime(parts[1], float(parts[2]), int(parts[3]))
    return steps


def table(steps: list[str], recorded: dict[str, StepTime]) -> str:
    """A fixed-width table: one row per step in `steps` (seconds, or "skipped" and 0), then the total."""
    rows = []
    for step in steps:
        t = recorded.get(step)
        if t is None:
            rows.append((step, "skipped", 0.0))
        else:
            rows.append((step, "ok" if t.returncode == 0 else f"failed ({t.returncode})", t.seconds))
    width = max(len(s) for s in [*steps, "total"])
    lines = [f"{'step':<{width}}  {'status':<12} {'seconds':>9}"]
    lines += [f"{s:<{width}}  {status:<12} {sec:>9.1f}" for s, status, sec in rows]
    lines.append(f"{'total':<{width}}  {'':<12} {sum(r[2] for r in rows):>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.step_times", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run a command and record its wall time")
    run.add_argument("--file", type=Path, required=True)
    run.add_argument("--session", required=True)
    run.add_argument("--step", required=True)
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    show = sub.add_parser("table", help="print the steps of one session")
    show.add_argument("--file", type=Path, required=True)
    show.add_argument("--session", required=True)
    show.add_argument("steps", nargs="+")
    args = p.parse_args(argv)
    if args.action == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            p.error("run needs a command after --")
        result = timed_run(command, args.step)
        record(args.file, args.session, result)
        return result.returncode
    print(table(args.steps, read_session(args.file, args.session)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
