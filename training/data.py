"""Datasets: MNIST-like sets as in-memory tensors, CIFAR-10 through torchvision, and your own image folders
(`imagefolder`); a held-out validation split.

`prepare_data` copies the verified `.gz` files from ../shared/data when that
folder exists, otherwise torchvision downloads them; torchvision's own loader
then unpacks and verifies them (MD5) either way. A dataset that is neither on
disk nor downloadable raises `DataError` with one line naming the files to put
in which folder (`offline_files`); the CLIs print it and exit with status 2.
`prepare_archive` unpacks a shared archive of images in class folders (`ARCHIVES`: cifar10-jpeg) after checking
its sha256.

Image folders (`dataset: imagefolder`, training/image_folders.py) are read file by file in DataLoader workers;
their evaluation images go through `early_exit.transform.EvalTransform`, the code the server applies to client
images.
"""
from __future__ import annotations

import http.client
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from early_exit.manifest import sha256_file
from early_exit.transform import EvalTransform

log = logging.getLogger(__name__)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class DatasetName(str, Enum):
    MNIST = "mnist"
    FASHION_MNIST = "fashion-mnist"
    CIFAR10 = "cifar10"
    IMAGEFOLDER = "imagefolder"  # your own images, one sub-folder per class (training/image_folders.py)


class TrainAugment(str, Enum):
    """The training augmentation of an image folder (training/image_folders.py)."""

    AUTO = "auto"  # CROP_FLIP for inputs of at most 64 pixels, RESIZED_CROP above
    CROP_FLIP = "crop-flip"  # the evaluation crop, padded by crop_padding, a random crop of it, random flip
    RESIZED_CROP = "resized-crop"  # torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3), random flip
    NONE = "none"  # the evaluation transform


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
    # The evaluation transform (None: the one of the input shape, which leaves an image of that size unchanged).
    transform: EvalTransform | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # image folders: data_dir and the split file

    @property
    def eval_transform(self) -> EvalTransform:
        return self.transform or EvalTransform.for_shape(self.input_shape)

    def to_dict(self) -> dict:
        """The checkpoint's `dataset` entry: name, input_shape, classes, background, transform (and extra keys)."""
        return {"name": self.name.value, "input_shape": list(self.input_shape), "classes": list(self.classes),
                "background": self.background, "transform": self.eval_transform.to_dict(), **self.extra}


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


def dataset_info(name: DatasetName | str, config: Any = None) -> DatasetInfo:
    """The dataset's description. A built-in set's is fixed; an image folder's comes from the folder and the
    run's config (a TrainConfig or its dict: classes from the folder names, input shape and transform from the
    preprocessing keys, mean/std given, of the named weights, or computed on the training split; it makes the
    run's split file on first use). DataError (one line) for an unknown name or an unusable folder."""
    try:
        name = DatasetName(name)
    except ValueError:
        known = [d.value for d in DatasetName] + list(ARCHIVES)
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(known)}") from None
    if name is DatasetName.IMAGEFOLDER:
        from training.image_folders import folder_info

        return folder_info(_require_config(config))
    return INFO[name]


def _is_imagefolder(name: DatasetName | str) -> bool:
    return name in (DatasetName.IMAGEFOLDER, DatasetName.IMAGEFOLDER.value)


def _require_config(config: Any) -> Any:
    if config is None:
        raise DataError("dataset imagefolder needs the run's config (pass config=cfg): its folders, split file and "
                        "preprocessing are config keys")
    return config


def _torchvision_class(info: DatasetInfo):
    from torchvision import datasets

    return getattr(datasets, info.folder)


def offline_files(name: DatasetName | str, root: str | Path) -> tuple[Path, tuple[str, ...], str]:
    """(folder, file names, where they are published): the files torchvision finds in that folder, checks
    (MD5) and unpacks without downloading anything. The names come from torchvision's own dataset class."""
    info = dataset_info(name)
    if info.name is DatasetName.IMAGEFOLDER:
        raise DataError("dataset imagefolder reads your own folder (config key data_dir): nothing to download")
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
    if name in ARCHIVES:
        return prepare_archive(name, root)
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
    limit: int | None = None, *, config: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) with x float32 N x C x H x W in [0, 1]. VAL is a seeded hold-out of the training set, never TEST.

    imagefolder: `config` (the run's TrainConfig or its dict) is required, and `root`, `val_size` and `seed` are
    taken from it; the images of the run's saved split, through the evaluation transform, decoded in
    `config.num_workers` processes.
    """
    if _is_imagefolder(name):
        from training.image_folders import folder_tensors

        return folder_tensors(_require_config(config), Split(split), limit)
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
    """The CIFAR-10 training augmentation on [0, 1] tensors: torchvision's RandomCrop(size, padding=`padding`
    zero pixels, 4 for CIFAR-10) and RandomHorizontalFlip.

    The transforms draw from torch's global generator of the process that runs `__getitem__`: in the main
    process (num_workers=0) that is the trainer's seeded generator (saved and restored on resume); in a
    DataLoader worker it is the worker's own, which torch seeds with the loader's per-epoch base seed plus
    the worker id, so workers never repeat each other's crops and flips (`seed_worker` seeds numpy and
    `random` from it too).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, padding: int = 4) -> None:
        from torchvision import transforms

        self.x, self.y = x, y
        self.transform = transforms.Compose([
            transforms.RandomCrop(tuple(x.shape[2:]), padding=padding),
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
                     limit: int | None = None, *, config: Any = None) -> Dataset:
    """The training split (`seed` draws the validation hold-out); CIFAR-10 with its augmentation; an image folder
    (`config` required) decoded once into memory when it fits (`decode_once_mib`), else decoded per item in the
    DataLoader's workers; either way augmented per item (training.image_folders.folder_training_dataset)."""
    if _is_imagefolder(name):
        from training.image_folders import folder_training_dataset

        return folder_training_dataset(config, limit)
    x, y = load_tensors(name, root, Split.TRAIN, val_size, seed, limit)
    if dataset_info(name).name is DatasetName.CIFAR10:
        return AugmentedTensorDataset(x, y)
    return TensorDataset(x, y)


@dataclass(frozen=True)
class Archive:
    """A shared archive of images in class folders: `file` under SHARED_DATA unpacks to `folder` under a root."""

    file: str
    sha256: str
    folder: str
    about: str


ARCHIVES: dict[str, Archive] = {
    "cifar10-jpeg": Archive("cifar10-jpeg/train.tar.gz",
                            "189a0dcf13c0191b10500fa53ea8d2fc0a380d775fae53bc21fd0c7a779cce4c",
                            "cifar10-jpeg/train", "the 50,000 CIFAR-10 training images as JPEG (q75) in class folders"),
}


def prepare_archive(name: str, root: str | Path) -> Path:
    """Unpack ARCHIVES[name] from SHARED_DATA into `root` after checking its sha256; returns the image folder
    (e.g. root/cifar10-jpeg/train, an ImageFolder layout: use it as data_dir). Does nothing when a completed
    unpack is there (a marker file beside the folder records the archive's sha256). The archive is unpacked into a
    temporary folder with tarfile's "data" filter (no links out, no absolute paths) and renamed into place.
    DataError (one line) for a missing or altered archive, or a half-made folder in the way."""
    archive = ARCHIVES[name]
    root = Path(root)
    target = root / archive.folder
    marker = target.parent / f".{target.name}.sha256"
    if target.is_dir() and marker.is_file() and marker.read_text().strip() == archive.sha256:
        return target
    source = SHARED_DATA / archive.file
    if not source.is_file():
        raise DataError(f"{name}: {source} is missing: put {Path(archive.file).name} ({archive.about}, sha256 "
                        f"{archive.sha256}) into {source.parent}/ and run again")
    digest = sha256_file(source)
    if digest != archive.sha256:
        raise DataError(f"{name}: {source} has sha256 {digest}, expected {archive.sha256}: replace it with the "
                        "archive its README describes")
    if target.exists():
        raise DataError(f"{name}: {target} exists but was not unpacked from {source} (no {marker.name}): remove it "
                        "and run again")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        with tarfile.open(source) as tar:
            tar.extractall(staging, filter="data")
        if not (staging / archive.folder).is_dir():
            raise DataError(f"{name}: {source} holds no {archive.folder}/ folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / archive.folder, target)
        marker.write_text(archive.sha256 + "\n")
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{name}: cannot unpack {source} ({_one_line(exc)})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("unpacked %s into %s", source, target)
    return target


def main(argv: list[str] | None = None) -> int:
    """`python -m training.data [--root data] mnist fashion-mnist cifar10-jpeg`: fill the data folder."""
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
