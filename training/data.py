"""Datasets: MNIST-like sets as in-memory tensors, CIFAR-10 through torchvision; a held-out validation split.

`prepare_data` copies the verified `.gz` files from ../shared/data when that
folder exists, otherwise torchvision downloads them; torchvision's own loader
then unpacks and verifies them (MD5) either way.
"""
from __future__ import annotations

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

    def to_dict(self) -> dict:
        return {"name": self.name.value, "input_shape": list(self.input_shape), "classes": list(self.classes)}


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
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
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


def prepare_data(name: DatasetName | str, root: str | Path, download: bool = True) -> Path:
    """Make `root` hold the dataset: copy shared .gz files if present, then let torchvision unpack/verify."""
    info = dataset_info(name)
    root = Path(root)
    shared_raw = SHARED_DATA / info.folder / "raw"
    raw = root / info.folder / "raw"
    if shared_raw.is_dir() and info.name is not DatasetName.CIFAR10:
        raw.mkdir(parents=True, exist_ok=True)
        for gz in shared_raw.glob("*.gz"):
            if not (raw / gz.name).exists():
                shutil.copy2(gz, raw / gz.name)
                log.info("copied %s", gz.name)
    cls = _torchvision_class(info)
    for train in (True, False):
        try:
            cls(str(root), train=train, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True"
            raise DataError(f"{info.folder} not found under {root} ({exc}); run `make data`") from exc
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
    if not (root / info.folder).is_dir():
        raise DataError(f"data folder {root / info.folder} does not exist; run `make data`")
    cls = _torchvision_class(info)
    try:
        ds = cls(str(root), train=split is not Split.TEST, download=False)
    except RuntimeError as exc:
        raise DataError(f"{info.folder} under {root} is incomplete ({exc}); run `make data`") from exc
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
    """Random crop (padding 4) and horizontal flip on tensors: the CIFAR-10 training augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> None:
        self.x, self.y = x, y
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.nn.functional.pad(self.x[i], (4, 4, 4, 4))
        dx, dy = torch.randint(0, 9, (2,), generator=self.gen).tolist()
        img = img[:, dy:dy + self.x.shape[2], dx:dx + self.x.shape[3]]
        if torch.rand(1, generator=self.gen).item() < 0.5:
            img = img.flip(-1)
        return img, self.y[i]


def training_dataset(name: DatasetName | str, root: str | Path, val_size: int, seed: int,
                     limit: int | None = None) -> Dataset:
    x, y = load_tensors(name, root, Split.TRAIN, val_size, seed, limit)
    if dataset_info(name).name is DatasetName.CIFAR10:
        return AugmentedTensorDataset(x, y, seed)
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
