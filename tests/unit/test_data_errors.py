"""A dataset that is neither on disk nor downloadable: one line naming the files and the folder, exit status 2.

No network is simulated by making every DNS look-up fail (as on a machine without network), and the shared
data folder is pointed at an empty one, so the real download code of torchvision runs and fails.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import training.data as data
from training import train
from training.data import DataError

REPO = Path(__file__).resolve().parents[2]
DATASETS = ["mnist", "fashion-mnist", "cifar10"]
PRESETS = {"mnist": "mnist-quick", "fashion-mnist": "fashion-quick", "cifar10": "cifar10-paper"}


def _no_network(*args: object, **kwargs: object) -> None:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DNS, no shared data; returns an empty data root."""
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.setattr(data, "SHARED_DATA", tmp_path / "no-shared-data")
    root = tmp_path / "data"
    root.mkdir()
    return root


def _expected_hint(name: str, root: Path) -> str:
    folder, files, source = data.offline_files(name, root)
    return f"put {', '.join(files)} (from {source}) into {folder}/"


@pytest.mark.parametrize("name", DATASETS)
def test_data_cli_prints_one_line_with_the_files_and_folder_and_exits_2(
        name: str, offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data.main(["--root", str(offline), name]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    folder, files, _source = data.offline_files(name, offline)
    assert line.startswith("error: ") and "could not be downloaded" in line
    assert "Name or service not known" in line
    assert all(file in line for file in files) and f"into {folder}/" in line, line


def test_the_files_named_are_torchvisions_own() -> None:
    """MNIST-like sets: the four .gz files in <root>/<Class>/raw/; CIFAR-10: the tarball in <root>/."""
    root = Path("data")
    assert data.offline_files("mnist", root) == (
        root / "MNIST" / "raw",
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz"),
        "https://ossci-datasets.s3.amazonaws.com/mnist/")
    folder, files, _ = data.offline_files("fashion-mnist", root)
    assert folder == root / "FashionMNIST" / "raw" and len(files) == 4
    assert data.offline_files("cifar10", root)[:2] == (root, ("cifar-10-python.tar.gz",))


@pytest.mark.parametrize("name", DATASETS)
def test_loading_a_missing_dataset_names_the_command_and_the_files(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        data.load_tensors(name, tmp_path, "train")
    message = str(info.value)
    assert "\n" not in message
    assert f"python -m training.data --root {tmp_path} {name}" in message
    assert _expected_hint(name, tmp_path) in message


@pytest.mark.parametrize("name", DATASETS)
def test_train_cli_on_a_missing_dataset_prints_one_line_and_exits_2(
        name: str, offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--preset", PRESETS[name], f"data_dir={offline}", "device=cpu"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert _expected_hint(name, offline) in errors[0]


def test_data_module_run_as_make_runs_it_ends_in_one_line_not_a_traceback(tmp_path: Path) -> None:
    """`python -m training.data --root data cifar10` as `make train-export PRESET=cifar10-paper` runs it,
    in a fresh interpreter with the CLI's own logging set-up (no network there either)."""
    script = (
        "import socket, sys\n"
        "def no_network(*args, **kwargs):\n"
        "    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')\n"
        "socket.getaddrinfo = no_network\n"
        "import training.data as data\n"
        "data.SHARED_DATA = data.Path(sys.argv[1])\n"
        "sys.exit(data.main(sys.argv[2:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "none"), "--root", str(tmp_path / "data"),
                           "cifar10"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: CIFAR10 is missing under ") and "cifar-10-python.tar.gz" in line, line
