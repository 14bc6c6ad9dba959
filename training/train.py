"""Train a multi-exit network: `clean`, `adv` (RDI-Nets adversarial training) or `neokd`.

    python -m training.train [--preset mnist-quick | --preset /path/to/my-photos.yaml] [--resume] [key=value ...]
    torchrun --nproc_per_node 2 -m training.train --preset mnist-quick ...   (DDP, gloo on CPU)

Writes runs/<name>/{config.yaml, last.pt (resumable), checkpoint.pt (final), train.json}.

Randomness: the model is initialized from `seed` (the same on every rank); everything random after that
(dropout, the attack's random starts, EOKD's class splits, the data order of a single process, the
DataLoader workers' augmentation seeds) draws from generators seeded from (seed, rank), so DDP ranks do not
repeat each other. `last.pt` holds every one of those generators' states (per rank) and the position in the
epoch, so `--resume` continues exactly where the run stopped: N steps, or N/2 steps and a resume to N,
give the same weights (with num_workers=0; with workers, which persist across epochs, augmentation draws
continue from the seeds of the epoch the process started in).

train.json's `timing` holds the wall-clock seconds of each part of the training iterations (data, each
exit's attack, the attack's scoring forwards, the update), measured inside the run (bench/bench_train.py).
Its `machine_rate` is the GFLOP/s this machine reaches on one plain forward and backward of the whole network
at the training batch size, and `efficiency` the GFLOP/s the training iterations achieved against it (FLOPs
by torch's FlopCounterMode; `measure_machine_rate`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import itertools
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from training.attacks import Attack, build_attack
from training.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint
from training.config import (
    DEFAULT_PRESET,
    CleanAdvForward,
    ConfigError,
    Device,
    LRSchedule,
    Optimizer,
    TrainConfig,
    list_presets,
    load_config,
    save_config,
)
from training.data import DataError, dataset_info, seed_worker, training_dataset
from training.losses import Method, MultiExitLoss, NeoKDLoss, build_loss
from training.models import MultiExitNetwork, create_model
from training.models.registry import UnknownModelError
from training.models.torchvision_net import FAMILY as TORCHVISION, BackboneError

log = logging.getLogger("training.train")

# Independent random streams derived from (seed, rank, stream).
STREAM_GLOBAL, STREAM_ATTACK, STREAM_EOKD, STREAM_LOADER = range(4)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    samples: int = 0
    seconds: float = 0.0  # wall time of the training iterations (data, attack, update), this rank
    batch: int = 0  # batches done in the current epoch (a resume skips them)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed for the stream named by `keys` (e.g. seed, rank, stream), independent of its neighbours."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]) >> 1


def seed_everything(seed: int) -> None:
    """torch (CPU and every CUDA device), numpy and `random`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def resolve_device(name: Device | str) -> torch.device:
    name = Device(name)
    if name is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name.value)


def backbone_options(cfg: TrainConfig) -> dict[str, Any]:
    """The `torchvision:<builder>` keys of `cfg` as model arguments (with the dataset's input shape); for other
    models these keys must keep their defaults (ConfigError otherwise)."""
    options = {"exits": cfg.exits, "weights": cfg.weights, "weights_path": cfg.weights_path,
               "small_input_stem": cfg.small_input_stem, "head": cfg.head.value}
    if cfg.model.startswith(f"{TORCHVISION}:"):
        return {"input_shape": list(dataset_info(cfg.dataset, cfg).input_shape), **options}
    defaults = {k: TrainConfig.model_fields[k].default for k in options}
    defaults["head"] = defaults["head"].value
    changed = [k for k, v in options.items() if v != defaults[k]]
    if changed:
        raise ConfigError(f"{', '.join(changed)} apply to model: {TORCHVISION}:<builder> only, not {cfg.model!r}")
    return {}


def build_model(cfg: TrainConfig) -> MultiExitNetwork:
    info = dataset_info(cfg.dataset, cfg)
    kwargs = {"mean": list(info.mean), "std": list(info.std), **backbone_options(cfg), **cfg.model_args}
    try:
        return create_model(cfg.model, num_classes=len(info.classes), **kwargs)
    except TypeError as exc:  # an argument the architecture does not take
        raise ConfigError(f"model_args {cfg.model_args} do not fit model {cfg.model!r}: {exc}") from None
    except BackboneError as exc:  # a refused network, exits that do not fit, weights offline
        raise ConfigError(str(exc)) from None


def set_heads_first(core: MultiExitNetwork, cfg: TrainConfig, step: int) -> bool:
    """Freeze the stages while `step` is inside the heads-first phase, unfreeze after; True when it changed."""
    frozen = step < cfg.heads_first_iterations
    if frozen == core.backbone_frozen:
        return False
    core.freeze_backbone(frozen)
    log.info("step %d: %s", step, "stages frozen, heads training" if frozen else "all parameters training")
    return True


def build_training_attack(cfg: TrainConfig, model: MultiExitNetwork,
                          generator: torch.Generator | None = None) -> Attack | None:
    if cfg.method is Method.CLEAN:
        return None
    return build_attack(cfg.attack.value, model, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps,
                        model_mode=cfg.attack_model_mode, random_start=cfg.attack_random_start, generator=generator)


def build_objective(cfg: TrainConfig, model: MultiExitNetwork) -> MultiExitLoss:
    try:
        return build_loss(
            cfg.method, num_classes=len(dataset_info(cfg.dataset, cfg).classes), num_exits=model.num_exits,
            alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, nkd_include_self=cfg.nkd_include_self,
            eokd_keep_ground_truth=cfg.eokd_keep_ground_truth, eokd_redraw=cfg.eokd_redraw,
            temperature=cfg.temperature, base_weighting=cfg.base_loss_weighting, seed=cfg.seed,
        )
    except ValueError as exc:  # e.g. gamma's length against the model's exits
        raise ConfigError(str(exc)) from None


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer is Optimizer.ADAM:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per iteration. ONECYCLE peaks at `lr`; momentum / Adam's beta1 are left as configured."""
    if cfg.lr_schedule is LRSchedule.ONECYCLE:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.iterations,
                                                   pct_start=cfg.onecycle_pct_start, cycle_momentum=False)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.lr_milestones, gamma=cfg.lr_gamma)


def current_eps(cfg: TrainConfig, step: int) -> float:
    """Linear eps warm-up: adversarial training at full eps from step 0 can stall on MNIST."""
    if cfg.eps_warmup_iters <= 0:
        return cfg.eps
    return cfg.eps * min(1.0, (step + 1) / cfg.eps_warmup_iters)


class Timings:
    """Wall-clock sums per named part of the training iterations (CUDA is synchronized at every edge)."""

    def __init__(self, device: torch.device) -> None:
        self.sums: dict[str, float] = {}
        self._cuda = device.type == "cuda"

    def now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.add(name, self.now() - start)


class ResumableSampler(Sampler[int]):
    """The wrapped sampler's indices for this epoch minus the first `skip` (the batches a resume already did).

    The wrapped sampler draws its order from a generator reseeded at every epoch start, so the order is
    the same whether the epoch runs at once or is resumed in the middle.
    """

    def __init__(self, base: Sampler[int]) -> None:
        self.base = base
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.base, DistributedSampler):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.base) - self.skip, 0)  # type: ignore[arg-type]


class CleanAdvPair(nn.Module):
    """The training forward: (clean logits, adversarial logits or None), in one or two passes of `core`.

    Two passes (`separate`) keep BatchNorm's batch statistics per kind of input, as RDI-Nets does; one
    pass over the concatenated rows is cheaper and equal for models without BatchNorm. Wrapping both in one
    module keeps one DDP forward per backward.
    """

    def __init__(self, core: MultiExitNetwork, separate: bool) -> None:
        super().__init__()
        self.core = core
        self.separate = separate

    def forward(self, x: torch.Tensor, x_adv: torch.Tensor | None = None):  # type: ignore[override]
        if x_adv is None:
            return self.core(x), None
        if self.separate:
            return self.core(x), self.core(x_adv)
        logits = self.core(torch.cat([x, x_adv]))
        return [out[: len(x)] for out in logits], [out[len(x):] for out in logits]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def separate_forwards(cfg: TrainConfig, core: nn.Module) -> bool:
    if cfg.clean_adv_forward is CleanAdvForward.AUTO:
        return has_batchnorm(core)
    return cfg.clean_adv_forward is CleanAdvForward.SEPARATE


def train_one_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, objective: MultiExitLoss, attack: Attack | None,
    cfg: TrainConfig, state: TrainState, device: torch.device, progress: tqdm | None, timings: Timings,
    checkpoint: Callable[[], None], ema: AveragedModel | None = None, until: int | None = None,
) -> tuple[dict[str, float], bool]:
    """Train on `loader` (the rest of the current epoch) until it ends or step `until` (default
    cfg.iterations) is reached.

    `model` is the `CleanAdvPair` (or its DDP wrapper); `ema`, when given, averages the core's weights after
    every step. Returns (mean loss parts, whether the epoch ended).
    """
    model.train()
    totals: dict[str, float] = {}
    batches = 0
    batch_iter = iter(loader)
    while state.step < (cfg.iterations if until is None else until):
        t0 = timings.now()
        try:
            x, y = next(batch_iter)
        except StopIteration:
            return {k: v / max(batches, 1) for k, v in totals.items()}, True
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        t1 = timings.now()
        timings.add("data", t1 - t0)
        x_adv = None
        if attack is not None:
            attack.eps = current_eps(cfg, state.step)
            with timings.section("attack"):
                x_adv = attack(x, y)  # runs on the unwrapped model; restores train mode
        with timings.section("update"):
            clean_logits, adv_logits = model(x, x_adv)
            loss, parts = objective(clean_logits, adv_logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(ema_source(model))
        state.step += 1
        state.batch += 1
        state.samples += len(x)
        state.seconds += timings.now() - t0
        batches += 1
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
        if progress is not None:
            progress.update(1)
            if state.step % cfg.log_every == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}", eps=f"{current_eps(cfg, state.step):.3f}",
                                     lr=f"{scheduler.get_last_lr()[0]:.4g}")
        if state.step % cfg.checkpoint_every == 0:
            checkpoint()
    return {k: v / max(batches, 1) for k, v in totals.items()}, False


def build_ema(core: MultiExitNetwork, cfg: TrainConfig) -> AveragedModel | None:
    """The weight average of `cfg.ema_decay` (None when off): torch's AveragedModel, buffers averaged too."""
    if cfg.ema_decay is None:
        return None
    return AveragedModel(core, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)


def ema_source(model: nn.Module) -> MultiExitNetwork:
    """The core network inside the training wrapper (CleanAdvPair, possibly inside DDP)."""
    pair = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return pair.core


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _is_main() -> bool:
    return _rank() == 0


def capture_rng(generators: dict[str, torch.Generator], device: torch.device) -> dict[str, Any]:
    """This process's random states: python, numpy, torch CPU (and CUDA on `device`), the named generators.

    Only types `torch.load(weights_only=True)` accepts: python's state is a tuple of ints (and None or a float),
    numpy's legacy MT19937 state a dict whose 624-word key is an int64 tensor, the torch states uint8 tensors.
    """
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator], device: torch.device) -> None:
    """Set every random state `capture_rng` captured (CUDA only when `device` is a CUDA device)."""
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, tuple):  # a resume file written before the states became tensors
        np.random.set_state(saved)
    else:
        np.random.set_state((saved["bit_generator"], saved["key"].numpy().astype(np.uint32), saved["pos"],
                             saved["has_gauss"], saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    for name, g in generators.items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


def _gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] without DDP); a collective call under DDP."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _save_resume(core: MultiExitNetwork, optimizer, scheduler, cfg: TrainConfig, state: TrainState,
                 rng: list[dict[str, Any]], timings: Timings, history: list[dict[str, Any]],
                 ema: AveragedModel | None = None) -> Path:
    extra = {} if ema is None else {"ema_state_dict": {k: v.detach().cpu() for k, v in ema.state_dict().items()}}
    ckpt = make_checkpoint(core, dataset_info(cfg.dataset, cfg).to_dict(), cfg.to_dict(),
                           step=state.step, epoch=state.epoch, batch=state.batch, samples=state.samples,
                           seconds=state.seconds, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                           rng={"world_size": len(rng), "ranks": rng}, timing=dict(timings.sums),
                           history=list(history), **extra)
    return save_checkpoint(ckpt, cfg.run_dir / "last.pt")


def parameter_sha256(model: nn.Module) -> str:
    """Hash of every parameter and buffer: equal hashes mean identical replicas."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rng_sha256(generators: dict[str, torch.Generator]) -> str:
    """Fingerprint of this process's torch and named generators' states (differs between ranks)."""
    h = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    for name, g in sorted(generators.items()):
        h.update(name.encode())
        h.update(g.get_state().numpy().tobytes())
    return h.hexdigest()


def iteration_timing(sums: dict[str, float], steps: int, seconds: float, attack_steps: int) -> dict[str, Any]:
    """train.json's `timing`: seconds per part, their share of the iterations' wall time, ms per iteration.

    `attack` includes its parts (`attack/exit<k>` or `attack/batched`, and `attack/scoring`);
    `other` is what no part covers (loss bookkeeping, logging), so the top-level parts sum to `seconds`.
    """
    top = {k: v for k, v in sums.items() if "/" not in k}
    parts = {**top, "other": max(seconds - sum(top.values()), 0.0)}
    parts.update({k: v for k, v in sums.items() if "/" in k})
    per_exit = {k: v for k, v in sums.items() if k.startswith("attack/exit")}
    return {
        "iterations": steps, "seconds": seconds, "parts_s": parts,
        "share": {k: v / seconds if seconds > 0 else 0.0 for k, v in parts.items()},
        "ms_per_iteration": {k: 1e3 * v / max(steps, 1) for k, v in parts.items()},
        "attack_step_ms_per_exit": [1e3 * per_exit[k] / max(steps * attack_steps, 1) for k in sorted(per_exit)],
    }


MACHINE_RATE_REPEATS = 5  # timed plain passes after one warm-up; the fastest one gives the rate


class _GlobalOnly:
    """A stand-in for FlopCounterMode's module tracker: every FLOP is counted under 'Global' only."""

    parents = {"Global"}

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode (its registry: matrix products and convolutions, backward included) without the
    per-module attribution: the module tracker's backward hooks make `torch.autograd.grad` on a leaf input (every
    PGD step) raise "A leaf node was passed to _will_engine_execute_node" (torch 2.14)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    return counter


def count_iteration_flops(core: MultiExitNetwork, cfg: TrainConfig, objective: MultiExitLoss,
                          x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """FLOPs of one training iteration of `cfg` on the batch (x, y), each part counted by FlopCounterMode.

    `attack`: every PGD step of the training attack as it runs (a single-exit attack of the max-average set runs
    the truncated prefix up to its exit, its input-gradient backward only the path to that exit) plus the
    max-average scoring forwards; `update`: the clean and adversarial forwards, the loss and the parameter
    backward. The optimizer step is left out (its element-wise updates are no FLOPs to FlopCounterMode, which
    counts matrix products and convolutions). `core` is trained here (BatchNorm statistics move, gradients
    are left in it): pass a copy. Values in FLOPs (a multiply-add is 2), per iteration of one rank.
    """
    core.train()
    generator = torch.Generator(device=x.device).manual_seed(cfg.seed)
    attack = build_training_attack(cfg, core, generator)
    x_adv = None
    counts: dict[str, float] = {"attack": 0.0}
    if attack is not None:
        attack.eps = cfg.eps
        with flop_counter() as counter:
            x_adv = attack(x, y)
        counts["attack"] = float(counter.get_total_flops())
    pair = CleanAdvPair(core, separate=separate_forwards(cfg, core))
    with flop_counter() as counter:
        clean_logits, adv_logits = pair(x, x_adv)
        loss, _ = objective(clean_logits, adv_logits, y)
        loss.backward()
    counts["update"] = float(counter.get_total_flops())
    core.zero_grad(set_to_none=True)
    counts["total"] = counts["attack"] + counts["update"]
    return counts


@dataclass
class MachineRate:
    """What one plain forward and backward of the whole network costs and takes on this machine, and the FLOPs of
    one training iteration (`count_iteration_flops`); all from the run itself (`measure_machine_rate`)."""

    batch_size: int
    pass_flops: float  # one forward (every exit's cross-entropy) and backward to the parameters, batch_size rows
    pass_seconds: list[float]  # the timed repetitions, after a warm-up
    iteration_flops: dict[str, float]  # attack, update, total

    @property
    def gflops_per_s(self) -> float:
        """The machine's rate: pass FLOPs over the fastest repetition (others' jobs only slow a pass down)."""
        return self.pass_flops / max(min(self.pass_seconds), 1e-12) / 1e9

    def to_dict(self) -> dict[str, Any]:
        median = sorted(self.pass_seconds)[len(self.pass_seconds) // 2]
        return {"gflops_per_s": self.gflops_per_s, "median_gflops_per_s": self.pass_flops / max(median, 1e-12) / 1e9,
                "pass_gflop": self.pass_flops / 1e9, "pass_seconds": self.pass_seconds, "batch_size": self.batch_size,
                "iteration_gflop": {k: v / 1e9 for k, v in self.iteration_flops.items()},
                "measured": f"one forward (every exit's cross-entropy) and backward of the whole network in train "
                            f"mode at batch {self.batch_size}, the fastest of {len(self.pass_seconds)} timed "
                            f"repetitions after a warm-up; FLOPs by torch's FlopCounterMode"}

    def efficiency(self, iterations: int, seconds: float) -> dict[str, Any]:
        """The training iterations' achieved GFLOP/s (iteration FLOPs x iterations / their wall seconds, data
        loading included) and its ratio to the machine's rate. Attack steps on truncated prefixes, mode switches,
        data loading and Python overhead all lower it."""
        achieved = self.iteration_flops["total"] * iterations / max(seconds, 1e-12) / 1e9
        return {"achieved_gflops_per_s": achieved, "machine_gflops_per_s": self.gflops_per_s,
                "ratio": achieved / max(self.gflops_per_s, 1e-12), "iterations": iterations, "seconds": seconds}


def measure_machine_rate(core: MultiExitNetwork, cfg: TrainConfig, objective: MultiExitLoss,
                         generators: dict[str, torch.Generator], device: torch.device,
                         repeats: int = MACHINE_RATE_REPEATS) -> MachineRate:
    """Time `repeats` plain forward+backward passes of a copy of `core` (after one warm-up) on a random batch of
    `cfg.batch_size`, and count one training iteration's FLOPs on the same batch.

    Side-effect free for the run: the copy takes the BatchNorm updates and gradients, and every random state
    (python, numpy, torch, the attack's and EOKD's generators) is restored afterwards, so the run's weights
    are the same with or without this measurement. With `heads_first_iterations`, the copy has the stages
    frozen as `core` has them at the call: the iteration counted is that phase's.
    """
    saved = capture_rng(generators, device)
    try:
        probe = copy.deepcopy(core).train()
        data_gen = torch.Generator().manual_seed(cfg.seed)
        classes = len(dataset_info(cfg.dataset, cfg).classes)
        x = torch.rand(cfg.batch_size, *core.input_shape, generator=data_gen).to(device)
        y = (torch.arange(cfg.batch_size) % classes).to(device)
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        timings = Timings(device)

        def plain_pass() -> None:
            loss = torch.stack([F.cross_entropy(out, y) for out in probe(x)]).sum()
            loss.backward()
            probe.zero_grad(set_to_none=True)

        with flop_counter() as counter:
            plain_pass()  # also the warm-up
        seconds = []
        for _ in range(repeats):
            start = timings.now()
            plain_pass()
            seconds.append(timings.now() - start)
        iteration = count_iteration_flops(probe, cfg, objective, x, y)
    finally:
        restore_rng(saved, generators, device)
    return MachineRate(cfg.batch_size, float(counter.get_total_flops()), seconds, iteration)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train per `cfg`; returns the final checkpoint path (runs/<name>/checkpoint.pt)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(cfg.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    rank, world_size = _rank(), _world_size()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # same init on every rank
    core = build_model(cfg).to(device)
    core.cost_profile()  # measured before channels_last or DDP wrap the model
    if cfg.channels_last:
        core = core.to(memory_format=torch.channels_last)
    seed_everything(derive_seed(cfg.seed, rank, STREAM_GLOBAL))  # dropout etc.: different on every rank

    dataset = training_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.train_limit, config=cfg)
    loader_gen = torch.Generator()  # reseeded at every epoch start: the data order and the workers' seeds
    if distributed:  # one order for all ranks (its seed), each rank its own shard
        base_sampler: Sampler[int] = DistributedSampler(dataset, shuffle=True, seed=cfg.seed, drop_last=True)
    else:
        base_sampler = RandomSampler(dataset, generator=loader_gen) if len(dataset) else SequentialSampler(dataset)
    sampler = ResumableSampler(base_sampler)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, generator=loader_gen, worker_init_fn=seed_worker,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0)
    optimizer = build_optimizer(core, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    ema = build_ema(core, cfg)
    attack_gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, rank, STREAM_ATTACK))
    attack = build_training_attack(cfg, core, attack_gen)
    objective = build_objective(cfg, core)  # built from cfg.seed: a FIXED EOKD split is the same on every rank
    generators = {"attack": attack_gen}
    if isinstance(objective, NeoKDLoss):
        objective.eokd.generator.manual_seed(derive_seed(cfg.seed, rank, STREAM_EOKD))
        generators["eokd"] = objective.eokd.generator
    timings = Timings(device)
    if attack is not None and hasattr(attack, "timer"):
        attack.timer = timings
    state = TrainState()
    history: list[dict[str, Any]] = []
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    last = run_dir / "last.pt"
    if resume and last.is_file():
        ckpt = load_checkpoint(last)
        core.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if cfg.lr_schedule is LRSchedule.ONECYCLE and ckpt["scheduler"].get("total_steps") != cfg.iterations:
            raise ConfigError(f"{last} follows a one-cycle schedule over {ckpt['scheduler'].get('total_steps')} "
                              f"iterations; resume it with iterations={ckpt['scheduler'].get('total_steps')}")
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            if "ema_state_dict" not in ckpt:
                raise ConfigError(f"{last} was trained without ema_decay; resume it with ema_decay=null")
            ema.load_state_dict(ckpt["ema_state_dict"])
        state = TrainState(ckpt["step"], ckpt["epoch"], ckpt["samples"], ckpt["seconds"], ckpt.get("batch", 0))
        timings.sums.update(ckpt.get("timing") or {})
        history = list(ckpt.get("history", []))
        rng = ckpt.get("rng")
        if rng and rng["world_size"] == world_size:
            restore_rng(rng["ranks"][rank], generators, device)
        else:
            log.warning("%s holds no random state for %d rank(s): randomness restarts from fresh seeds",
                        last, world_size)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", last, state.step, state.epoch, state.batch)
    if _is_main():
        save_config(cfg, run_dir / "config.yaml")
    set_heads_first(core, cfg, state.step)  # before DDP: it registers only the parameters that need gradients
    pair = CleanAdvPair(core, separate=separate_forwards(cfg, core))
    model: nn.Module = nn.parallel.DistributedDataParallel(pair) if distributed else pair

    def checkpoint() -> None:
        rng = _gather(capture_rng(generators, device))  # every rank takes part
        if _is_main():
            _save_resume(core, optimizer, scheduler, cfg, state, rng, timings, history, ema)

    rate = measure_machine_rate(core, cfg, objective, generators, device)
    log.info("machine rate %.1f GFLOP/s (plain forward+backward, batch %d); one training iteration %.2f GFLOP",
             rate.gflops_per_s, cfg.batch_size, rate.iteration_flops["total"] / 1e9)
    progress = tqdm(total=cfg.iterations, initial=state.step, desc=f"train {cfg.name} [{cfg.method.value}]",
                    disable=not _is_main(), dynamic_ncols=True)
    while state.step < cfg.iterations:
        sampler.set_epoch(state.epoch)
        sampler.skip = state.batch * cfg.batch_size
        loader_gen.manual_seed(derive_seed(cfg.seed, rank, STREAM_LOADER, state.epoch))
        until = cfg.heads_first_iterations if state.step < cfg.heads_first_iterations else cfg.iterations
        parts, finished = train_one_epoch(model, loader, optimizer, scheduler, objective, attack, cfg, state,
                                          device, progress, timings, checkpoint, ema, min(until, cfg.iterations))
        if set_heads_first(core, cfg, state.step) and distributed:  # re-wrap: DDP now syncs the stages too
            model = nn.parallel.DistributedDataParallel(pair)
        if parts:
            history.append({"epoch": state.epoch, "step": state.step, **parts})
            log.info("epoch %d step %d %s", state.epoch, state.step, {k: round(v, 4) for k, v in parts.items()})
        if finished:
            if state.batch == 0:
                raise ConfigError(f"an epoch has no batch: {len(dataset)} training samples per rank "
                                  f"for batch_size={cfg.batch_size}")
            state.epoch += 1
            state.batch = 0
    progress.close()
    seconds = _gather(state.seconds)
    total_samples = state.samples * world_size
    summary: dict[str, Any] = {
        "preset": cfg.name, "method": cfg.method.value, "steps": state.step, "samples": total_samples,
        # every rank trains its own batch in parallel: the total rate is all samples over the slowest rank's time
        "train_seconds": max(seconds), "train_samples_per_s": total_samples / max(max(seconds), 1e-9),
        "train_samples_per_s_per_rank": state.samples / max(state.seconds, 1e-9),
        "timing": iteration_timing(timings.sums, state.step, state.seconds, cfg.attack_steps),
        "cost": core.cost_profile().to_dict(), "history": history,
        "machine_rate": rate.to_dict(), "efficiency": rate.efficiency(state.step, state.seconds),
    }
    log.info("training achieved %.1f GFLOP/s, %.2f of the machine's %.1f GFLOP/s",
             summary["efficiency"]["achieved_gflops_per_s"], summary["efficiency"]["ratio"], rate.gflops_per_s)
    log.info("waited on data %.1f%% of the training time (%.1f of %.1f s, %d workers)",
             100 * summary["timing"]["share"].get("data", 0.0), timings.sums.get("data", 0.0), state.seconds,
             cfg.num_workers)
    if distributed:
        summary["world_size"] = world_size
        summary["replica_param_sha256"] = _gather(parameter_sha256(core))
        summary["replica_rng_sha256"] = _gather(_rng_sha256(generators))
        summary["replica_train_seconds"] = seconds
    rng = _gather(capture_rng(generators, device))
    final = run_dir / "checkpoint.pt"
    if _is_main():
        _save_resume(core, optimizer, scheduler, cfg, state, rng, timings, history, ema)
        served = core if ema is None else ema.module  # the averaged weights are the model
        save_checkpoint(make_checkpoint(served, dataset_info(cfg.dataset, cfg).to_dict(), cfg.to_dict(),
                                        train_summary={k: v for k, v in summary.items() if k != "history"}), final)
        (run_dir / "train.json").write_text(json.dumps(summary, indent=2))
        log.info("wrote %s", final)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return final


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET, metavar="PRESET",
                   help=f"one of {', '.join(list_presets())}, or the path of your own YAML file of config keys "
                        "(the run's name is its name: key, else the file's stem)")
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/last.pt if present")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (values parsed as YAML)")
    return p.parse_intermixed_args(argv)  # options may come before, between or after the overrides


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(args.preset, args.overrides)
        train(cfg, resume=args.resume)
    except (ConfigError, DataError, UnknownModelError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
