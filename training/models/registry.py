"""A small model registry in the style of timm's `@register_model`, plus model families named by a prefix.

A family builds any of many networks named `<family>:<name>` (as timm's `hf-hub:` prefix names a hub model):
`torchvision:resnet18` is torchvision's resnet18 cut into stages (training/models/torchvision_net.py).
"""
from __future__ import annotations

from typing import Any, Callable

from training.models.base import MultiExitNetwork

_REGISTRY: dict[str, Callable[..., MultiExitNetwork]] = {}
_FAMILIES: dict[str, Callable[..., MultiExitNetwork]] = {}
FAMILY_SEPARATOR = ":"


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_model(fn: Callable[..., MultiExitNetwork]) -> Callable[..., MultiExitNetwork]:
    """Register a factory under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def register_family(prefix: str, fn: Callable[..., MultiExitNetwork]) -> None:
    """Register `fn(name, num_classes=..., **kwargs)` for every model named `<prefix>:<name>`. The network it
    returns sets `model_args` to what rebuilds it (resolved, without num_classes)."""
    if prefix in _FAMILIES or FAMILY_SEPARATOR in prefix:
        raise ValueError(f"model family {prefix!r} registered twice or holds {FAMILY_SEPARATOR!r}")
    _FAMILIES[prefix] = fn


def list_models() -> list[str]:
    """The registered architectures (families are listed by `list_families`)."""
    return sorted(_REGISTRY)


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> MultiExitNetwork:
    """Build a registered model or a family's `<family>:<name>`; records `model_name`/`model_args` so a checkpoint
    can rebuild it. UnknownModelError for an unknown name."""
    family, sep, member = name.partition(FAMILY_SEPARATOR)
    if sep:
        if family not in _FAMILIES:
            raise UnknownModelError(f"unknown model family {family!r} in {name!r}; families: "
                                    f"{', '.join(f + FAMILY_SEPARATOR + '<name>' for f in list_families())}")
        model = _FAMILIES[family](member, num_classes=num_classes, **kwargs)
        model.model_name = name
        model.model_args = {"num_classes": num_classes, **model.model_args}
        return model
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; registered: {', '.join(list_models())}; families: "
                                f"{', '.join(f + FAMILY_SEPARATOR + '<name>' for f in list_families())}")
    model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    model.model_name = name
    model.model_args = {"num_classes": num_classes, **kwargs}
    return model
