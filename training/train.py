"""Train a multi-exit network: `clean`, `adv` (RDI-Nets adversarial training) or `neokd`.

    python -m training.train [--preset mnist-quick] [--resume] [key=value ...]
    torchrun --nproc_per_node 2 -m training.train --preset mnist-quick ...   (DDP, gloo on CPU)

Writes runs/<name>/{config.yaml, last.pt (resumable), checkpoint.pt (final), train.json}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from training.attacks import Attack, build_attack
from training.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig, list_presets, load_config, save_config
from training.data import DataError, dataset_info, training_dataset
from training.losses import Method, MultiExitLoss, build_loss
from training.models import MultiExitNetwork, create_model
from training.models.registry import UnknownModelError

log = logging.getLogger("training.train")


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    samples: int = 0
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: TrainConfig) -> MultiExitNetwork:
    info = dataset_info(cfg.dataset)
    kwargs = {"mean": list(info.mean), "std": list(info.std), **cfg.model_args}
    return create_model(cfg.model, num_classes=len(info.classes), **kwargs)


def build_training_attack(cfg: TrainConfig, model: MultiExitNetwork) -> Attack | None:
    if cfg.method is Method.CLEAN:
        return None
    return build_attack(cfg.attack, model, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps)


def build_objective(cfg: TrainConfig, model: MultiExitNetwork) -> MultiExitLoss:
    return build_loss(
        cfg.method, num_classes=len(dataset_info(cfg.dataset).classes), num_exits=model.num_exits,
        alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, nkd_include_self=cfg.nkd_include_self,
        eokd_keep_ground_truth=cfg.eokd_keep_ground_truth, eokd_redraw=cfg.eokd_redraw,
        temperature=cfg.temperature, clean_weight=cfg.clean_weight, adv_weight=cfg.adv_weight, seed=cfg.seed,
    )


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def current_eps(cfg: TrainConfig, step: int) -> float:
    """Linear eps warm-up: adversarial training at full eps from step 0 can stall on MNIST."""
    if cfg.eps_warmup_iters <= 0:
        return cfg.eps
    return cfg.eps * min(1.0, (step + 1) / cfg.eps_warmup_iters)


def train_one_epoch(
    model: nn.Module, core: MultiExitNetwork, loader: DataLoader, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, objective: MultiExitLoss, attack: Attack | None,
    cfg: TrainConfig, state: TrainState, device: torch.device, progress: tqdm | None,
) -> dict[str, float]:
    """One pass over `loader` (or until cfg.iterations). `model` may be the DDP wrapper of `core`."""
    model.train()
    totals: dict[str, float] = {}
    batches = 0
    for x, y in loader:
        if state.step >= cfg.iterations:
            break
        t0 = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x_adv = None
        if attack is not None:
            attack.eps = current_eps(cfg, state.step)
            x_adv = attack(x, y)  # runs on the unwrapped model; restores train mode
        # One forward over clean and adversarial rows together (one DDP forward per backward).
        inputs = x if x_adv is None else torch.cat([x, x_adv])
        logits = model(inputs)
        clean_logits = [l[: len(x)] for l in logits]
        adv_logits = None if x_adv is None else [l[len(x):] for l in logits]
        loss, parts = objective(clean_logits, adv_logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        state.step += 1
        state.samples += len(x)
        state.seconds += time.perf_counter() - t0
        batches += 1
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
        if progress is not None:
            progress.update(1)
            if state.step % cfg.log_every == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}", eps=f"{current_eps(cfg, state.step):.3f}",
                                     lr=f"{scheduler.get_last_lr()[0]:.4f}")
        if state.step % cfg.checkpoint_every == 0 and _is_main():
            _save_resume(core, optimizer, scheduler, cfg, state)
    return {k: v / max(batches, 1) for k, v in totals.items()}


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _save_resume(core: MultiExitNetwork, optimizer, scheduler, cfg: TrainConfig, state: TrainState) -> Path:
    ckpt = make_checkpoint(core, dataset_info(cfg.dataset).to_dict(), cfg.to_dict(),
                           step=state.step, epoch=state.epoch, samples=state.samples, seconds=state.seconds,
                           optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    return save_checkpoint(ckpt, cfg.run_dir / "last.pt")


def parameter_sha256(model: nn.Module) -> str:
    """Hash of every parameter and buffer: equal hashes mean identical replicas."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train per `cfg`; returns the final checkpoint path (runs/<name>/checkpoint.pt)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(cfg.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # same init on every rank
    core = build_model(cfg).to(device)
    core.cost_profile()  # measured before channels_last or DDP wrap the model
    if cfg.channels_last:
        core = core.to(memory_format=torch.channels_last)
    dataset = training_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.train_limit)
    sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.seed, drop_last=True) if distributed else None
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=True, num_workers=cfg.num_workers, generator=loader_gen,
                        pin_memory=device.type == "cuda")
    optimizer = build_optimizer(core, cfg)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.lr_milestones, gamma=cfg.lr_gamma)
    state = TrainState()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    last = run_dir / "last.pt"
    if resume and last.is_file():
        ckpt = load_checkpoint(last)
        core.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = TrainState(ckpt["step"], ckpt["epoch"], ckpt["samples"], ckpt["seconds"])
        log.info("resumed from %s at step %d", last, state.step)
    if _is_main():
        save_config(cfg, run_dir / "config.yaml")
    model: nn.Module = nn.parallel.DistributedDataParallel(core) if distributed else core
    attack = build_training_attack(cfg, core)
    objective = build_objective(cfg, core)
    progress = tqdm(total=cfg.iterations, initial=state.step, desc=f"train {cfg.name} [{cfg.method.value}]",
                    disable=not _is_main(), dynamic_ncols=True)
    history = []
    while state.step < cfg.iterations:
        if sampler is not None:
            sampler.set_epoch(state.epoch)
        loader_gen.manual_seed(cfg.seed + state.epoch)
        parts = train_one_epoch(model, core, loader, optimizer, scheduler, objective, attack, cfg, state,
                                device, progress)
        history.append({"epoch": state.epoch, "step": state.step, **parts})
        log.info("epoch %d step %d %s", state.epoch, state.step, {k: round(v, 4) for k, v in parts.items()})
        state.epoch += 1
    progress.close()
    summary: dict[str, Any] = {
        "preset": cfg.name, "method": cfg.method.value, "steps": state.step, "samples": state.samples,
        "train_seconds": state.seconds, "train_samples_per_s": state.samples / max(state.seconds, 1e-9),
        "cost": core.cost_profile().to_dict(), "history": history,
    }
    if distributed:
        hashes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(hashes, parameter_sha256(core))
        summary["world_size"] = dist.get_world_size()
        summary["replica_param_sha256"] = hashes
        summary["samples"] = state.samples * dist.get_world_size()
    final = run_dir / "checkpoint.pt"
    if _is_main():
        _save_resume(core, optimizer, scheduler, cfg, state)
        save_checkpoint(make_checkpoint(core, dataset_info(cfg.dataset).to_dict(), cfg.to_dict(),
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
    p.add_argument("--preset", default="mnist-quick", help=f"one of: {', '.join(list_presets())}")
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/last.pt if present")
    p.add_argument("overrides", nargs="*", help="config overrides as key=value (values parsed as YAML)")
    return p.parse_args(argv)


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
