"""The export folder -> `model_store/<name>.mar`, self-contained for an onnxruntime-only handler.

torch-model-archiver 0.12.0 copies each `--extra-files` entry into the archive
root, and for a directory it copies the directory's *contents* (sub-folders kept
whole). So we stage one payload folder holding the graphs, manifest.json and the
torch-free packages the handler imports (`early_exit/`, `serving/`) and pass
that: the archive root then holds them as importable packages. The archiver
stages its copy in `$TMPDIR/<model name>` (removing whatever was there), so it
runs in a subprocess with a private TMPDIR; its output goes to a temporary
folder and is renamed into place only after the archive was verified.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Any, ClassVar, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import early_exit
import serving
from early_exit.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file, verify_files
from early_exit.validation import describe_errors
from export.errors import ExportError
from serving.options import HandlerOptions, OptionsError

log = logging.getLogger(__name__)

DEFAULT_HANDLER = Path("serving/handler.py")
MODEL_CONFIG_NAME = "model-config.yaml"
MAR_MANIFEST = "MAR-INF/MANIFEST.json"
EARLY_EXIT_DIR = Path(early_exit.__file__).resolve().parent
SERVING_DIR = Path(serving.__file__).resolve().parent
_UNSAFE_FOR_ARCHIVER = set(",*?[]")  # --extra-files is split on commas and globbed


Count = Annotated[int, Field(strict=True, ge=1)]


class ServeConfig(BaseModel):
    """`model-config.yaml`: TorchServe's per-model settings plus the `handler:` section the handler reads.

    Validated by pydantic like the handler options (serving/options.py), each default written once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Workers, batch size, delay and onnxruntime threads are the settings sweep's choice on a 2-core CPU (`make
    # bench-serve` with --sweep-only; its figures: bench/results/serve-mnist-sweep.json). A deployment on more
    # cores should re-run the sweep there.
    min_workers: Count = 2
    max_workers: Count = 2
    batch_size: Count = 8
    max_batch_delay: Annotated[int, Field(strict=True, ge=0)] = 2  # ms
    response_timeout: Count = 30  # s
    handler: HandlerOptions = HandlerOptions()

    @model_validator(mode="after")
    def _workers(self) -> "ServeConfig":
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) is below min_workers ({self.min_workers})")
        return self

    @classmethod
    def from_values(cls, handler: dict[str, Any] | None = None, **values: Any) -> "ServeConfig":
        """Validate; any problem (here or in the handler section) is one ExportError line."""
        try:
            return cls(handler=HandlerOptions.from_config(handler), **values)
        except OptionsError as exc:
            raise ExportError(str(exc)) from None
        except ValidationError as exc:
            raise ExportError(describe_errors(exc, "model-config.yaml")) from None

    # TorchServe's key in model-config.yaml for each field but `handler` (which keeps its name).
    _YAML_KEYS: ClassVar[dict[str, str]] = {
        "min_workers": "minWorkers",
        "max_workers": "maxWorkers",
        "batch_size": "batchSize",
        "max_batch_delay": "maxBatchDelay",
        "response_timeout": "responseTimeout",
    }

    def to_yaml_dict(self) -> dict[str, Any]:
        """model-config.yaml as a mapping: TorchServe's keys, then the `handler:` section (plain types)."""
        return {**{key: getattr(self, name) for name, key in self._YAML_KEYS.items()},
                "handler": self.handler.to_config()}

    def to_yaml(self) -> str:
        """model-config.yaml's text."""
        return yaml.safe_dump(self.to_yaml_dict(), sort_keys=False)

    @classmethod
    def from_yaml_dict(cls, doc: Any) -> "ServeConfig":
        """The inverse of `to_yaml_dict`: a parsed model-config.yaml back into the validated config.

        Every TorchServe key must be there: TorchServe fills a missing one with its own default, not this
        class's, so reading it as ours would misstate what is served. The `handler:` section, or any key of
        it, may be left out: the handler fills those from HandlerOptions, as here. Raises ExportError (one
        line) when `doc` is not a mapping, lacks a TorchServe key, holds an unknown key or an invalid value.
        """
        if not isinstance(doc, dict):
            raise ExportError(f"{MODEL_CONFIG_NAME}: expected a mapping, got {type(doc).__name__}")
        names = {key: name for name, key in cls._YAML_KEYS.items()}
        unknown = sorted(str(k) for k in doc if k not in names and k != "handler")
        missing = [key for key in names if key not in doc]
        if unknown or missing:
            raise ExportError(f"{MODEL_CONFIG_NAME}: "
                              + "; ".join([f"unknown key {k}" for k in unknown] + [f"{k} missing" for k in missing]))
        return cls.from_values(handler=doc.get("handler"), **{names[k]: v for k, v in doc.items() if k in names})

    @classmethod
    def from_yaml(cls, text: str | bytes) -> "ServeConfig":
        """model-config.yaml's text (e.g. read out of a .mar) -> the config; ExportError as `from_yaml_dict`,
        or when the text is not YAML."""
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ExportError(f"{MODEL_CONFIG_NAME}: not YAML ({str(exc).splitlines()[0]})") from None
        return cls.from_yaml_dict(doc)

    @classmethod
    def read(cls, path: str | Path) -> "ServeConfig":
        """A model-config.yaml file (as `write_model_config` writes it) -> the config. OSError when the file
        cannot be read, ExportError as `from_yaml`."""
        return cls.from_yaml(Path(path).read_bytes())


def write_model_config(config: ServeConfig, folder: str | Path) -> Path:
    path = Path(folder) / MODEL_CONFIG_NAME
    path.write_text(config.to_yaml())
    return path


def _copy_package(src: Path, dst: Path) -> None:
    """Source files only: caches would bloat the archive and can go stale against the .py files."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


def _check_archiver_path(path: Path) -> None:
    if _UNSAFE_FOR_ARCHIVER & set(str(path)):
        raise ExportError(f"torch-model-archiver cannot take the path {path} (it splits on ',' and globs)")


def build_archive(
    export_dir: str | Path,
    model_store: str | Path = "model_store",
    name: str | None = None,
    version: str | None = None,
    handler_path: str | Path = DEFAULT_HANDLER,
    *,
    serve_config: ServeConfig | None = None,
    packages: Sequence[str | Path] = (EARLY_EXIT_DIR, SERVING_DIR),
    extra_files: Sequence[str | Path] = (),
    force: bool = False,
) -> Path:
    """Archive a verified export folder as `<model_store>/<name>.mar` and return its path.

    `name`/`version` default to the manifest's and must agree with it when given. `packages` are copied as
    importable folders to the archive root, `extra_files` as plain files next to the graphs.
    """
    export_dir, model_store, handler_path = Path(export_dir), Path(model_store), Path(handler_path)
    manifest = load_manifest(export_dir)
    verify_files(manifest, export_dir)  # never archive a tampered or stale graph
    name = name or manifest.name
    version = str(version or manifest.version)
    if (name, version) != (manifest.name, manifest.version):
        raise ExportError(f"archive {name} {version} does not match the manifest ({manifest.name} {manifest.version})")
    if not handler_path.is_file() or handler_path.suffix != ".py":
        raise ExportError(f"handler {handler_path} is not an existing .py file")
    for path in [*packages, *extra_files]:
        if not Path(path).exists():
            raise ExportError(f"{path} (to be packaged) does not exist")
    model_store.mkdir(parents=True, exist_ok=True)
    target = model_store / f"{name}.mar"
    if target.exists() and not force:
        raise ExportError(f"{target} already exists; pass --force to replace it")
    config_path = write_model_config(serve_config or ServeConfig(), export_dir)

    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=model_store)).resolve()
    try:
        payload, out, tmp = staging / "payload", staging / "out", staging / "tmp"
        for folder in (payload, out, tmp):
            folder.mkdir()
        for f in [MANIFEST_NAME, *(e.file for e in manifest.exits)] + (
                [manifest.full_graph.file] if manifest.full_graph else []):
            shutil.copy2(export_dir / f, payload / f)
        for pkg in packages:
            _copy_package(Path(pkg).resolve(), payload / Path(pkg).resolve().name)
        for f in extra_files:
            shutil.copy2(f, payload / Path(f).name)
        for path in (payload, handler_path.resolve(), config_path.resolve()):
            _check_archiver_path(path)
        cmd = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name,
            "--version", version,
            "--handler", str(handler_path.resolve()),
            "--extra-files", str(payload),
            "--config-file", str(config_path.resolve()),
            "--export-path", str(out),
            "--archive-format", "default",
            "--force",
        ]
        log.info("running torch-model-archiver for %s %s", name, version)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)})
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise ExportError(f"torch-model-archiver failed (exit {proc.returncode}): {lines[-1] if lines else ''}")
        built = out / f"{name}.mar"
        verify_archive(built, handler=handler_path.name)
        digest = sha256_file(built)
        os.replace(built, target)
    finally:
        shutil.rmtree(staging)
    write_digest(target, digest)
    log.info("wrote %s (sha256 %s)", target, digest)
    return target


def digest_path(mar_path: str | Path) -> Path:
    """Where build_archive records an archive's sha256: `<name>.mar.sha256` beside it (`sha256sum -c` format).

    A record for copying the archive around, NOT the pin a server trusts: it sits beside the archive and could be
    replaced with it. The pin lives in the deployment's configuration (EE_MODEL_SHA256, serving/server.py)."""
    return Path(f"{mar_path}.sha256")


def write_digest(mar_path: str | Path, digest: str) -> Path:
    """Write `digest` (sha256 hex of the archive) to digest_path(mar_path); returns that path. OSError on failure."""
    path = digest_path(mar_path)
    path.write_text(f"{digest}  {Path(mar_path).name}\n")
    return path


def read_mar_manifest(mar_path: str | Path) -> dict[str, Any]:
    """TorchServe's own MAR-INF/MANIFEST.json (model name, version, handler, config file)."""
    with zipfile.ZipFile(mar_path) as z:
        return json.loads(z.read(MAR_MANIFEST))


def verify_archive(mar_path: str | Path, handler: str | None = None) -> Manifest:
    """Unpack a .mar into a temporary folder and check it the way a worker will see it.

    MAR-INF/MANIFEST.json names the handler and config that are present, early_exit/ is importable,
    and every graph matches the manifest's sha256.
    """
    mar_path = Path(mar_path)
    try:
        with zipfile.ZipFile(mar_path) as z, tempfile.TemporaryDirectory(prefix="mar-verify-") as tmp:
            names = set(z.namelist())
            if MAR_MANIFEST not in names:
                raise ExportError(f"{mar_path} has no {MAR_MANIFEST}")
            model = json.loads(z.read(MAR_MANIFEST)).get("model", {})
            expected = [model.get("handler"), model.get("configFile"), MANIFEST_NAME,
                        *(f"early_exit/{m}.py" for m in ("__init__", "costs", "manifest", "policy", "runner")),
                        *(f"serving/{m}.py" for m in ("__init__", "budget", "decoding", "metrics", "options",
                                                       "rejections"))]
            if handler is not None and model.get("handler") != handler:
                raise ExportError(f"{mar_path} names handler {model.get('handler')!r}, expected {handler!r}")
            missing = [n for n in expected if not n or n not in names]
            if missing:
                raise ExportError(f"{mar_path} lacks {', '.join(str(m) for m in missing)}")
            z.extractall(tmp)
            manifest = load_manifest(tmp)
            verify_files(manifest, tmp)
            return manifest
    except zipfile.BadZipFile as exc:
        raise ExportError(f"{mar_path} is not a zip archive ({exc})") from exc
