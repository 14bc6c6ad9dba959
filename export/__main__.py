"""`python -m export`: checkpoint + calibration.json + eval/eval.json -> checked ONNX stage graphs + manifest
-> model_store/<name>.mar.

Prints the archive path on stdout, and on stderr the line that pins its sha256 in the deployment's configuration
(`EE_MODEL_SHA256=<name>.mar=<sha256>`: compose environment, Kubernetes ConfigMap; serving/server.py refuses an
archive that does not match; the digest is also written to `<name>.mar.sha256` beside the archive, a record
that is not the pin). A user error (missing or foreign checkpoint, calibration or evaluation,
existing output without --force, bad option) is one line on stderr and exit code 2; a failed
export check (checker, parity, robustness) is one line and exit code 1.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, Sequence

import yaml

PROG = "python -m export"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, as for every other user error (argparse would print the usage first)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _handler_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"cannot parse the value of {key}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="a training checkpoint (.pt)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="the calibration step's calibration.json (default: beside the checkpoint)")
    p.add_argument("--evaluation", type=Path, default=None,
                   help="the evaluation's eval.json, whose figures the manifest carries (default: eval/eval.json "
                        "beside the checkpoint)")
    p.add_argument("--name", required=True, help="model name (served as /predictions/NAME)")
    p.add_argument("--version", default="1.0")
    p.add_argument("--out-dir", type=Path, help="export folder (default artifacts/export/NAME)")
    p.add_argument("--model-store", type=Path, default=Path("model_store"))
    p.add_argument("--handler", type=Path, default=Path("serving/handler.py"))
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--adv-samples", type=int, default=500,
                   help="test images attacked for the robustness check (0 skips it)")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--eps", type=float, help="attack eps (default: the checkpoint config's eval_eps)")
    p.add_argument("--step-size", type=float, help="attack step size (default: eval_step_size)")
    p.add_argument("--steps", type=int, help="attack steps (default: eval_steps)")
    p.add_argument("--parity-json", type=Path, default=None,
                   help="also write the parity report here (it always goes to the export folder)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the checks")
    p.add_argument("--force", action="store_true", help="replace an existing export folder and archive")
    serve = p.add_argument_group("model-config.yaml (defaults: export.archive.ServeConfig)")
    serve.add_argument("--min-workers", type=int)
    serve.add_argument("--max-workers", type=int)
    serve.add_argument("--batch-size", type=int)
    serve.add_argument("--max-batch-delay", type=int, help="ms")
    serve.add_argument("--response-timeout", type=int, help="s")
    serve.add_argument("--handler-option", type=_handler_option, action="append", default=[], metavar="KEY=VALUE",
                       help="set a key of the handler: section (repeatable; value parsed as YAML)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our progress at INFO; onnxscript/onnx_ir log every optimizer pass at INFO, so others stay at WARNING.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("export").setLevel(logging.WARNING if args.quiet else logging.INFO)
    # Heavy imports after parsing, so --help and argument errors are instant.
    from export.archive import ServeConfig, build_archive
    from export.errors import ExportCheckError, ExportError
    from early_exit.manifest import ManifestError
    from export.parity import AttackParams
    from export.pipeline import export_checkpoint, read_checkpoint
    from serving.server import pin_line
    from training.calibrate import CalibrationError
    from training.checkpoint import CheckpointError
    from training.config import ConfigError
    from training.evaluate import EVAL_NAME, EvaluationError, evaluation_dir

    try:
        given = {k: getattr(args, k) for k in ("min_workers", "max_workers", "batch_size", "max_batch_delay",
                                                "response_timeout") if getattr(args, k) is not None}
        serve = ServeConfig.from_values(handler=dict(args.handler_option), **given)
        if not args.handler.is_file():
            raise ExportError(f"handler {args.handler} does not exist")
        mar = args.model_store / f"{args.name}.mar"
        if mar.exists() and not args.force:
            raise ExportError(f"{mar} already exists; pass --force to replace it")
        attack_params = None
        chosen = {k: v for k, v in (("eps", args.eps), ("step_size", args.step_size), ("steps", args.steps))
                  if v is not None}
        if chosen:  # the configured attack with the options given
            ckpt, _ = read_checkpoint(args.checkpoint)
            attack_params = replace(AttackParams.from_config(ckpt["config"]), **chosen)
        result = export_checkpoint(
            args.checkpoint, args.out_dir or Path("artifacts/export") / args.name, args.name, args.version,
            opset=args.opset, adv_samples=args.adv_samples, data_dir=args.data_dir, attack_params=attack_params,
            calibration_file=args.calibration,
            evaluation_file=args.evaluation or evaluation_dir(args.checkpoint) / EVAL_NAME,
            parity_json=args.parity_json, force=args.force, threads=args.threads,
        )
        path = build_archive(result.out_dir, args.model_store, args.name, args.version, args.handler,
                             serve_config=serve, force=args.force)
    except ExportCheckError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, CalibrationError, EvaluationError, ConfigError, ExportError, ManifestError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(path)
    # Printed even with --quiet: the line the operator pastes into the deployment (the pin the server checks).
    print(pin_line([path]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
