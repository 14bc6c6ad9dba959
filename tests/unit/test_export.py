"""Export: every registered architecture to checked ONNX stage graphs, the manifest, tampering, the CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import onnx
import pytest
import torch
import yaml

from early_exit.manifest import ManifestError, load_manifest, sha256_file, verify_files, write_json_atomic
from export.archive import ServeConfig, build_archive, read_mar_manifest, verify_archive
from export.errors import ExportCheckError, ExportError
from early_exit.runner import StagedRunner, open_session
from export.parity import AttackParams, check_parity, check_robustness
from export.pipeline import ExportResult, export_checkpoint
from serving.options import HandlerOptions
from training.calibrate import (
    Calibration,
    CalibrationError,
    ExitOutputs,
    calibrate_table,
    calibration_path,
    read_calibration,
    write_calibration,
)
from early_exit.policy import ConfidenceMeasure
from training.checkpoint import CheckpointError, make_checkpoint, model_from_checkpoint, save_checkpoint
from training.evaluate import EVAL_NAME, EvaluationError, evaluation_dir, headline
from training.models import create_model, list_models

REPO = Path(__file__).resolve().parents[2]
SMALL_ARGS: dict[str, dict[str, Any]] = {"resnet_me": {"blocks_per_stage": 1, "width": 8}}
TINY_ATTACK = AttackParams(eps=0.1, step_size=0.05, steps=2)
ADV_N = 32


def _dataset(shape: tuple[int, ...]) -> dict[str, Any]:
    name = "mnist" if shape[0] == 1 else "cifar10"
    return {"name": name, "input_shape": list(shape), "classes": [f"class-{i}" for i in range(10)],
            "background": 0.0}


def make_calibrated_checkpoint(arch: str, path: Path, calibrated: bool = True, seed: int = 0,
                               config: dict[str, Any] | None = None) -> Path:
    """An untrained model, and beside it the calibration.json the calibration step would write (a real table
    fitted on random validation data) and an eval/eval.json in the evaluation's format for both."""
    torch.manual_seed(seed)
    model = create_model(arch, **SMALL_ARGS.get(arch, {})).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(64, *model.input_shape, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    with torch.no_grad():
        logits = [out.numpy() for out in model(x)]
    cost = model.cost_profile()
    table = calibrate_table(ExitOutputs.from_logits(logits, y.numpy()), cost.staged, tolerance=0.01)
    save_checkpoint(make_checkpoint(model, _dataset(model.input_shape), config or {"seed": seed}), path)
    if calibrated:
        calibration = write_calibration(Calibration(ConfidenceMeasure.MAX_PROB, 0.01, cost, tuple(table),
                                                    cost.staged[-1], sha256_file(path), {"note": "untrained"}),
                                        calibration_path(path))
        rows = [{"budget_mflops": r.budget_mflops, "max_exit": r.max_exit + 1} for r in table]
        write_json_atomic({"split": "test", "checkpoint_sha256": sha256_file(path),
                           "calibration_sha256": sha256_file(calibration), "cost": cost.to_dict(),
                           "anytime": {"clean": [0.1] * model.num_exits}, "attack": {"eps": 0.3},
                           "slowdown_attack": {"eps": 0.3}, "attacked_samples": 64, "budgeted": {"budgets": rows},
                           "policy": {"budgets": [{**r, "by_set": {}} for r in rows]},
                           "slowdown": {"budgets": rows}, "note": "untrained"},
                          evaluation_dir(path) / EVAL_NAME)
    return path


def adv_data(shape: tuple[int, ...], n: int = ADV_N) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.fixture(scope="session")
def export_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, ExportResult]]:
    """Export each architecture once per session, on demand: (checkpoint path, result)."""
    cache: dict[str, tuple[Path, ExportResult]] = {}

    def get(arch: str) -> tuple[Path, ExportResult]:
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"export-{arch}")
            ckpt = make_calibrated_checkpoint(arch, root / "model.pt")
            shape = tuple(torch.load(ckpt, weights_only=True)["dataset"]["input_shape"])
            result = export_checkpoint(ckpt, root / "out", f"test-{arch}", "2.1", adv_data=adv_data(shape),
                                       attack_params=TINY_ATTACK, parity_json=root / "export-parity.json",
                                       evaluation_file=evaluation_dir(ckpt) / EVAL_NAME)
            cache[arch] = (ckpt, result)
        return cache[arch]

    return get


@pytest.fixture(params=list_models())
def exported(request: pytest.FixtureRequest, export_of: Callable[[str], tuple[Path, ExportResult]]
             ) -> tuple[Path, ExportResult]:
    return export_of(request.param)


def _model(ckpt: Path) -> torch.nn.Module:
    return model_from_checkpoint(torch.load(ckpt, map_location="cpu", weights_only=True))


def test_parity_of_every_stage_and_the_chain(exported: tuple[Path, ExportResult]) -> None:
    ckpt, result = exported
    report = result.report
    assert report["passed"] and result.parity_json is not None
    assert json.loads(result.parity_json.read_text()) == json.loads(json.dumps(report))
    parity = report["parity"]
    assert parity["batch_sizes"] == [1, 7, 64]
    for entry in parity["stages"] + parity["chain"] + [parity["full"]]:
        assert set(entry["by_batch"]) == {"1", "7", "64"}
        assert entry["max_abs_diff_logits"] <= 1e-4 and entry["argmax_agree"]
    rob = report["robustness"]
    assert rob["passed"] and rob["samples"] == ADV_N and rob["attack"]["steps"] == TINY_ATTACK.steps
    k = result.manifest.num_exits
    for split in ("clean", "adversarial"):
        assert len(rob[split]["torch"]) == len(rob[split]["onnx"]) == k
        assert np.allclose(rob[split]["torch"], rob[split]["onnx"], atol=1e-3)

    # An independent look at the files that were shipped: the chain from disk matches PyTorch.
    model = _model(ckpt)
    runner = StagedRunner.from_folder(load_manifest(result.out_dir), result.out_dir)
    full = open_session(result.out_dir / "full.onnx")
    for b in (1, 7, 64):
        x = torch.rand(b, *model.input_shape)
        with torch.no_grad():
            ref = [out.numpy() for out in model(x)]
        got = runner.exit_logits(x.numpy())
        got_full = full.run(["logits"], {"image": x.numpy()})[0]
        for r, g in zip(ref + [ref[-1]], got + [got_full]):
            assert g.shape == r.shape
            assert np.abs(g - r).max() <= 1e-4
            assert (g.argmax(-1) == r.argmax(-1)).all()


def test_graphs_keep_the_io_contract(exported: tuple[Path, ExportResult]) -> None:
    _, result = exported
    k = result.manifest.num_exits
    assert sorted(p.name for p in result.out_dir.glob("*.onnx")) == sorted(
        [f"stage_{i}.onnx" for i in range(1, k + 1)] + ["full.onnx"])
    assert not list(result.out_dir.glob("*.data"))  # weights inside the files
    for i in range(1, k + 1):
        proto = onnx.load(str(result.out_dir / f"stage_{i}.onnx"))
        assert [t.name for t in proto.graph.input] == ["image" if i == 1 else f"features_{i - 1}"]
        outputs = [t.name for t in proto.graph.output]
        assert outputs == ([f"logits_{i}"] if i == k else [f"features_{i}", f"logits_{i}"])
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
        assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    full = onnx.load(str(result.out_dir / "full.onnx"))
    assert [t.name for t in full.graph.input] == ["image"] and [t.name for t in full.graph.output] == ["logits"]


def test_manifest_schema(exported: tuple[Path, ExportResult]) -> None:
    ckpt_path, result = exported
    ckpt = torch.load(ckpt_path, weights_only=True)
    m = load_manifest(result.out_dir)
    verify_files(m, result.out_dir)
    raw = json.loads((result.out_dir / "manifest.json").read_text())
    assert raw["format_version"] == 2 and raw["input_range"] == [0.0, 1.0] and raw["input_background"] == 0.0
    assert (m.name, m.version, m.dataset) == (result.manifest.name, "2.1", ckpt["dataset"]["name"])
    assert list(m.input_shape) == ckpt["dataset"]["input_shape"]
    assert list(m.classes) == ckpt["dataset"]["classes"]
    assert m.confidence.value == "max_prob" and m.opset == 18
    calibration = read_calibration(calibration_path(ckpt_path), ckpt_path)
    assert m.cost == calibration.cost == _model(ckpt_path).cost_profile()
    assert m.staged_mflops == pytest.approx(ckpt["cost"]["staged_mflops"])
    assert m.calibration == calibration.table
    assert m.default_budget_mflops == calibration.default_budget_mflops == m.staged_mflops[-1]
    for e in m.exits:
        assert e.sha256 == sha256_file(result.out_dir / e.file)
        assert e.file == f"stage_{e.index}.onnx" and e.logits_name == f"logits_{e.index}"
        assert e.input_name == ("image" if e.index == 1 else f"features_{e.index - 1}")
    assert m.exits[-1].features_name is None
    assert m.full_graph is not None and m.full_graph.file == "full.onnx"
    assert m.full_graph.sha256 == sha256_file(result.out_dir / "full.onnx")
    assert m.full_graph.mflops == pytest.approx(m.cost.anytime[-1])
    assert m.full_graph.mflops < m.staged_mflops[-1]
    assert {"torch", "onnx", "onnxruntime", "onnxscript"} <= set(m.versions)
    evaluation = json.loads((evaluation_dir(ckpt_path) / EVAL_NAME).read_text())
    assert m.evaluation == headline(evaluation) and "note" not in m.evaluation  # the headline, not all of eval.json
    assert m.evaluation["policy"] and all("by_set" not in row for row in m.evaluation["policy"])
    assert m.exit_agreement == calibration.exit_agreement
    assert m.extra["architecture"] == ckpt["model_name"] and m.extra["calibration_tolerance"] == 0.01


def test_tampered_graph_is_caught(exported: tuple[Path, ExportResult], tmp_path: Path) -> None:
    _, result = exported
    copy = tmp_path / "copy"
    shutil.copytree(result.out_dir, copy)
    stage = copy / "stage_2.onnx"
    data = bytearray(stage.read_bytes())
    data[len(data) // 2] ^= 0x01
    stage.write_bytes(bytes(data))
    manifest = load_manifest(copy)
    with pytest.raises(ManifestError, match="exit 2"):
        verify_files(manifest, copy)
    handler = tmp_path / "handler.py"
    handler.write_text("")
    with pytest.raises(ManifestError):  # a tampered folder is never archived
        build_archive(copy, tmp_path / "store", handler_path=handler)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
    shutil.copy2(result.out_dir / "stage_2.onnx", stage)
    verify_files(manifest, copy)
    (copy / "full.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        verify_files(manifest, copy)


def test_failed_check_fails_the_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parity failure leaves no export folder, and the report says why."""
    import export.pipeline as pipeline

    real = pipeline.check_parity

    def broken(model: torch.nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        with torch.no_grad():  # the graphs are compared against a perturbed model
            next(model.heads[0].parameters()).add_(0.5)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "check_parity", broken)
    ckpt = make_calibrated_checkpoint("smallcnn", tmp_path / "m.pt")
    with pytest.raises(ExportCheckError, match="stage_1.onnx alone"):
        export_checkpoint(ckpt, tmp_path / "out", "broken", adv_samples=0, parity_json=tmp_path / "p.json")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json", "eval", "m.pt", "p.json"]  # no staging
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["passed"] is False and report["parity"]["failures"]


def test_checks_catch_a_different_model(exported: tuple[Path, ExportResult]) -> None:
    ckpt, result = exported
    model = _model(ckpt)
    k = result.manifest.num_exits
    runner = StagedRunner.from_folder(load_manifest(result.out_dir), result.out_dir)
    x, _ = adv_data(model.input_shape, 16)
    y = torch.from_numpy(runner.exit_logits(x.numpy())[-1].argmax(-1))  # ONNX is always right at exit K
    identity = lambda xb, yb: xb  # noqa: E731 - the attack does not matter here
    assert check_robustness(model, runner, x, y, identity)["passed"]
    with torch.no_grad():
        for p in model.heads[-1].parameters():
            p.mul_(-1.0)  # flips the final exit's decisions
    report = check_robustness(model, runner, x, y, identity)
    assert not report["passed"] and any(f"exit {k}:" in f for f in report["failures"])
    assert report["clean"]["onnx"][-1] == 1.0 > report["clean"]["torch"][-1]
    parity = check_parity(model, runner, batch_sizes=(7,))
    assert not parity["passed"] and any(f"chain to exit {k}" in f for f in parity["failures"])


def test_robustness_check_uses_the_runs_configured_evaluation_attack(tmp_path: Path) -> None:
    config = {"seed": 3, "eval_eps": 0.05, "eval_step_size": 0.02, "eval_steps": 1}
    ckpt = make_calibrated_checkpoint("smallcnn", tmp_path / "m.pt", config=config)
    assert AttackParams.from_config(config) == AttackParams(eps=0.05, step_size=0.02, steps=1, seed=3)
    result = export_checkpoint(ckpt, tmp_path / "out", "configured", adv_data=adv_data((1, 28, 28), 8),
                               batch_sizes=(1,), evaluation_file=evaluation_dir(ckpt) / EVAL_NAME)
    assert result.report["robustness"]["attack"] == {"name": "max-average-pgd", "eps": 0.05, "step_size": 0.02,
                                                     "steps": 1, "seed": 3}


def test_each_input_keeps_its_error_type(tmp_path: Path) -> None:
    """A missing calibration is a CalibrationError and a missing evaluation an EvaluationError, never a
    CheckpointError: the CLI maps each to one line, the library keeps them apart."""
    ckpt = make_calibrated_checkpoint("smallcnn", tmp_path / "m.pt", calibrated=False)
    with pytest.raises(CalibrationError, match="calibrate the checkpoint first") as info:
        export_checkpoint(ckpt, tmp_path / "out", "m", adv_samples=0)
    assert not isinstance(info.value, CheckpointError)
    ckpt = make_calibrated_checkpoint("smallcnn", tmp_path / "m.pt")
    with pytest.raises(EvaluationError, match="evaluate the checkpoint first"):
        export_checkpoint(ckpt, tmp_path / "out", "m", adv_samples=0, evaluation_file=tmp_path / "none.json")
    assert not (tmp_path / "out").exists()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("kind", ["missing", "plain-dict", "text", "uncalibrated", "unevaluated", "stale-evaluation",
                                  "foreign-config"])
def test_cli_user_errors_are_one_line(kind: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    if kind == "plain-dict":
        torch.save({"weights": torch.zeros(2)}, ckpt)
    elif kind == "text":
        ckpt.write_text("not a checkpoint\n")
    elif kind == "uncalibrated":
        make_calibrated_checkpoint("smallcnn", ckpt, calibrated=False)
    elif kind == "unevaluated":
        make_calibrated_checkpoint("smallcnn", ckpt)
        (evaluation_dir(ckpt) / EVAL_NAME).unlink()
    elif kind == "stale-evaluation":  # calibrated again after the evaluation: eval.json judged another table
        make_calibrated_checkpoint("smallcnn", ckpt)
        calibration = read_calibration(calibration_path(ckpt), ckpt)
        write_calibration(replace(calibration, tolerance=0.02), calibration_path(ckpt))
    elif kind == "foreign-config":  # the robustness check reads the run's attack from a training config
        make_calibrated_checkpoint("smallcnn", ckpt, config={"purpose": "not a training config"})
    handler = tmp_path / "handler.py"
    handler.write_text("")
    proc = _run_cli("--checkpoint", str(ckpt), "--name", "m", "--out-dir", str(tmp_path / "out"),
                    "--model-store", str(tmp_path / "store"), "--handler", str(handler),
                    "--parity-json", str(tmp_path / "p.json"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    expected = {"missing": "does not exist", "plain-dict": "not a robust-early-exit checkpoint",
                "text": "not a readable torch checkpoint", "uncalibrated": "calibrate the checkpoint first",
                "unevaluated": "evaluate the checkpoint first", "stale-evaluation": "judged another calibration",
                "foreign-config": "unknown config key 'purpose'"}[kind]
    assert expected in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.json").exists()


def test_cli_exports_reproducibly(export_of: Callable[[str], tuple[Path, ExportResult]], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI end to end (robustness check skipped: no dataset here); same checkpoint, same graphs."""
    from export.__main__ import main

    ckpt, first = export_of("smallcnn")
    handler = tmp_path / "handler.py"
    handler.write_text("")
    args = ["--checkpoint", str(ckpt), "--name", first.manifest.name, "--version", "2.1",
            "--out-dir", str(tmp_path / "out"), "--model-store", str(tmp_path / "store"),
            "--handler", str(handler), "--adv-samples", "0", "--parity-json", str(tmp_path / "p.json"),
            "--batch-size", "4", "--handler-option", "top_k=2", "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "store" / f"{first.manifest.name}.mar") and Path(out).is_file()
    again = load_manifest(tmp_path / "out")
    assert [e.sha256 for e in again.exits] == [e.sha256 for e in first.manifest.exits]
    assert again.full_graph.sha256 == first.manifest.full_graph.sha256
    assert json.loads((tmp_path / "p.json").read_text())["robustness"]["skipped"] is True
    with zipfile.ZipFile(out) as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert config["batchSize"] == 4 and config["handler"]["top_k"] == 2 and config["minWorkers"] == 2
    assert main(args) == 2  # the archive exists; no --force
    assert "already exists" in capsys.readouterr().err


PLACEHOLDER_HANDLER = '''"""Stands in for serving/handler.py: imports only what a handler may, from the archive."""
from early_exit.manifest import load_manifest, verify_files


def handle(data, context):
    return data
'''


@pytest.fixture()
def handler(tmp_path: Path) -> Path:
    path = tmp_path / "handler.py"
    path.write_text(PLACEHOLDER_HANDLER)
    return path


def test_archive_is_self_contained(export_of: Callable[[str], tuple[Path, ExportResult]], handler: Path,
                                   tmp_path: Path) -> None:
    _, result = export_of("smallcnn")
    store = tmp_path / "store"
    cfg = ServeConfig.from_values(min_workers=1, max_workers=2, batch_size=4, max_batch_delay=5,
                                  handler={"top_k": 2, "max_payload_bytes": 4096})
    mar = build_archive(result.out_dir, store, handler_path=handler, serve_config=cfg)
    assert mar == store / "test-smallcnn.mar"
    # no staging folder left; beside the archive only the record of its digest
    assert sorted(p.name for p in store.iterdir()) == ["test-smallcnn.mar", "test-smallcnn.mar.sha256"]
    k = result.manifest.num_exits
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        expected = {"MAR-INF/MANIFEST.json", "handler.py", "model-config.yaml", "manifest.json", "full.onnx",
                    "early_exit/__init__.py", "early_exit/manifest.py", "early_exit/policy.py",
                    "early_exit/runner.py", "early_exit/costs.py", "serving/__init__.py", "serving/decoding.py",
                    *(f"stage_{i}.onnx" for i in range(1, k + 1))}
        assert expected <= names
        assert all(n.startswith(("early_exit/", "serving/")) for n in names - expected), names - expected
        assert not any("__pycache__" in n for n in names)
        assert z.read("early_exit/policy.py") == (REPO / "early_exit" / "policy.py").read_bytes()
        assert z.read("manifest.json") == (result.out_dir / "manifest.json").read_bytes()
        assert yaml.safe_load(z.read("model-config.yaml")) == {
            "minWorkers": 1, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 5, "responseTimeout": 30,
            "handler": HandlerOptions(top_k=2, max_payload_bytes=4096).to_config()}
        z.extractall(tmp_path / "unpacked")
    model = read_mar_manifest(mar)["model"]
    assert (model["modelName"], model["modelVersion"]) == ("test-smallcnn", "2.1")
    assert (model["handler"], model["configFile"]) == ("handler.py", "model-config.yaml")
    assert verify_archive(mar).name == "test-smallcnn"

    # A worker sees the unpacked folder on its path: early_exit comes from there, and torch is not needed.
    code = ("import sys, handler, early_exit; from early_exit.manifest import load_manifest, verify_files; "
            "verify_files(load_manifest('.'), '.'); "
            "assert early_exit.__file__.startswith(sys.argv[1]), early_exit.__file__; "
            "assert 'torch' not in sys.modules")
    unpacked = (tmp_path / "unpacked").resolve()
    proc = subprocess.run([sys.executable, "-c", code, str(unpacked)], cwd=unpacked, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_archive_refuses_to_clobber_or_mismatch(export_of: Callable[[str], tuple[Path, ExportResult]],
                                                handler: Path, tmp_path: Path) -> None:
    _, result = export_of("smallcnn")
    store = tmp_path / "store"
    with pytest.raises(ExportError, match="not an existing .py file"):
        build_archive(result.out_dir, store, handler_path=tmp_path / "nope.py")
    with pytest.raises(ExportError, match="does not match the manifest"):
        build_archive(result.out_dir, store, name="other", handler_path=handler)
    mar = build_archive(result.out_dir, store, handler_path=handler)
    before = mar.read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        build_archive(result.out_dir, store, handler_path=handler)
    assert mar.read_bytes() == before
    assert build_archive(result.out_dir, store, handler_path=handler, force=True) == mar
    assert sorted(p.name for p in store.iterdir()) == [mar.name, f"{mar.name}.sha256"]
