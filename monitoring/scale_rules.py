"""Write a copy of a Prometheus rule file with every duration scaled by one factor.

    python -m monitoring.scale_rules monitoring/alerts.yml --factor 0.01666 -o /tmp/fast-alerts.yml

Range windows (`[5m]`, subquery `[1h:1m]`), `offset`s, `for:`, `keep_firing_for:` and group
`interval:`s are all multiplied by `factor` (rounded to whole seconds, at least 1 s); nothing else
changes. The shipped rules use production windows; the integration test (and a quick demo) loads
the scaled copy, so both run the same expressions and the same ratios between windows.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
DURATION = r"(?:\d+(?:ms|[smhdwy]))+"
_PART = re.compile(r"(\d+)(ms|[smhdwy])")
# A range or subquery selector: [5m] or [1h:1m] or [1h:]; and an offset modifier: offset 10m.
_RANGE = re.compile(rf"\[\s*({DURATION})\s*(?::\s*({DURATION})?\s*)?\]")
_OFFSET = re.compile(rf"\boffset\s+(-?)({DURATION})")


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration such as 1h30m or 250ms."""
    text = text.strip()
    if not re.fullmatch(DURATION, text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * UNIT_SECONDS[u] for n, u in _PART.findall(text))


def format_duration(seconds: float) -> str:
    return f"{max(1, int(round(seconds)))}s"


def scale_duration(text: str, factor: float) -> str:
    return format_duration(parse_duration(text) * factor)


def scale_expr(expr: str, factor: float) -> str:
    """Scale every range window, subquery step and offset in a PromQL expression."""
    def _range(m: re.Match) -> str:
        step = m.group(2)
        inner = scale_duration(m.group(1), factor)
        if ":" in m.group(0):
            inner += ":" + (scale_duration(step, factor) if step else "")
        return f"[{inner}]"

    def _offset(m: re.Match) -> str:
        return f"offset {m.group(1)}{scale_duration(m.group(2), factor)}"

    # Label values such as ExitIndex="1" hold no durations, but strings could: leave quoted text alone.
    pieces = re.split(r'("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`)', expr)
    for i in range(0, len(pieces), 2):
        pieces[i] = _OFFSET.sub(_offset, _RANGE.sub(_range, pieces[i]))
    return "".join(pieces)


def scale_rules(doc: dict[str, Any], factor: float) -> dict[str, Any]:
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a positive number, got {factor}")
    out = {"groups": []}
    for group in doc.get("groups", []):
        g = dict(group)
        if "interval" in g:
            g["interval"] = scale_duration(str(g["interval"]), factor)
        rules = []
        for rule in group.get("rules", []):
            r = dict(rule)
            r["expr"] = scale_expr(str(r["expr"]), factor)
            for key in ("for", "keep_firing_for"):
                if key in r:
                    r[key] = scale_duration(str(r[key]), factor)
            rules.append(r)
        g["rules"] = rules
        out["groups"].append(g)
    return out


def durations_in(expr: str) -> list[str]:
    """Every duration the scaler rewrites in `expr` (for tests: nothing must be left unscaled)."""
    found = []
    for m in _RANGE.finditer(expr):
        found += [d for d in m.groups() if d]
    found += [m.group(2) for m in _OFFSET.finditer(expr)]
    return found


class _BlockDumper(yaml.SafeDumper):
    """Multi-line expressions stay readable block literals in the output."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def dump_rules(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, width=1000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rules", type=Path)
    parser.add_argument("--factor", type=float, required=True, help="multiply every duration by this")
    parser.add_argument("-o", "--output", type=Path, help="default: stdout")
    args = parser.parse_args(argv)
    doc = yaml.safe_load(args.rules.read_text())
    text = dump_rules(scale_rules(doc, args.factor))
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
