"""Training configuration: a dataclass, YAML presets in `training/configs/`, `key=value` overrides.

The resolved config is saved beside every run (config.yaml) and inside every checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.losses import Method

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "mnist-quick"


class ConfigError(ValueError):
    """A bad preset name, unknown key or ill-typed value."""


@dataclass
class TrainConfig:
    # what
    name: str = "run"
    dataset: str = "mnist"
    data_dir: str = "data"
    model: str = "smallcnn"
    model_args: dict[str, Any] = field(default_factory=dict)
    method: Method = Method.NEOKD
    seed: int = 0
    out_dir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads on CPU (0: torch's default)
    channels_last: bool = False  # NHWC weights (mkldnn); measure before turning on
    # data
    val_size: int = 5000
    train_limit: int | None = None  # use only the first N training samples (tests, quick checks)
    batch_size: int = 256
    num_workers: int = 0
    # optimisation (iteration based, as in RDI-Nets)
    optimizer: str = "sgd"  # sgd | adam
    iterations: int = 13000
    lr: float = 0.033
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: list[int] = field(default_factory=lambda: [11700, 12900])
    lr_gamma: float = 0.1
    # training attack
    attack: str = "max-average"  # max-average | average
    eps: float = 0.3
    step_size: float = 0.01
    attack_steps: int = 40
    eps_warmup_iters: int = 0  # ramp eps linearly from 0 over these iterations (0: off)
    # objective (docs/method.md)
    clean_weight: float = 0.5
    adv_weight: float = 0.5
    alpha: float = 3.0
    beta: float = 1.0
    gamma: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    nkd_include_self: bool = True
    eokd_keep_ground_truth: bool = True
    eokd_redraw: str = "batch"  # batch | fixed
    temperature: float = 1.0
    # evaluation
    eval_eps: float = 0.3
    eval_step_size: float = 0.01
    eval_steps: int = 40
    eval_limit: int | None = 1000  # test samples attacked (None: the whole test set)
    eval_batch_size: int = 500
    slowdown_eps: float = 8 / 255
    slowdown_step_size: float = 0.002
    slowdown_steps: int = 30
    # calibration
    confidence: str = "max_prob"
    calibration_tolerance: float = 0.003
    # bookkeeping
    log_every: int = 50
    checkpoint_every: int = 500

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method.value
        return d

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _coerce(key: str, value: Any, current: Any, annotation: str) -> Any:
    if key == "method":
        try:
            return Method(value)
        except ValueError:
            raise ConfigError(f"method must be one of {[m.value for m in Method]}, got {value!r}") from None
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{key} may not be null")
    if isinstance(current, bool) or annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation.startswith("list") and not isinstance(value, list):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if annotation.startswith("dict") and not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    if annotation == "str" and not isinstance(value, str):
        return str(value)
    return value


def apply_overrides(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {key!r}")
        setattr(cfg, key, _coerce(key, value, getattr(cfg, key), str(fields[key].type)))
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> TrainConfig:
    """Preset YAML, then `key=value` overrides (values parsed as YAML: `iterations=100`, `gamma=[1,1,1]`)."""
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(list_presets())}")
    values = yaml.safe_load(path.read_text()) or {}
    cfg = apply_overrides(TrainConfig(name=preset), values)
    parsed: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            parsed[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: {exc}") from None
    apply_overrides(cfg, parsed)
    if cfg.optimizer not in ("sgd", "adam"):
        raise ConfigError(f"optimizer must be sgd or adam, got {cfg.optimizer!r}")
    if cfg.attack not in ("max-average", "average"):
        raise ConfigError(f"attack must be max-average or average, got {cfg.attack!r}")
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
