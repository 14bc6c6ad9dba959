"""model-config.yaml as the benchmarks read it: through export.archive.ServeConfig, never as a raw dict, so the
sweep and every result state what TorchServe and the handler are really given."""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import pytest

from bench import archives, sweep
from export.archive import MODEL_CONFIG_NAME, ServeConfig, write_model_config
from export.errors import ExportError

SHIPPED = ServeConfig()
OTHER = ServeConfig.from_values(min_workers=1, max_workers=3, batch_size=4, max_batch_delay=0, response_timeout=9,
                                handler={"mode": "full_graph_only", "intra_op_threads": 2, "top_k": 2,
                                         "max_budget_mflops": 7.5, "audit_rate": 0.0})


@pytest.mark.parametrize("config", [SHIPPED, OTHER], ids=["shipped", "other"])
def test_read_gives_back_what_write_model_config_wrote(tmp_path: Path, config: ServeConfig) -> None:
    path = write_model_config(config, tmp_path)
    assert path.name == MODEL_CONFIG_NAME
    assert ServeConfig.read(path) == config
    assert ServeConfig.from_yaml(path.read_text()) == config
    assert ServeConfig.from_yaml_dict(config.to_yaml_dict()) == config


def test_read_fills_only_the_handler_section_from_defaults(tmp_path: Path) -> None:
    """The handler fills its own missing keys from HandlerOptions, so reading does too."""
    doc = {k: v for k, v in OTHER.to_yaml_dict().items() if k != "handler"}
    assert ServeConfig.from_yaml_dict(doc) == OTHER.model_copy(update={"handler": SHIPPED.handler})
    doc["handler"] = {"top_k": 2}
    assert ServeConfig.from_yaml_dict(doc).handler == SHIPPED.handler.model_copy(update={"top_k": 2})


@pytest.mark.parametrize("doc, says", [
    ({"batchSize": 4}, "maxBatchDelay missing"),  # TorchServe would fill it with its own default, not ours
    ({**SHIPPED.to_yaml_dict(), "batch_size": 4}, "unknown key batch_size"),
    ({**SHIPPED.to_yaml_dict(), "batchSize": 0}, "batch_size"),
    ({**SHIPPED.to_yaml_dict(), "handler": {"intra_op_thread": 2}}, "intra_op_thread"),
    ([1, 2], "expected a mapping"),
    (None, "expected a mapping"),
])
def test_read_refuses_what_would_misstate_the_served_config(doc: object, says: str) -> None:
    with pytest.raises(ExportError, match=says):
        ServeConfig.from_yaml_dict(doc)


def test_read_errors(tmp_path: Path) -> None:
    (tmp_path / MODEL_CONFIG_NAME).write_text("batchSize: [8\n")
    with pytest.raises(ExportError, match="not YAML"):
        ServeConfig.read(tmp_path / MODEL_CONFIG_NAME)
    with pytest.raises(FileNotFoundError):
        ServeConfig.read(tmp_path / "absent.yaml")


def test_sweep_defaults_come_from_serve_config() -> None:
    base = sweep.Setting()
    assert (base.workers, base.batch_size, base.max_batch_delay, base.intra_op_threads) == (
        SHIPPED.min_workers, SHIPPED.batch_size, SHIPPED.max_batch_delay, SHIPPED.handler.intra_op_threads)
    assert sweep.Setting.from_model_config(SHIPPED) == base
    assert sweep.Setting().model_config(SHIPPED) == SHIPPED  # the shipped setting rewrites nothing


def test_sweep_base_is_what_the_archive_serves(tmp_path: Path) -> None:
    """The sweep starts from the archive's model-config.yaml as written, with no fallback of its own."""
    path = write_model_config(OTHER, tmp_path)
    base = sweep.Setting.from_model_config(ServeConfig.read(path), netty_threads=1)
    assert dataclasses.asdict(base) == {"workers": 1, "batch_size": 4, "max_batch_delay": 0, "intra_op_threads": 2,
                                        "netty_threads": 1, "netty_client_threads": None, "job_queue_size": None}
    # maxBatchDelay 0 is a value, not a missing key to replace with a default
    assert base.model_config(OTHER).max_batch_delay == 0


def test_unpack_reads_manifest_and_serve_config(tmp_path: Path) -> None:
    from tests.toy_model import MODEL, build_model_dir

    src = tmp_path / "src"
    src.mkdir()
    build_model_dir(src)
    write_model_config(OTHER, src)
    mar = tmp_path / "toy.mar"
    with zipfile.ZipFile(mar, "w") as z:
        for f in src.iterdir():
            z.write(f, f.name)
    manifest, config = archives.unpack(mar, tmp_path / "out")
    assert manifest.name == MODEL and config == OTHER
    bare = tmp_path / "bare.mar"
    with zipfile.ZipFile(bare, "w") as z:
        for f in src.iterdir():
            if f.name != MODEL_CONFIG_NAME:
                z.write(f, f.name)
    with pytest.raises(FileNotFoundError):
        archives.unpack(bare, tmp_path / "bare")
