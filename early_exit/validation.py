"""One line for a pydantic ValidationError, used by every pydantic model of the project.

`describe_errors` turns each problem into `key must be ..., got <value>` and joins them with '; ', so a bad
training config (training/config.py), handler section (serving/options.py) or model-config.yaml
(export/archive.py) is reported the same way. Torch-free: it ships in the model archive with serving/.
"""
from __future__ import annotations

from pydantic import ValidationError

_TYPE_WORDS = {
    "int_type": "must be an integer", "int_parsing": "must be an integer", "float_type": "must be a number",
    "float_parsing": "must be a number", "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string", "list_type": "must be a list", "dict_type": "must be a mapping",
    "none_required": "must be null",
}
_BOUND_WORDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
MAX_INPUT_CHARS = 60  # a value longer than this is shortened in the message (a whole YAML section would be noise)


def _location(loc: tuple[int | str, ...]) -> str:
    """('gamma', 1) -> 'gamma[1]', ('handler', 'top_k') -> 'handler.top_k'; () -> 'config'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "config"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_INPUT_CHARS else text[:MAX_INPUT_CHARS - 3] + "..."


def describe_errors(exc: ValidationError, where: str | None = None) -> str:
    """One line for all of `exc`'s problems: `key must be ..., got <value>`, joined by '; '.

    `where` (e.g. "model-config.yaml") prefixes the line as `<where>: ...`. A validator's own ValueError is
    reported as its message alone.
    """
    lines = []
    for err in exc.errors(include_url=False):
        kind, key, ctx = err["type"], _location(err["loc"]), err.get("ctx") or {}
        got = f", got {_shown(err['input'])}" if "input" in err else ""
        if kind == "extra_forbidden":
            lines.append(f"unknown config key {key!r}")
            continue
        if kind in _TYPE_WORDS:
            what = _TYPE_WORDS[kind]
        elif kind == "enum":
            what = f"must be one of {ctx.get('expected', '?')}"
        elif kind in _BOUND_WORDS:
            bound = next(iter(ctx.values()), "?")
            what = f"must be {_BOUND_WORDS[kind]} {bound}"
        elif kind == "value_error":
            what, key, got = str(ctx.get("error", err["msg"])), "", ""
        else:
            what = err["msg"][:1].lower() + err["msg"][1:]
        lines.append(f"{key} {what}{got}".strip())
    text = "; ".join(lines)
    return f"{where}: {text}" if where else text
