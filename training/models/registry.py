"""A small model registry in the style of timm's `@register_model`."""
from __future__ import annotations

from typing import Any, Callable

from training.models.base import MultiExitNetwork

_REGISTRY: dict[str, Callable[..., MultiExitNetwork]] = {}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_model(fn: Callable[..., MultiExitNetwork]) -> Callable[..., MultiExitNetwork]:
    """Register a factory under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> MultiExitNetwork:
    """Build a registered model; records `model_name`/`model_args` so a checkpoint can rebuild it."""
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    model.model_name = name
    model.model_args = {"num_classes": num_classes, **kwargs}
    return model
