"""Image folders (`dataset: imagefolder`): scanning, the saved split, decoding in workers, augmentation.

Layout: torchvision's ImageFolder, `<data_dir>/<class>/<image>` (scanned with torchvision's `find_classes` and
`make_dataset`: class folders sorted by name, files with torchvision's IMG_EXTENSIONS, read by Pillow: JPEG,
PNG, WebP, ...). Class names are the folder names, class index = position in sorted order.

Splits: `val_dir` / `test_dir` when given (same class folders as data_dir, or fewer); otherwise `val_size` and
`test_size` images are carved out of data_dir, stratified (each class gives its share, largest remainder) and
seeded (`seed`). The file lists go to `<out_dir>/<name>/split.json` on first use and are read back afterwards:
training, calibration and evaluation of a run see the same lists, a re-run gets the same split, and files added
to the folder later never move an image between splits (a changed seed, size or folder is refused).

Evaluation images (val, test, and `load_tensors(..., "train")`) go through `early_exit.transform.EvalTransform`:
the code the server runs on client images. Training images get `TrainAugment`. Mean and std (normalization,
which lives inside the model's first stage) are the config's, else those of the torchvision weights named by
the config's `weights` (for `model: torchvision:<builder>`), else computed on the training split through the evaluation transform (saved in split.json).

Every problem with a folder is a DataError of one line naming the folder or file: no class folders, an empty
class, a single class, files Pillow cannot read (listed; `skip_unreadable=true` leaves them out and logs how many).
Images of any mode are converted to the declared channels (`image_channels`).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from early_exit.manifest import write_json_atomic
from early_exit.transform import EIGHT_BIT_BASE, EvalTransform, Interpolation, TransformError, unit_planes
from training.data import (AugmentedTensorDataset, DataError, DatasetInfo, DatasetName, Split, TrainAugment,
                           _one_line)

log = logging.getLogger(__name__)

SPLIT_NAME = "split.json"
SPLIT_FORMAT = 1
SMALL_INPUT_MAX = 64  # TrainAugment.AUTO: crop-flip up to this input size, resized-crop above
DECODE_BATCH = 256
# Pillow raises these for unreadable, corrupt or truncated files (UnidentifiedImageError is an OSError).
PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _get(config: Any, key: str, default: Any = None) -> Any:
    """A config value from a TrainConfig or its dict (a checkpoint's "config")."""
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    return getattr(value, "value", value)  # enums by value


@dataclass(frozen=True)
class FolderSpec:
    """What the image-folder pipeline takes from the config (`folder_spec`)."""

    data_dir: Path
    val_dir: Path | None
    test_dir: Path | None
    val_size: int
    test_size: int
    seed: int
    transform: EvalTransform
    augment: TrainAugment  # never AUTO
    crop_padding: int
    decode_once_mib: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    weights: str | None  # the config's `weights`, resolved to the full name (e.g. ResNet18_Weights.IMAGENET1K_V1)
    background: float
    skip_unreadable: bool
    split_file: Path
    num_workers: int

    def split_settings(self) -> dict[str, Any]:
        """What decides the split; split.json records it and is reused only for equal settings."""
        return {"data_dir": str(self.data_dir.resolve()),
                "val_dir": str(self.val_dir.resolve()) if self.val_dir else None,
                "test_dir": str(self.test_dir.resolve()) if self.test_dir else None,
                "val_size": None if self.val_dir else self.val_size,
                "test_size": None if self.test_dir else self.test_size,
                "seed": self.seed, "skip_unreadable": self.skip_unreadable}


def folder_spec(config: Any) -> FolderSpec:
    """The spec of a run's config (TrainConfig or dict); DataError (one line) for missing or inconsistent keys."""
    input_size = _get(config, "input_size")
    if input_size is None:
        raise DataError("dataset imagefolder needs input_size (the model's square input in pixels, e.g. input_size=32)")
    resize_size = _get(config, "resize_size") or input_size
    if resize_size < input_size:
        raise DataError(f"resize_size {resize_size} is below input_size {input_size}: the centre crop would not fit")
    try:
        transform = EvalTransform(_get(config, "image_channels", 3), resize_size, (input_size, input_size),
                                  Interpolation(_get(config, "interpolation", Interpolation.BILINEAR.value)))
    except (TransformError, ValueError) as exc:
        raise DataError(str(exc)) from None
    mean, std = _get(config, "mean"), _get(config, "std")
    if (mean is None) != (std is None):
        raise DataError("give both mean and std, or neither")
    for key, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != transform.channels:
            raise DataError(f"{key} has {len(values)} values for {transform.channels} channel(s)")
    augment = TrainAugment(_get(config, "train_augment", TrainAugment.AUTO.value))
    if augment is TrainAugment.AUTO:
        augment = TrainAugment.CROP_FLIP if input_size <= SMALL_INPUT_MAX else TrainAugment.RESIZED_CROP
    optional = {key: Path(_get(config, key)) if _get(config, key) else None for key in ("val_dir", "test_dir")}
    weights = _get(config, "weights")
    if weights is not None:
        weights = _full_weights_name(str(_get(config, "model", "")), str(weights))
    return FolderSpec(
        data_dir=Path(_get(config, "data_dir")), val_dir=optional["val_dir"], test_dir=optional["test_dir"],
        val_size=int(_get(config, "val_size", 5000)), test_size=int(_get(config, "test_size", 5000)),
        seed=int(_get(config, "seed", 0)), transform=transform, augment=augment,
        crop_padding=int(_get(config, "crop_padding", 4)),
        decode_once_mib=int(_get(config, "decode_once_mib", 2048)),
        mean=None if mean is None else tuple(float(m) for m in mean),
        std=None if std is None else tuple(float(s) for s in std),
        weights=None if weights is None else str(weights), background=float(_get(config, "background", 1.0)),
        skip_unreadable=bool(_get(config, "skip_unreadable", False)),
        split_file=Path(_get(config, "out_dir", "runs")) / str(_get(config, "name", "run")) / SPLIT_NAME,
        num_workers=int(_get(config, "num_workers", 0)),
    )


# ------------------------------------------------------------------------------------------------------ scanning
def scan_folder(directory: Path, class_to_idx: dict[str, int] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, class index)]) of an ImageFolder layout, via torchvision's scanning helpers.

    class_to_idx: the training folder's classes, for val_dir / test_dir (which may lack some, never add one).
    DataError for a missing folder, no class folders, an empty class folder, or (training folder) a single class.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not directory.is_dir():
        raise DataError(f"{directory}: no such folder (expected the ImageFolder layout {directory}/<class>/<image>)")
    try:
        classes, own_index = find_classes(directory)
    except FileNotFoundError:
        raise DataError(f"{directory}: no class folders; put the images in {directory}/<class>/ (one sub-folder "
                        "per class)") from None
    if class_to_idx is not None:
        foreign = [c for c in classes if c not in class_to_idx]
        if foreign:
            raise DataError(f"{directory / foreign[0]}: class folder absent from the training folder "
                            f"(classes: {', '.join(class_to_idx)})")
    index = class_to_idx if class_to_idx is not None else own_index
    samples = make_dataset(str(directory), {c: index[c] for c in classes}, extensions=IMG_EXTENSIONS,
                           allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(index))
    empty = [c for c in classes if counts[index[c]] == 0]
    if empty:
        raise DataError(f"{directory / empty[0]}: empty class folder (no {'/'.join(IMG_EXTENSIONS)} file)"
                        + (f"; also empty: {', '.join(empty[1:])}" if len(empty) > 1 else ""))
    if class_to_idx is None and len(classes) < 2:
        raise DataError(f"{directory}: a single class folder ({classes[0]}); a classifier needs at least two")
    return classes, [(Path(path), label) for path, label in samples]


def stratified_split(labels: np.ndarray, sizes: dict[Split, int], seed: int) -> dict[Split, np.ndarray]:
    """Indices per split: each class gives its share of every size in `sizes` (largest remainder, ties to the lower
    class), the rest is TRAIN; drawn and then shuffled with numpy's default_rng(seed). DataError when a class
    would keep no training image."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas: dict[Split, np.ndarray] = {}
    for split, size in sizes.items():
        exact = size * counts / counts.sum()
        quota = np.floor(exact).astype(np.int64)
        order = sorted(range(len(classes)), key=lambda k: (-(exact[k] - quota[k]), k))
        quota[order[: size - int(quota.sum())]] += 1
        quotas[split] = quota
    out: dict[Split, list[np.ndarray]] = {split: [] for split in (Split.TRAIN, *sizes)}
    for k, label in enumerate(classes):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        start = 0
        for split in sizes:
            out[split].append(members[start:start + quotas[split][k]])
            start += int(quotas[split][k])
        if start >= len(members):
            raise DataError(f"class {int(label)} has {len(members)} images: too few to give "
                            f"{', '.join(f'{s.value} {int(quotas[s][k])}' for s in sizes)} and keep one for training")
        out[Split.TRAIN].append(members[start:])
    return {split: rng.permutation(np.concatenate(parts)) for split, parts in out.items()}


def _check_readable(path: Path) -> str | None:
    """None when Pillow opens and verifies the file (header, and PNG checksums), else the reason in one line."""
    try:
        with Image.open(path) as image:
            image.verify()
    except PILLOW_ERRORS as exc:
        return _one_line(exc)
    return None


class _Readability(Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str | None:
        return _check_readable(self.paths[i])


def _unreadable(paths: list[Path], num_workers: int) -> list[tuple[Path, str]]:
    """[(file, reason)] of the files Pillow cannot open and verify, checked in `num_workers` processes."""
    loader = DataLoader(_Readability(paths), batch_size=DECODE_BATCH, num_workers=num_workers, collate_fn=list)
    reasons = [reason for batch in loader for reason in batch]
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


@dataclass(frozen=True)
class FolderSplit:
    """The saved split: class names, [(file, label)] per split, and training-split statistics when computed."""

    classes: tuple[str, ...]
    samples: dict[Split, list[tuple[Path, int]]]
    skipped: int
    stats: dict[str, Any] | None


_SPLITS: dict[FolderSpec, FolderSplit] = {}  # per process: split.json is read once


def folder_split(spec: FolderSpec) -> FolderSplit:
    """The run's split: read from spec.split_file, or made and saved there. DataError for a split file made with
    other settings (folder, seed, sizes), or any problem `scan_folder` / the readability check finds."""
    if spec in _SPLITS:
        return _SPLITS[spec]
    if spec.split_file.is_file():
        split = _read_split(spec)
    else:
        split = _make_split(spec)
        _write_split(spec, split)
    _SPLITS[spec] = split
    return split


def _make_split(spec: FolderSpec) -> FolderSplit:
    classes, samples = scan_folder(spec.data_dir)
    index = {c: k for k, c in enumerate(classes)}
    extra = {split: scan_folder(folder, index)[1] for split, folder in ((Split.VAL, spec.val_dir),
                                                                         (Split.TEST, spec.test_dir)) if folder}
    everything = samples + [s for files in extra.values() for s in files]
    bad = _unreadable([path for path, _ in everything], spec.num_workers)
    if bad and not spec.skip_unreadable:
        shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} file(s) Pillow cannot read: {shown}{more}; remove them or set "
                        "skip_unreadable=true")
    if bad:
        log.warning("skipped %d file(s) Pillow cannot read (skip_unreadable), first: %s (%s)", len(bad), *bad[0])
        unreadable = {path for path, _ in bad}
        samples = [s for s in samples if s[0] not in unreadable]
        extra = {split: [s for s in files if s[0] not in unreadable] for split, files in extra.items()}
    sizes = {split: size for split, size in ((Split.VAL, spec.val_size), (Split.TEST, spec.test_size))
             if split not in extra}
    parts = stratified_split(np.array([label for _, label in samples]), sizes, spec.seed)
    out = {split: [samples[i] for i in idx] for split, idx in parts.items()}
    out.update(extra)
    log.info("image folder %s: %d classes, split %s", spec.data_dir, len(classes),
             {s.value: len(files) for s, files in out.items()})
    return FolderSplit(tuple(classes), out, len(bad), None)


def _roots(spec: FolderSpec) -> dict[Split, Path]:
    return {Split.TRAIN: spec.data_dir, Split.VAL: spec.val_dir or spec.data_dir,
            Split.TEST: spec.test_dir or spec.data_dir}


def _write_split(spec: FolderSpec, split: FolderSplit) -> None:
    roots = _roots(spec)
    write_json_atomic({
        "format": SPLIT_FORMAT, "settings": spec.split_settings(), "classes": list(split.classes),
        "skipped_unreadable": split.skipped, "stats": split.stats,
        "splits": {s.value: [[path.relative_to(roots[s]).as_posix(), label] for path, label in files]
                   for s, files in split.samples.items()},
    }, spec.split_file)


def _read_split(spec: FolderSpec) -> FolderSplit:
    path = spec.split_file
    try:
        data = json.loads(path.read_text())
        settings, roots = data["settings"], _roots(spec)
        if data["format"] != SPLIT_FORMAT:
            raise DataError(f"{path} has format {data['format']}, expected {SPLIT_FORMAT}: delete it to split again")
        if settings != spec.split_settings():
            changed = sorted(k for k, v in spec.split_settings().items() if settings.get(k) != v)
            raise DataError(f"{path} was made with other {', '.join(changed)} ({', '.join(f'{k}={settings.get(k)}' for k in changed)}): "
                            "use another run name, or delete it to split again")
        samples = {Split(s): [(roots[Split(s)] / rel, int(label)) for rel, label in files]
                   for s, files in data["splits"].items()}
        return FolderSplit(tuple(data["classes"]), samples, int(data["skipped_unreadable"]), data["stats"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not a split file of this version ({_one_line(exc)}): delete it to split again") \
            from exc


# ------------------------------------------------------------------------------------------------------ decoding
def read_image(path: Path, transform: EvalTransform) -> Image.Image:
    """A file -> loaded, upright Pillow image of mode L, LA, RGB or RGBA, decoded as the server decodes a request
    (JPEG draft of the transform, EXIF orientation applied; 16-bit greys scaled to 8 bits). DataError naming the
    file when Pillow cannot read it."""
    try:
        with Image.open(path) as opened:
            transform.draft(opened)
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except PILLOW_ERRORS as exc:
        raise DataError(f"{path}: Pillow cannot read it ({_one_line(exc)})") from exc
    if image.mode in SIXTEEN_BIT:
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if image.mode not in EIGHT_BIT_BASE:
        raise DataError(f"{path}: images of Pillow mode {image.mode} are not supported")
    base = EIGHT_BIT_BASE[image.mode]
    if image.mode in ("L", "RGB") and "transparency" in image.info:
        base += "A"  # a tRNS key colour becomes an alpha band (Pillow's conversion)
    return image if image.mode == base else image.convert(base)


class ImageFiles(Dataset):
    """[(file, label)] -> (C x H x W float32 tensor in [0, 1], label), decoded in `__getitem__` (DataLoader workers).

    `to_planes(image)` maps the upright image of `read_image` to the C x H x W array (the evaluation transform, or
    an augmentation); its random draws come from torch's generator of the process that runs it (see
    training.data.AugmentedTensorDataset).
    """

    def __init__(self, samples: list[tuple[Path, int]], transform: EvalTransform,
                 to_planes: Callable[[Image.Image], np.ndarray | torch.Tensor]) -> None:
        self.samples, self.transform, self.to_planes = samples, transform, to_planes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[i]
        x = self.to_planes(read_image(path, self.transform))
        return torch.as_tensor(x), torch.tensor(label, dtype=torch.long)


class EvalPlanes:
    """The evaluation transform as `ImageFiles.to_planes` (picklable for worker processes)."""

    def __init__(self, transform: EvalTransform, background: float) -> None:
        self.transform, self.background = transform, background

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.transform.planes(image, self.background)


class CropFlipPlanes(EvalPlanes):
    """CROP_FLIP: the evaluation planes, zero-padded by `padding`, a random crop of the input size, random
    horizontal flip (torchvision's RandomCrop / RandomHorizontalFlip on the tensor, as CIFAR-10's recipe)."""

    def __init__(self, transform: EvalTransform, background: float, padding: int) -> None:
        from torchvision import transforms

        super().__init__(transform, background)
        self.augment = transforms.Compose([transforms.RandomCrop(transform.crop_size, padding=padding),
                                           transforms.RandomHorizontalFlip()])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.augment(torch.from_numpy(super().__call__(image)))


class ResizedCropPlanes(EvalPlanes):
    """RESIZED_CROP: torchvision's RandomResizedCrop(crop_size) with the configured filter (on the Pillow image,
    antialiased), random horizontal flip, then pixel / 255 with alpha composited (`unit_planes`)."""

    def __init__(self, transform: EvalTransform, background: float) -> None:
        from torchvision import transforms

        super().__init__(transform, background)
        mode = transforms.InterpolationMode(transform.interpolation.value)
        self.augment = transforms.Compose([transforms.RandomResizedCrop(transform.crop_size, interpolation=mode),
                                           transforms.RandomHorizontalFlip()])

    def __call__(self, image: Image.Image) -> np.ndarray:
        target = self.transform.mode + ("A" if image.mode.endswith("A") else "")
        return unit_planes(self.augment(image.convert(target) if image.mode != target else image), self.background)


def _decode_all(dataset: ImageFiles, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of `dataset`, in order, decoded in `num_workers` processes (0: here)."""
    loader = DataLoader(dataset, batch_size=DECODE_BATCH, shuffle=False, num_workers=num_workers)
    xs, ys = [], []
    for x, y in tqdm(loader, desc="decoding", unit="batch", leave=False, dynamic_ncols=True):
        xs.append(x)
        ys.append(y)
    if not xs:
        return torch.zeros(0, *dataset.transform.input_shape), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys)


def _full_weights_name(model: str, name: str) -> str:
    """`weights` of a `torchvision:<builder>` model as torchvision's full name; DataError for another model or a name
    the builder does not have."""
    from training.models.torchvision_net import FAMILY, BackboneError, resolve_weights

    family, _, builder = model.partition(":")
    if family != FAMILY or not builder:
        raise DataError(f"weights {name!r} name torchvision weights: they need model: {FAMILY}:<builder>, "
                        f"not {model!r}; or give mean and std")
    try:
        weights = resolve_weights(builder, name)
    except BackboneError as exc:
        raise DataError(str(exc)) from None
    return f"{type(weights).__name__}.{weights.name}"


# ---------------------------------------------------------------------------------------------------- the dataset
def weights_mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of torchvision weights named like "ResNet18_Weights.IMAGENET1K_V1" (their preset's)."""
    from torchvision.models import get_weight

    try:
        preset = get_weight(name).transforms()
    except (ValueError, KeyError, AttributeError) as exc:
        raise DataError(f"weights {name!r} is not a torchvision weight name like "
                        f"ResNet18_Weights.IMAGENET1K_V1 ({_one_line(exc)}): give mean and std") from None
    return tuple(float(m) for m in preset.mean), tuple(float(s) for s in preset.std)


def training_stats(spec: FolderSpec, split: FolderSplit) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training split's pixels through the evaluation transform (float64 sums);
    computed once and saved in split.json."""
    if split.stats is None:
        dataset = ImageFiles(split.samples[Split.TRAIN], spec.transform, EvalPlanes(spec.transform, spec.background))
        loader = DataLoader(dataset, batch_size=DECODE_BATCH, num_workers=spec.num_workers)
        total = torch.zeros(spec.transform.channels, dtype=torch.float64)
        squares = torch.zeros_like(total)
        pixels = 0
        for x, _ in loader:
            x = x.double()
            total += x.sum(dim=(0, 2, 3))
            squares += x.square().sum(dim=(0, 2, 3))
            pixels += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / max(pixels, 1)
        std = (squares / max(pixels, 1) - mean.square()).clamp_min(0).sqrt()
        stats = {"mean": mean.tolist(), "std": std.tolist(), "images": len(dataset)}
        split = FolderSplit(split.classes, split.samples, split.skipped, stats)
        _SPLITS[spec] = split
        _write_split(spec, split)
        log.info("training-split mean %s, std %s (%d images)", stats["mean"], stats["std"], len(dataset))
    return tuple(split.stats["mean"]), tuple(split.stats["std"])


def folder_info(config: Any) -> DatasetInfo:
    """DatasetInfo of a run's image folder: classes from the folder names, input shape and transform from the
    preprocessing keys, mean/std as the module docstring says; makes the split on first use."""
    spec = folder_spec(config)
    split = folder_split(spec)
    if spec.mean is not None:
        mean, std = spec.mean, spec.std
    elif spec.weights is not None:
        mean, std = weights_mean_std(spec.weights)
    else:
        mean, std = training_stats(spec, split)
    if len(mean) != spec.transform.channels:
        raise DataError(f"mean/std of {spec.weights} have {len(mean)} channels, the images {spec.transform.channels}")
    return DatasetInfo(DatasetName.IMAGEFOLDER, str(spec.data_dir), spec.transform.input_shape, split.classes,
                       mean, std, spec.background, spec.transform,
                       extra={"data_dir": str(spec.data_dir), "split_file": str(spec.split_file)})


def decoded_mib(spec: FolderSpec, images: int) -> float:
    """MiB that `images` evaluation planes of `spec` take as float32."""
    return images * math.prod(spec.transform.input_shape) * 4 / 2**20


def folder_training_dataset(config: Any, limit: int | None = None) -> Dataset:
    """The training split, augmented per item (spec.augment).

    CROP_FLIP only moves pixels of the evaluation planes, so when the planes of the whole split take at most
    `decode_once_mib` MiB they are decoded once here (`folder_tensors`' path, spec.num_workers processes) and
    cropped and flipped from memory (training.data.AugmentedTensorDataset, the same torchvision transforms as
    CropFlipPlanes): a JPEG decode per image per epoch is 8% of a CIFAR-10 NEO-KD iteration on 2 cores.
    Otherwise an ImageFiles that decodes every file again in each epoch.
    """
    spec = folder_spec(config)
    samples = folder_split(spec).samples[Split.TRAIN][:limit]
    if spec.augment is TrainAugment.CROP_FLIP and decoded_mib(spec, len(samples)) <= spec.decode_once_mib:
        log.info("decoding the %d training images once (%.0f MiB in memory)", len(samples),
                 decoded_mib(spec, len(samples)))
        x, y = _decode_all(ImageFiles(samples, spec.transform, EvalPlanes(spec.transform, spec.background)),
                           spec.num_workers)
        return AugmentedTensorDataset(x, y, padding=spec.crop_padding)
    if spec.augment is TrainAugment.CROP_FLIP:
        to_planes: EvalPlanes = CropFlipPlanes(spec.transform, spec.background, spec.crop_padding)
    elif spec.augment is TrainAugment.RESIZED_CROP:
        to_planes = ResizedCropPlanes(spec.transform, spec.background)
    else:
        to_planes = EvalPlanes(spec.transform, spec.background)
    return ImageFiles(samples, spec.transform, to_planes)


def folder_tensors(config: Any, split: Split, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of one split through the evaluation transform: x float32 N x C x H x W in [0, 1], y int64 (N,)."""
    spec = folder_spec(config)
    samples = folder_split(spec).samples[split][:limit]
    return _decode_all(ImageFiles(samples, spec.transform, EvalPlanes(spec.transform, spec.background)),
                       spec.num_workers)
