"""TrainConfig: defaults, strict types, enums, one-line ConfigErrors, presets, overrides, save/load round trip;
the one pydantic error formatter (early_exit.validation) the handler options and model-config.yaml share."""
from __future__ import annotations

import os

import pytest
import yaml

from early_exit.policy import ConfidenceMeasure
from training.attacks import AttackModelMode
from training.config import (
    CleanAdvForward,
    ConfigError,
    Device,
    LRSchedule,
    Optimizer,
    TrainConfig,
    TrainingAttack,
    apply_overrides,
    list_presets,
    load_config,
    parse_overrides,
    save_config,
)
from training.data import DatasetName
from training.losses import BaseLossWeighting, Method, RedrawPolicy


def test_defaults_are_the_rdi_nets_mnist_recipe_and_today_s_choices():
    cfg = TrainConfig()
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.iterations) == (Optimizer.SGD, 0.033, 256, 13000)
    assert (cfg.attack, cfg.eps, cfg.step_size, cfg.attack_steps) == (TrainingAttack.MAX_AVERAGE, 0.3, 0.01, 40)
    assert cfg.base_loss_weighting is BaseLossWeighting.RDI and cfg.base_loss_weighting.weights == (0.5, 0.5)
    assert cfg.attack_model_mode is AttackModelMode.EVAL and cfg.attack_random_start is True
    assert cfg.lr_schedule is LRSchedule.MULTISTEP and cfg.clean_adv_forward is CleanAdvForward.AUTO
    assert cfg.method is Method.NEOKD and cfg.eokd_redraw is RedrawPolicy.BATCH
    assert cfg.confidence is ConfidenceMeasure.MAX_PROB and cfg.device is Device.AUTO
    assert cfg.dataset is DatasetName.MNIST
    assert TrainConfig().gamma is not cfg.gamma  # mutable defaults are not shared


def test_to_dict_holds_plain_values_and_round_trips(tmp_path):
    cfg = load_config("mnist-quick", ["method=adv", "eval_limit=null", "confidence=entropy"])
    d = cfg.to_dict()
    assert d["method"] == "adv" and d["optimizer"] == "adam" and d["confidence"] == "entropy"
    assert d["eval_limit"] is None and type(d["method"]) is str
    save_config(cfg, tmp_path / "config.yaml")
    loaded = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert loaded == d and list(loaded) == list(TrainConfig.model_fields)
    assert TrainConfig.model_validate(loaded) == cfg
    assert cfg.run_dir == __import__("pathlib").Path("runs") / "mnist-quick"


@pytest.mark.parametrize("values, message", [
    ({"iterations": True}, "iterations must be an integer, got True"),
    ({"iterations": 2.0}, "iterations must be an integer, got 2.0"),
    ({"iterations": "12"}, "iterations must be an integer, got '12'"),
    ({"lr": True}, "lr must be a number, got True"),
    ({"lr": "0.1"}, "lr must be a number"),
    ({"channels_last": 1}, "channels_last must be true or false, got 1"),
    ({"gamma": [1.0, "x", 1.0]}, "gamma[1] must be a number, got 'x'"),
    ({"gamma": 1.0}, "gamma must be a list"),
    ({"model_args": [1]}, "model_args must be a mapping"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"onecycle_pct_start": 1.0}, "onecycle_pct_start must be < 1"),
    ({"optimizer": "rmsprop"}, "optimizer must be one of 'sgd' or 'adam', got 'rmsprop'"),
    ({"attack": "single"}, "attack must be one of 'max-average' or 'average'"),
    ({"method": "magic"}, "method must be one of 'clean', 'adv' or 'neokd'"),
    ({"device": "tpu"}, "device must be one of"),
    ({"eokd_redraw": "epoch"}, "eokd_redraw must be one of 'batch' or 'fixed'"),
    ({"confidence": "margin"}, "confidence must be one of 'max_prob' or 'entropy'"),
    ({"attack_model_mode": "frozen"}, "attack_model_mode must be one of 'eval' or 'train'"),
    ({"base_loss_weighting": "half"}, "base_loss_weighting must be one of 'rdi' or 'unweighted'"),
    ({"lr_schedule": "cosine"}, "lr_schedule must be one of 'multistep' or 'onecycle'"),
    ({"dataset": "svhn"}, "dataset must be one of"),
    ({"train_limit": None, "no_such_key": 1}, "unknown config key 'no_such_key'"),
    # the evaluation's attack settings are validated here, where they are declared
    ({"apgd_steps": 0}, "apgd_steps must be >= 1, got 0"),
    ({"apgd_restarts": 0}, "apgd_restarts must be >= 1, got 0"),
    ({"apgd_target_classes": 0}, "apgd_target_classes must be >= 1, got 0"),
    ({"policy_attack_steps": -1}, "policy_attack_steps must be >= 1, got -1"),
    ({"policy_attack_restarts": 0}, "policy_attack_restarts must be >= 1, got 0"),
    ({"policy_attack_kappa": 0.0}, "policy_attack_kappa must be > 0"),
    ({"policy_attack_kappa": "big"}, "policy_attack_kappa must be a number"),
])
def test_bad_values_raise_one_line_config_errors(values, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainConfig(), values)
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_several_problems_are_reported_together_on_one_line():
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainConfig(), {"iterations": "x", "eps": -1.0})
    text = str(info.value)
    assert "iterations must be an integer" in text and "eps must be >= 0" in text and "\n" not in text


def test_construction_and_assignment_are_validated_too():
    with pytest.raises(ConfigError, match="unknown config key 'lr_decay'"):
        TrainConfig(lr_decay=0.1)
    with pytest.raises(ConfigError, match="iterations must be an integer"):
        TrainConfig(iterations="many")
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        cfg.batch_size = 1.5
    cfg.method = "adv"  # enum values are accepted by value
    assert cfg.method is Method.ADV
    assert cfg.batch_size == 256


def test_int_is_accepted_where_a_float_is_expected():
    cfg = apply_overrides(TrainConfig(), {"lr": 1, "gamma": [1, 2, 3], "weight_decay": 0})
    assert cfg.lr == 1.0 and type(cfg.lr) is float and cfg.gamma == [1.0, 2.0, 3.0]


def test_apply_overrides_updates_in_place_and_validates_as_a_whole():
    cfg = TrainConfig()
    out = apply_overrides(cfg, {"method": "clean", "iterations": 5})
    assert out is cfg and cfg.method is Method.CLEAN and cfg.iterations == 5
    with pytest.raises(ConfigError):
        apply_overrides(cfg, {"iterations": 7, "lr": "fast"})
    assert cfg.iterations == 5, "a failed override leaves the config untouched"


def test_presets_load_and_keep_their_values():
    assert {"mnist-quick", "mnist-paper", "fashion-quick", "cifar10-paper"} <= set(list_presets())
    for preset in list_presets():
        assert load_config(preset).name == preset
    quick = load_config("mnist-quick")
    assert (quick.optimizer, quick.lr_schedule, quick.batch_size, quick.iterations, quick.attack_steps,
            quick.step_size, quick.eps_warmup_iters) == (Optimizer.ADAM, LRSchedule.ONECYCLE, 128, 2000, 3, 0.12, 400)
    assert quick.calibration_robust_tolerance == 0.01 and quick.ema_decay is None
    cifar = load_config("cifar10-paper")
    assert cifar.dataset is DatasetName.CIFAR10 and cifar.model_args == {"blocks_per_stage": 6}


def test_overrides_parse_yaml_but_keep_text_keys_as_written():
    assert parse_overrides(["iterations=100", "gamma=[1, 1, 1.5]", "eval_limit=null", "name=007", "out_dir=2024"]) \
        == {"iterations": 100, "gamma": [1, 1, 1.5], "eval_limit": None, "name": "007", "out_dir": "2024"}
    assert load_config("mnist-quick", ["name=007"]).name == "007"
    with pytest.raises(ConfigError, match="not key=value"):
        load_config("mnist-quick", ["iterations"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="iterations must be an integer, got 'lots'"):
        load_config("mnist-quick", ["iterations=lots"])


def test_every_default_is_written_once():
    """No default is repeated outside the model: TrainConfig() is the only source of defaults."""
    fields = TrainConfig.model_fields
    assert all(not f.is_required() for f in fields.values())
    assert TrainConfig().to_dict() == TrainConfig.model_validate({}).to_dict()


def test_one_error_formatter_serves_every_pydantic_model():
    """Training config, handler options and model-config.yaml name their problems the same way, on one line."""
    from export.archive import ServeConfig
    from export.errors import ExportError
    from serving.options import HandlerOptions, OptionsError

    with pytest.raises(OptionsError) as info:
        HandlerOptions.from_config({"top_k": 0, "max_payload_byte": 1, "audit_rate": "x" * 200})
    text = str(info.value)
    assert text.startswith("model-config.yaml handler section: ") and "\n" not in text
    assert "top_k must be >= 1, got 0" in text and "unknown config key 'max_payload_byte'" in text
    assert "audit_rate must be a number" in text and "x" * 100 not in text  # a long value is shortened
    with pytest.raises(ExportError) as info:
        ServeConfig.from_values(min_workers=3, max_workers=2)
    assert str(info.value) == "model-config.yaml: max_workers (2) is below min_workers (3)"


# ----------------------------------------------------------------------------- presets of the user's own
def test_a_preset_file_outside_the_repository_loads_with_its_stem_as_the_run_name(tmp_path, monkeypatch):
    (tmp_path / "my-photos.yaml").write_text("dataset: imagefolder\ndata_dir: photos\ninput_size: 32\n"
                                             "model: torchvision:resnet18\nexits: [layer1, layer2]\n")
    monkeypatch.chdir(tmp_path.parent)  # the preset is read from its path, not from training/configs
    cfg = load_config(str(tmp_path / "my-photos.yaml"), ["iterations=3"])
    assert (cfg.name, cfg.dataset, cfg.data_dir, cfg.exits, cfg.iterations) == (
        "my-photos", DatasetName.IMAGEFOLDER, "photos", ["layer1", "layer2"], 3)
    assert cfg.run_dir == __import__("pathlib").Path("runs") / "my-photos"
    (tmp_path / "other.yml").write_text("name: holiday_2024\niterations: 7\n")
    assert load_config(str(tmp_path / "other.yml")).name == "holiday_2024", "name: in the file wins over the stem"
    assert load_config(str(tmp_path / "other.yml"), ["name=x"]).name == "x", "an override wins over both"
    monkeypatch.chdir(tmp_path)
    assert load_config("other.yml").iterations == 7, "a bare file name ending in .yml is a file, not a preset name"


def test_relative_paths_in_a_preset_file_stay_relative_to_the_current_directory(tmp_path):
    """Documented (README, training/config.py): data_dir is not rebased on the preset file's folder."""
    (tmp_path / "p.yaml").write_text("data_dir: photos\n")
    assert load_config(str(tmp_path / "p.yaml")).data_dir == "photos"


@pytest.mark.parametrize("text, message", [
    (None, "no preset file {path}; give a YAML file of config keys or one of: cifar10-jpeg-quick, cifar10-paper"),
    ("- a\n- b\n", "preset {path} must be a mapping of config keys"),
    ("iterations: [1\n", "preset {path} is not YAML: while parsing"),
    ("nope: 1\n", "unknown config key 'nope'"),
])
def test_a_bad_preset_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert message.format(path=path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["my photos", "my.photos", "-x", "ü", "a/b", ""])
def test_a_run_name_torchserve_would_refuse_is_one_line(tmp_path, name):
    with pytest.raises(ConfigError, match=r"may hold only letters, digits, '-' and '_'") as info:
        TrainConfig(name=name)
    assert "\n" not in str(info.value)
    if "/" not in name and name:
        (tmp_path / f"{name}.yaml").write_text("iterations: 5\n")
        with pytest.raises(ConfigError, match=r"name '.*' may hold only"):
            load_config(str(tmp_path / f"{name}.yaml"))


@pytest.mark.parametrize("name", ["mnist-quick", "cifar10-jpeg-quick", "my_photos", "007", "A"])
def test_names_torchserve_accepts_are_kept(name):
    assert TrainConfig(name=name).name == name


def test_train_cli_refuses_a_missing_preset_file_with_one_line_and_status_2(tmp_path, capsys):
    from training.train import main

    missing = tmp_path / "my-photos.yaml"
    assert main(["--preset", str(missing), "iterations=1"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: no preset file {missing}; give a YAML file of config keys or one of: " \
                  f"{', '.join(list_presets())}\n"
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- the Makefile's names for a preset
def _make_n(*args: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    from pathlib import Path

    # Run as a top-level make even under `make test` (whose MAKEFLAGS/MAKELEVEL would add "Entering directory").
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    return subprocess.run(["make", "-n", *args], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=60, env=env)


def test_make_names_the_run_and_the_archive_after_the_preset(tmp_path):
    for preset in ("mnist-quick", "mnist-paper"):  # both once made model_store/mnist.mar
        proc = _make_n("train-export", f"PRESET={preset}")
        assert proc.returncode == 0, proc.stderr
        assert f"--preset {preset} name={preset} out_dir=runs" in proc.stdout
        assert f"--name {preset} --out-dir artifacts/export/{preset}" in proc.stdout
        assert f"runs/{preset}/checkpoint.pt" in proc.stdout and f"model_store/{preset}.mar" in proc.stdout
    own = tmp_path / "my-photos.yaml"
    own.write_text(f"dataset: imagefolder\ndata_dir: {tmp_path}/photos   # a comment\ninput_size: 32\n")
    proc = _make_n("train-export", f"PRESET={own}")
    assert proc.returncode == 0, proc.stderr
    assert f"--preset {own} name=my-photos out_dir=runs" in proc.stdout
    assert "--name my-photos" in proc.stdout and "model_store/my-photos.mar" in proc.stdout
    assert "training.data" not in proc.stdout, "your own folder: nothing to download"
    # A folder under data/ that is not there yet is unpacked from the shared archive of that name.
    own.write_text("name: 'holiday_2024'  # quoted\nout_dir: elsewhere\ndataset: imagefolder\n"
                   "data_dir: data/cifar10-jpeg/not-unpacked-yet\n")
    proc = _make_n("train-export", f"PRESET={own}")
    assert proc.returncode == 0, proc.stderr
    assert "name=holiday_2024 out_dir=elsewhere" in proc.stdout and "elsewhere/holiday_2024/checkpoint.pt" in proc.stdout
    assert "model_store/holiday_2024.mar" in proc.stdout
    assert "training.data --root data cifar10-jpeg" in proc.stdout, "the shared archive the folder unpacks from"


def test_make_serve_with_a_name_alone_finds_the_preset_of_that_name():
    proc = _make_n("serve", "NAME=fashion-quick")
    assert proc.returncode == 0, proc.stderr
    assert "--preset fashion-quick name=fashion-quick" in proc.stdout and "--models fashion-quick.mar" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["train-export", "PRESET={tmp}/none.yaml"], "no preset file {tmp}/none.yaml: PRESET is one of "),
    (["train-export", "PRESET=nope"], "no preset file training/configs/nope.yaml"),
    (["serve", "NAME=no-such-run-here"], "no run runs/no-such-run-here and no preset "
                                          "training/configs/no-such-run-here.yaml: make train-export PRESET="),
    (["train-export", "NAME=a.b"], "NAME 'a.b' may hold only letters, digits, '-' and '_'"),
    (["serve", "PRESET=mnist-quick", "NAME=a b"], "NAME 'a b' may hold only letters, digits, '-' and '_'"),
    (["train-export", "PRESET={tmp}/my photos.yaml"], "NAME 'my photos' may hold only"),
])
def test_make_refuses_a_missing_preset_or_a_bad_name_with_one_line(tmp_path, args, message):
    proc = _make_n(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert message.format(tmp=tmp_path) in line, line


def test_make_refuses_a_preset_whose_name_torchserve_would_refuse(tmp_path):
    (tmp_path / "my.photos.yaml").write_text("iterations: 3\n")
    proc = _make_n("train-export", f"PRESET={tmp_path}/my.photos.yaml")
    assert proc.returncode == 2 and "NAME 'my.photos' may hold only" in proc.stderr
    assert _make_n("help", "PRESET=/nowhere.yaml").returncode == 0, "goals that read no run ignore PRESET"
