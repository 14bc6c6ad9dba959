"""Training configuration: one pydantic model, YAML presets, `key=value` overrides.

A preset is a name from `training/configs/` (`mnist-quick`) or the path of a YAML file of your own
(`/home/me/my-photos.yaml`: anything ending in .yaml/.yml or holding a path separator). The run's `name` is the
file's `name:` key, else the preset's name (a file's stem: `my-photos`); it names the run folder
`runs/<name>/` and the served model (`model_store/<name>.mar`, `/predictions/<name>`), so it may hold only
letters, digits, '-' and '_'. Relative paths inside a preset (data_dir, val_dir, test_dir, out_dir, weights_path)
are taken from the current directory, never from the preset file's folder: `make` runs from the repository root.

`TrainConfig` is the single place where a key, its type, its default and its allowed values are written.
Types are strict (a bool is not an int, a float is not an int, a string is not a number; an int is
accepted where a float is expected), unknown keys are errors, closed sets are enums, and every
validation failure is raised as `ConfigError` with one readable line (`field must be ..., got ...`).

The resolved config is saved beside every run (config.yaml) and inside every checkpoint.

Choices that the papers leave open, or that trade fidelity for CPU time, are config keys with their
reasons next to them (docs/method.md):
- `base_loss_weighting`: `rdi` (default) weighs the clean and adversarial cross-entropies by 0.5 each, as
  the RDI-Nets baseline does; `unweighted` sums them as docs/method.md writes NEO-KD's base loss. The
  default keeps `adv` and `neokd` on the same base loss, so NEO-KD's gain is the distillation alone, and
  keeps existing runs reproducible; `unweighted` doubles the CE terms' weight against the distillation terms.
- `attack_model_mode`: `eval` (default) crafts the training attack with dropout off and BatchNorm statistics
  frozen; `train` crafts it as the RDI-Nets code does (the model left in train mode: dropout live, and
  BatchNorm batch statistics used and its running statistics updated by every attack step).
- `clean_adv_forward`: `auto` (default) runs the clean and the adversarial rows through the network in two
  forwards when the model has BatchNorm (as RDI-Nets does: each forward's batch statistics come from one
  kind of input) and in one concatenated forward otherwise (no difference without BatchNorm, and cheaper).
- the quick-recipe levers: `attack_steps`, `step_size`, `attack_random_start`, `eps_warmup_iters`,
  `lr_schedule` (`multistep` | `onecycle`), `ema_decay` (weight averaging), `batch_size`, and the head
  dropout of `smallcnn` (`model_args: {dropout: p}`, 0.5 by default as in RDI-Nets' SmallCNN).
- `calibration_robust_tolerance`: thresholds fitted on clean validation images (null) or also on attacked
  ones (training/calibrate.py, "Robust calibration").
"""
from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from early_exit.validation import describe_errors

from early_exit.policy import ConfidenceMeasure
from early_exit.transform import Interpolation
from training.attacks.base import AttackModelMode
from training.data import DatasetName, TrainAugment
from training.losses import BaseLossWeighting, Method, RedrawPolicy
from training.models.heads import HeadKind

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "mnist-quick"
PRESET_SUFFIXES = (".yaml", ".yml")
# A run's name: the folder runs/<name>, the archive <name>.mar and the served model /predictions/<name>
# (TorchServe model names: letters, digits, '-' and '_').
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ConfigError(ValueError):
    """A bad preset name, unknown key or ill-typed value."""


class Optimizer(str, Enum):
    SGD = "sgd"
    ADAM = "adam"


class LRSchedule(str, Enum):
    """MULTISTEP: lr * lr_gamma at each of lr_milestones (RDI-Nets). ONECYCLE: torch's OneCycleLR over
    `iterations` with peak `lr`, warm-up share `onecycle_pct_start`, cosine annealing, momentum not cycled."""

    MULTISTEP = "multistep"
    ONECYCLE = "onecycle"


class TrainingAttack(str, Enum):
    """The attack adversarial training crafts its examples with (docs/method.md)."""

    MAX_AVERAGE = "max-average"
    AVERAGE = "average"


class Device(str, Enum):
    AUTO = "auto"  # cuda when available
    CPU = "cpu"
    CUDA = "cuda"


class CleanAdvForward(str, Enum):
    """How the training step runs the clean and the adversarial rows (see the module docstring)."""

    AUTO = "auto"  # SEPARATE for models with BatchNorm, JOINT otherwise
    JOINT = "joint"  # one forward over torch.cat([x, x_adv])
    SEPARATE = "separate"  # model(x), then model(x_adv)


# Field constraints (strictness itself comes from the model config: strict=True).
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


def _choice(default: Enum) -> Any:
    """An enum field: values are accepted by name in YAML and overrides (strict mode would want members)."""
    return Field(default, strict=False)


class TrainConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True, validate_default=True)

    # what
    name: str = "run"  # the run folder runs/<name> and the served model <name> (NAME_PATTERN)
    dataset: DatasetName = _choice(DatasetName.MNIST)
    data_dir: str = "data"
    model: str = "smallcnn"
    model_args: dict[str, Any] = Field(default_factory=dict)  # e.g. smallcnn: {dropout: 0.5}
    method: Method = _choice(Method.NEOKD)
    seed: NonNegativeInt = 0  # model init (same on every rank); rank r's randomness is derived from (seed, r)
    out_dir: str = "runs"
    device: Device = _choice(Device.AUTO)
    threads: NonNegativeInt = 0  # torch intra-op threads on CPU (0: torch's default)
    channels_last: bool = False  # NHWC weights (mkldnn); measure before turning on
    # data
    val_size: NonNegativeInt = 5000
    train_limit: PositiveInt | None = None  # use only the first N training samples (tests, quick checks)
    batch_size: PositiveInt = 256  # per rank under DDP
    num_workers: NonNegativeInt = 0
    # optimisation (iteration based, as in RDI-Nets)
    optimizer: Optimizer = _choice(Optimizer.SGD)
    iterations: PositiveInt = 13000
    lr: PositiveFloat = 0.033
    momentum: NonNegativeFloat = 0.9  # SGD only
    weight_decay: NonNegativeFloat = 5e-4
    lr_schedule: LRSchedule = _choice(LRSchedule.MULTISTEP)
    lr_milestones: list[PositiveInt] = Field(default_factory=lambda: [11700, 12900])  # multistep
    lr_gamma: PositiveFloat = 0.1  # multistep
    onecycle_pct_start: Annotated[float, Field(gt=0, lt=1)] = 0.3  # onecycle: share of iterations rising to lr
    # exponential moving average of the weights, updated after every step (torch.optim.swa_utils); the final
    # checkpoint holds the averaged weights. null: off (the last iterate). A common robust-training lever
    # (Rebuffi et al. 2021); on mnist-quick it measured no gain (training/configs/mnist-quick.yaml)
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None = None
    # training attack
    attack: TrainingAttack = _choice(TrainingAttack.MAX_AVERAGE)
    eps: NonNegativeFloat = 0.3
    step_size: PositiveFloat = 0.01
    attack_steps: NonNegativeInt = 40
    attack_random_start: bool = True  # PGD from a uniform point of the eps-ball (False: from x)
    attack_model_mode: AttackModelMode = _choice(AttackModelMode.EVAL)  # see the module docstring
    eps_warmup_iters: NonNegativeInt = 0  # ramp eps linearly from 0 over these iterations (0: off)
    clean_adv_forward: CleanAdvForward = _choice(CleanAdvForward.AUTO)
    # objective (docs/method.md)
    base_loss_weighting: BaseLossWeighting = _choice(BaseLossWeighting.RDI)  # see the module docstring
    alpha: NonNegativeFloat = 3.0
    beta: NonNegativeFloat = 1.0
    gamma: list[NonNegativeFloat] = Field(default_factory=lambda: [1.0, 1.0, 1.0])  # one weight per exit
    nkd_include_self: bool = True
    eokd_keep_ground_truth: bool = True
    eokd_redraw: RedrawPolicy = _choice(RedrawPolicy.BATCH)
    temperature: PositiveFloat = 1.0
    # evaluation
    eval_eps: NonNegativeFloat = 0.3
    eval_step_size: PositiveFloat = 0.01
    eval_steps: NonNegativeInt = 40
    eval_limit: PositiveInt | None = 1000  # test samples attacked (None: the whole test set)
    eval_batch_size: PositiveInt = 500
    slowdown_eps: NonNegativeFloat = 8 / 255
    slowdown_step_size: PositiveFloat = 0.002
    slowdown_steps: NonNegativeInt = 30
    strong_eval: bool = True  # per-exit APGD-CE/APGD-T and the adaptive policy attack (off: the papers' PGD only)
    apgd_steps: PositiveInt = 100  # iterations of each APGD run (AutoAttack's standard: 100)
    apgd_restarts: PositiveInt = 1  # random restarts of APGD-CE, and of APGD-T per target class
    apgd_target_classes: PositiveInt = 3  # APGD-T runs, one per top wrong class (AutoAttack's standard: 9)
    policy_attack_steps: PositiveInt = 50  # APGD-style steps of the adaptive attack on the early-exit policy
    policy_attack_restarts: PositiveInt = 1  # random restarts of the policy attack (per sample, the best iterate)
    policy_attack_kappa: PositiveFloat = 1.0  # cap (nats) on each exit's slack in the policy attack's CW-style loss
    # calibration
    confidence: ConfidenceMeasure = _choice(ConfidenceMeasure.MAX_PROB)
    calibration_tolerance: NonNegativeFloat = 0.003
    # robust calibration (training/calibrate.py): null = thresholds from clean validation images only; a value =
    # the policy's accuracy on attacked validation images may fall at most this far below the capped exit's
    calibration_robust_tolerance: NonNegativeFloat | None = None
    calibration_attack_limit: PositiveInt = 1000  # validation images attacked for it: the LAST ones of the split
    # bookkeeping
    log_every: PositiveInt = 50
    checkpoint_every: PositiveInt = 500
    # --- image folders and preprocessing (dataset: imagefolder; training/image_folders.py). data_dir is then a
    # folder in torchvision's ImageFolder layout (<data_dir>/<class>/<image>); the built-in datasets ignore these
    # keys. The split's file lists are saved as <out_dir>/<name>/split.json and reused by every later step.
    val_dir: str | None = None  # validation images (ImageFolder layout); null: val_size carved out of data_dir
    test_dir: str | None = None  # test images (ImageFolder layout); null: test_size carved out of data_dir
    test_size: NonNegativeInt = 5000  # carved out of data_dir (seeded, stratified like val_size) when no test_dir
    image_channels: Annotated[int, Field(ge=1, le=3)] = 3  # 1 (Pillow luma) or 3 (RGB): images are converted
    input_size: PositiveInt | None = None  # the model's input (square crop), required for imagefolder
    resize_size: PositiveInt | None = None  # evaluation: shorter side resized to this, then centre crop; null: input_size
    interpolation: Interpolation = _choice(Interpolation.BILINEAR)  # the resize filter (Pillow's), train and eval
    train_augment: TrainAugment = _choice(TrainAugment.AUTO)  # auto: crop-flip up to 64 px, resized-crop above
    crop_padding: NonNegativeInt = 4  # crop-flip: zero padding around the evaluation crop before the random crop
    # crop-flip: the training split's evaluation planes (float32) are decoded once into memory when they take at
    # most this many MiB (CIFAR-10's 40,000 at 32x32: 469 MiB), then cropped and flipped per item; above it, or 0,
    # every file is decoded again each epoch (resized-crop always is: its crop is drawn before the resize)
    decode_once_mib: NonNegativeInt = 2048
    mean: list[float] | None = None  # per channel; null: the named weights' (model_args.weights), else computed
    std: list[PositiveFloat] | None = None  # on the training split (saved in split.json)
    background: Annotated[float, Field(ge=0, le=1)] = 1.0  # what transparent pixels become, in [0, 1]
    skip_unreadable: bool = False  # leave out (and count) files Pillow cannot read instead of stopping
    # --- torchvision backbones (model: torchvision:<builder>; training/models/torchvision_net.py) -------------
    # where the early exits go: candidate names (python -m training.models torchvision:<builder> lists them) or
    # "flops:0.25,0.5" (nearest candidates by share of the backbone's MFLOPs); null: flops:0.33,0.67 (3 exits)
    exits: list[str] | str | None = None
    weights: str | None = None  # torchvision weights name (IMAGENET1K_V1, DEFAULT, ResNet18_Weights.IMAGENET1K_V1)
    weights_path: str | None = None  # a local state dict of the torchvision network (instead of `weights`)
    small_input_stem: bool = False  # resnet*: 3x3 stride-1 stem, no max-pool; efficientnet/mobilenet/regnet: stride 1
    head: HeadKind = _choice(HeadKind.CONV1X1)  # the early exits' head (training/models/heads.py)
    # iterations at the start with the stages frozen (BatchNorm kept in eval) and only the heads training, then
    # full training; any model, meant for pretrained weights
    heads_first_iterations: NonNegativeInt = 0
    # --- end torchvision backbones

    @field_validator("name")
    @classmethod
    def _name_is_a_model_name(cls, name: str) -> str:
        """ValueError (reported as its message) for a name TorchServe or the run folder would not take."""
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"name {name!r} may hold only letters, digits, '-' and '_' (starting with a letter or "
                             "digit): it names the run folder runs/<name> and the served model /predictions/<name>; "
                             "set name: in the preset")
        return name

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values (enums as their values), in declaration order."""
        return self.model_dump(mode="json")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def validate_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from plain values (a preset, a checkpoint's saved config); raises ConfigError (one line)."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None


def apply_overrides(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """Validate `cfg` with `values` applied as a whole, then update `cfg` in place (and return it)."""
    merged = validate_config({**{key: getattr(cfg, key) for key in TrainConfig.model_fields}, **values})
    for key in TrainConfig.model_fields:
        object.__setattr__(cfg, key, getattr(merged, key))
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _is_text_field(key: str) -> bool:
    field = TrainConfig.model_fields.get(key)
    return field is not None and field.annotation is str


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> values parsed as YAML (`iterations=100`, `gamma=[1,1,1]`, `eval_limit=null`).

    A text key keeps the text as written (`name=007` is the name "007", not the number 7).
    """
    parsed: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: {' '.join(str(exc).split())}") from None
        parsed[key] = raw if _is_text_field(key) and not isinstance(value, str) else value
    return parsed


def is_preset_file(preset: str) -> bool:
    """Whether `preset` names a YAML file of the user's own (a path) rather than one of training/configs/."""
    return preset.endswith(PRESET_SUFFIXES) or "/" in preset or "\\" in preset


def preset_path(preset: str) -> Path:
    """The YAML file of `preset` (a name in training/configs/ or a file path).

    Raises ConfigError (one line) when the file does not exist or a name is not one of the presets.
    """
    if is_preset_file(preset):
        path = Path(preset).expanduser()
        if not path.is_file():
            raise ConfigError(f"no preset file {preset}" + (" (it is a folder)" if path.is_dir() else "")
                              + f"; give a YAML file of config keys or one of: {', '.join(list_presets())}")
        return path
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(list_presets())}, "
                          "or the path of your own YAML file")
    return path


def preset_name(preset: str) -> str:
    """The default run name of `preset`: a preset's name, or a file's stem (`/tmp/my-photos.yaml` -> my-photos)."""
    return Path(preset).stem if is_preset_file(preset) else preset


def load_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> TrainConfig:
    """Preset YAML, then `key=value` overrides; the result is validated as a whole.

    `preset` is a name from training/configs/ or the path of a YAML file (see the module docstring); the run's
    name is the file's `name:` key, else `preset_name(preset)`. Raises ConfigError (one line) for a missing
    preset, a file that is not a mapping or not YAML, and any invalid key or value.
    """
    path = preset_path(preset)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset {path} is not YAML: {' '.join(str(exc).split())}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"preset {path} cannot be read: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"preset {path} must be a mapping of config keys")
    return validate_config({"name": preset_name(preset), **values, **parse_overrides(overrides or [])})


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
