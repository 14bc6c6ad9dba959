"""`make bench-serve` on an image-folder (photo) archive: its requests, the images the offline check sees, and the
DeepSloth-attacked requests.

Requests: the original files' bytes (JPEG for the CIFAR-10 folder) of the held-out TEST split that
`training.image_folders` carved for the run (`folder_split(folder_spec(config))`, read back from the run's
split.json), where `config` is the training config the checkpoint beside the archive records (an archive's
manifest records only the checkpoint's sha256, `extra.checkpoint_sha256`, which the checkpoint must match).

Offline images: the same bytes through the handler's own decoding (`serving.decoding.decode_request`: magic-number
sniffing, Pillow decoding, EXIF orientation, the manifest's `input_transform`, early_exit/transform.py), so the
offline staged runner sees exactly the pixels the server does.

Attacked requests: `training.attacks.slowdown.DeepSloth` on the checkpoint (the torch model the archive was
exported from) at the config's `slowdown_eps`, `slowdown_step_size`, `slowdown_steps`, on the first N offline
images, sent as 8-bit RGB PNG (lossless: a JPEG would destroy the perturbation). The PNG round-trip rounds the
perturbed pixels to k/255; the offline check decodes the PNG bytes, not the float attack output.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bench.common import png_bodies
from early_exit.manifest import Manifest, ManifestError, sha256_file
from serving.decoding import InputSpec, decode_request

log = logging.getLogger("bench.photos")
REPO = Path(__file__).resolve().parents[1]
PATH_KEYS = ("data_dir", "val_dir", "test_dir", "out_dir")  # config paths taken from the repository root
ATTACK_BATCH = 64  # images per DeepSloth batch (memory only: the attack is per image)


@dataclass(frozen=True)
class PhotoTestSet:
    """The run's TEST split as requests: the files' bytes, labels, and the images the server decodes them to."""

    files: list[Path]
    bodies: list[bytes]
    x: np.ndarray  # N x C x H x W float32 in [0, 1], decoded as the handler decodes
    y: np.ndarray  # N int64 labels (class index = sorted folder names)


def default_checkpoint(archive: Path) -> Path:
    """runs/<archive stem>/checkpoint.pt: where `make train-export` leaves the checkpoint of model_store/NAME.mar."""
    return REPO / "runs" / archive.stem / "checkpoint.pt"


def run_config(checkpoint: Path, manifest: Manifest) -> dict[str, Any]:
    """The training config recorded in `checkpoint` (relative paths resolved from the repository root, where make
    ran the training). Raises FileNotFoundError for a missing checkpoint, ManifestError when its sha256 is not the
    one the archive was exported from."""
    from training.checkpoint import load_checkpoint

    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} does not exist: pass --checkpoint (the run the archive was exported "
                                "from)")
    recorded = manifest.extra.get("checkpoint_sha256")
    if recorded is not None and sha256_file(checkpoint) != recorded:
        raise ManifestError(f"{checkpoint} is not the checkpoint {manifest.name} was exported from (sha256 differs "
                            "from the manifest's extra.checkpoint_sha256)")
    return resolve_paths(load_checkpoint(checkpoint)["config"], REPO)


def resolve_paths(config: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """`config` with its relative PATH_KEYS taken from `root` (absolute ones and absent keys unchanged)."""
    out = dict(config)
    for key in PATH_KEYS:
        value = out.get(key)
        if value and not Path(value).is_absolute():
            out[key] = str(root / value)
    return out


def input_spec(manifest: Manifest) -> InputSpec:
    """The decoding spec the handler builds from the manifest (serving/handler.py: shape, background, transform;
    the size limits do not change what an accepted image decodes to)."""
    return InputSpec(tuple(manifest.input_shape), manifest.input_background, transform=manifest.input_transform)


def decode_bodies(bodies: Sequence[bytes], spec: InputSpec) -> np.ndarray:
    """Each body through the handler's decoding (`decode_request`) -> N x C x H x W float32. A body the server
    would reject raises its RequestRejected."""
    return np.stack([decode_request(body, {}, spec).x for body in bodies]).astype(np.float32)


def test_set(config: Mapping[str, Any], manifest: Manifest, limit: int | None = None) -> PhotoTestSet:
    """The first `limit` files of the run's TEST split (training.image_folders), read as bytes and decoded as the
    handler decodes them."""
    from training.data import Split
    from training.image_folders import folder_spec, folder_split

    samples = folder_split(folder_spec(config)).samples[Split.TEST][:limit]
    if not samples:
        raise ValueError(f"the run's test split of {config.get('data_dir')} is empty")
    files = [path for path, _ in samples]
    bodies = [path.read_bytes() for path in files]
    x = decode_bodies(bodies, input_spec(manifest))
    log.info("photo test split: %d files from %s, decoded to %s", len(files), config.get("data_dir"), x.shape[1:])
    return PhotoTestSet(files, bodies, x, np.array([label for _, label in samples], dtype=np.int64))


@dataclass(frozen=True)
class AttackedSet:
    """DeepSloth-perturbed images as PNG bodies and the images those bodies decode to."""

    bodies: list[bytes]
    x: np.ndarray  # decoded from `bodies` (8-bit: the perturbation rounded to k/255)
    attack: dict[str, Any]  # eps, step size, steps, seed, images
    max_perturbation: float  # L-inf distance of the decoded PNGs from the clean images (<= eps + 1/510)


def deepsloth(checkpoint: Path, config: Mapping[str, Any], manifest: Manifest, x: np.ndarray, seed: int
              ) -> AttackedSet:
    """DeepSloth (training/attacks/slowdown.py) on `x` with the checkpoint's model at the config's slowdown_eps,
    slowdown_step_size and slowdown_steps; the result as PNG bodies, decoded back through the handler's decoding."""
    import torch

    from training.attacks.slowdown import DeepSloth
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    settings = {"eps": float(config["slowdown_eps"]), "step_size": float(config["slowdown_step_size"]),
                "steps": int(config["slowdown_steps"])}
    model = model_from_checkpoint(load_checkpoint(checkpoint))
    attack = DeepSloth(model, **settings, seed=seed)
    parts = [attack(torch.from_numpy(x[i:i + ATTACK_BATCH])).detach().numpy() for i in range(0, len(x), ATTACK_BATCH)]
    bodies = png_bodies(np.concatenate(parts))
    decoded = decode_bodies(bodies, input_spec(manifest))
    distance = float(np.abs(decoded - x).max())
    log.info("DeepSloth %s on %d images: L-inf %.4f after the PNG round trip", settings, len(x), distance)
    return AttackedSet(bodies, decoded, {**settings, "seed": seed, "images": len(x),
                                         "source": "training/attacks/slowdown.py DeepSloth on the checkpoint"},
                       distance)


def mixed_bodies(clean: Sequence[bytes], attacked: Sequence[bytes], every: int = 10) -> tuple[list[bytes], list[bool]]:
    """A load with one attacked request in `every` (positions 0, every, 2 x every, ...), clean ones between, as long
    as `every` x len(attacked) or the clean list, whichever is shorter; also which positions are attacked."""
    if every < 1 or not attacked or not clean:
        raise ValueError("mixed_bodies needs every >= 1 and non-empty clean and attacked lists")
    n = min(len(clean), every * len(attacked))
    flags = [i % every == 0 for i in range(n)]
    bodies = [attacked[(i // every) % len(attacked)] if flag else clean[i] for i, flag in enumerate(flags)]
    return bodies, flags
