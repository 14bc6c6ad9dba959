"""Datasets: MNIST-like sets as in-memory tensors, CIFAR-10 through torchvision; a held-out validation split.

`prepare_data` copies the verified `.gz` files from ../shared/data when that
folder exists, otherwise torchvision downloads them; torchvision's own loader
then unpacks and verifies them (MD5) either way. A dataset that is neither on
disk nor downloadable raises `DataError` with one line naming the files to put
in which folder (`offline_files`); the CLIs print it and exit with status 2.
"""
from __future__ import annotations

import http.client
import logging
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

log = logging.getLogger(__name__)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class DatasetName(str, Enum):
    MNIST = "mnist"
    FASHION_MNIST = "fashion-mnist"
    CIFAR10 = "cifar10"


class Split(str, Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


@dataclass(frozen=True)
class DatasetInfo:
    name: DatasetName
    folder: str  # torchvision's class name, also its folder under root
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # What a transparent pixel of a client's image stands for, in [0, 1]: the digits and garments of MNIST and
    # Fashion-MNIST sit on black; CIFAR-10 photographs have no background colour of their own, white is a guess.
    background: float = 0.0

    def to_dict(self) -> dict:
        return {"name": self.name.value, "input_shape": list(self.input_shape), "classes": list(self.classes),
                "background": self.background}


INFO: dict[DatasetName, DatasetInfo] = {
    DatasetName.MNIST: DatasetInfo(DatasetName.MNIST, "MNIST", (1, 28, 28), tuple(str(i) for i in range(10)),
                                   (0.1307,), (0.3081,)),
    DatasetName.FASHION_MNIST: DatasetInfo(
        DatasetName.FASHION_MNIST, "FashionMNIST", (1, 28, 28),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        (0.2860,), (0.3530,)),
    DatasetName.CIFAR10: DatasetInfo(
        DatasetName.CIFAR10, "CIFAR10", (3, 32, 32),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), background=1.0),
}


class DataError(RuntimeError):
    """Data folder missing or unusable."""


def dataset_info(name: DatasetName | str) -> DatasetInfo:
    try:
        return INFO[DatasetName(name)]
    except ValueError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(d.value for d in DatasetName)}") from None


def _torchvision_class(info: DatasetInfo):
    from torchvision import datasets

    return getattr(datasets, info.folder)


def offline_files(name: DatasetName | str, root: str | Path) -> tuple[Path, tuple[str, ...], str]:
    """(folder, file names, where they are published): the files torchvision finds in that folder, checks
    (MD5) and unpacks without downloading anything. The names come from torchvision's own dataset class."""
    info = dataset_info(name)
    cls = _torchvision_class(info)
    root = Path(root)
    if info.name is DatasetName.CIFAR10:
        return root, (cls.filename,), cls.url
    return root / info.folder / "raw", tuple(file for file, _md5 in cls.resources), cls.mirrors[0]


def _one_line(exc: BaseException) -> str:
    """`Type: message` on one line (torchvision's download errors span several)."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _put_files_hint(info: DatasetInfo, root: Path) -> str:
    folder, files, source = offline_files(info.name, root)
    return f"put {', '.join(files)} (from {source}) into {folder}/"


def prepare_data(name: DatasetName | str, root: str | Path, download: bool = True) -> Path:
    """Make `root` hold the dataset: copy the shared files if present, then let torchvision unpack/verify
    (downloading what is still missing when `download`). DataError, one line, when that is impossible."""
    info = dataset_info(name)
    root = Path(root)
    shared_folder, files, _source = offline_files(info.name, SHARED_DATA)
    folder = offline_files(info.name, root)[0]
    for file in files:
        if (shared_folder / file).is_file() and not (folder / file).exists():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(shared_folder / file, folder / file)
            log.info("copied %s", file)
    cls = _torchvision_class(info)
    for train in (True, False):
        try:
            cls(str(root), train=train, download=download)
        # RuntimeError: torchvision's "Dataset not found", "Error downloading ...", "File not found or
        # corrupted"; OSError: no network (URLError, socket errors, timeouts); HTTPException: cut transfers.
        except (RuntimeError, OSError, http.client.HTTPException) as exc:
            missing = f"{info.folder} is missing under {root}" + (" and could not be downloaded" if download else "")
            raise DataError(f"{missing} ({_one_line(exc)}): {_put_files_hint(info, root)} and run again") from exc
    return root


def _split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def load_tensors(
    name: DatasetName | str, root: str | Path, split: Split | str, val_size: int = 5000, seed: int = 0,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) with x float32 N x C x H x W in [0, 1]. VAL is a seeded hold-out of the training set, never TEST."""
    info = dataset_info(name)
    split = Split(split)
    root = Path(root)
    cls = _torchvision_class(info)
    try:
        ds = cls(str(root), train=split is not Split.TEST, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{info.folder} is missing or incomplete under {root}: run `python -m training.data "
                        f"--root {root} {info.name.value}` (offline: {_put_files_hint(info, root)} first)") from exc
    data = torch.as_tensor(ds.data)
    targets = torch.as_tensor(ds.targets, dtype=torch.long)
    x = data.float().div_(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    if split is not Split.TEST:
        train_idx, val_idx = _split_indices(len(x), val_size, seed)
        idx = train_idx if split is Split.TRAIN else val_idx
        x, targets = x[idx], targets[idx]
    if limit is not None:
        x, targets = x[:limit], targets[:limit]
    return x, targets


class AugmentedTensorDataset(Dataset):
    """The CIFAR-10 training augmentation on [0, 1] tensors: torchvision's RandomCrop(size, padding=4) and
    RandomHorizontalFlip.

    The transforms draw from torch's global generator of the process that runs `__getitem__`: in the main
    process (num_workers=0) that is the trainer's seeded generator (saved and restored on resume); in a
    DataLoader worker it is the worker's own, which torch seeds with the loader's per-epoch base seed plus
    the worker id, so workers never repeat each other's crops and flips (`seed_worker` seeds numpy and
    `random` from it too).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from torchvision import transforms

        self.x, self.y = x, y
        self.transform = transforms.Compose([
            transforms.RandomCrop(tuple(x.shape[2:]), padding=4),
            transforms.RandomHorizontalFlip(),
        ])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.x[i]), self.y[i]


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed numpy and `random` from the worker's torch seed (base seed + id)."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def training_dataset(name: DatasetName | str, root: str | Path, val_size: int, seed: int,
                     limit: int | None = None) -> Dataset:
    """The training split (`seed` draws the validation hold-out); CIFAR-10 with its augmentation."""
    x, y = load_tensors(name, root, Split.TRAIN, val_size, seed, limit)
    if dataset_info(name).name is DatasetName.CIFAR10:
        return AugmentedTensorDataset(x, y)
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> int:
    """`python -m training.data [--root data] mnist fashion-mnist`: fill the data folder."""
    import argparse
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m training.data", description=main.__doc__)
    p.add_argument("--root", default="data")
    p.add_argument("datasets", nargs="+")
    args = p.parse_args(argv)
    try:
        for name in args.datasets:
            prepare_data(name, args.root)
            log.info("%s ready under %s", name, args.root)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
