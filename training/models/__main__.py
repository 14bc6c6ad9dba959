"""List models, or a torchvision backbone's exit candidates with their output shapes and cumulative MFLOPs.

    python -m training.models                                   # registered architectures and builders
    python -m training.models torchvision:resnet18 --input-size 32
    python -m training.models torchvision:resnet --arg block=basic --arg 'layers=[1,1,1,1]' --small-input-stem

Exit status 2 with one line on stderr for an unknown or refused model (or unavailable weights).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import yaml

from training.models import list_families, list_models
from training.models.registry import FAMILY_SEPARATOR, UnknownModelError
from training.models.torchvision_net import FAMILY, BackboneError, builder_names, load_backbone


def _parse_args(items: list[str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise BackboneError(f"--arg {item!r} is not key=value")
        parsed[key.strip()] = yaml.safe_load(raw)
    return parsed


def format_candidates(model: str, args: argparse.Namespace, builder_kwargs: dict[str, Any]) -> str:
    """The candidate table of `model` (a `torchvision:<builder>`) at the CLI's input size."""
    family, _, builder = model.partition(FAMILY_SEPARATOR)
    if family != FAMILY:
        raise UnknownModelError(f"{model!r}: candidates are listed for {FAMILY}:<builder> models; registered "
                                f"architectures have fixed exits")
    shape = (args.in_channels, args.input_size, args.input_size)
    backbone = load_backbone(builder, args.num_classes, shape, small_input_stem=args.small_input_stem,
                             weights_path=args.weights_path, **builder_kwargs)
    header = f"{'name':<24} {'module':<22} {'output (C x H x W)':<19} {'reduction':>9} {'MFLOPs':>9} " \
             f"{'cumulative':>10} {'fraction':>8}"
    lines = [f"{model} at {'x'.join(map(str, shape))}"
             f"{' (small_input_stem)' if args.small_input_stem else ''}: backbone {backbone.mflops:.2f} MFLOPs "
             f"(body {backbone.candidates[-1].cumulative_mflops:.2f} + tail {backbone.tail_mflops:.3f}; exit heads "
             "excluded)", header]
    for i, c in enumerate(backbone.candidates):
        last = "  (last: the tail follows it)" if i == len(backbone.candidates) - 1 else ""
        lines.append(f"{c.name:<24} {c.module:<22} {' x '.join(map(str, c.shape)):<19} {c.reduction:>9.4g} "
                     f"{c.mflops:>9.3f} {c.cumulative_mflops:>10.3f} {c.fraction:>8.3f}{last}")
    lines.append(f"tail: {' -> '.join(type(m).__name__ for m in backbone.tail)} ({backbone.tail_mflops:.3f} MFLOPs)")
    lines.append("exits: names above but the last (e.g. exits: [" + ", ".join(
        c.name for c in backbone.candidates[-4:-1]) + "]) or by cost (exits: \"flops:0.25,0.5,0.75\")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m training.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help=f"{FAMILY}:<builder>; omit to list what exists")
    p.add_argument("--input-size", type=int, default=32, help="image height and width in pixels (default 32)")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--small-input-stem", action="store_true")
    p.add_argument("--weights-path", default=None, help="a local state dict (shapes do not depend on it)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a builder argument, value parsed as YAML (e.g. block=basic, 'layers=[1,1,1,1]')")
    args = p.parse_args(argv)
    if args.model is None:
        print("registered:", ", ".join(list_models()))
        for family in list_families():
            print(f"{family}:<builder>, builders:", ", ".join(builder_names()))
        return 0
    try:
        print(format_candidates(args.model, args, _parse_args(args.arg)))
    except (BackboneError, UnknownModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
