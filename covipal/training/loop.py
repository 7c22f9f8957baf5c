"""The one training loop every trainer uses (stage 1, stage 2, PDrop* with LoRA).

A trainer is a task object with three members:
    trainable              the nn.Module whose parameters are trained (the PPM, or a LoRA-wrapped LLM); only its
                           parameters with `requires_grad` go to the optimiser
    loss(trainable, batch) -> (loss tensor, {metric: float})
    save(trainable, dir)   writes the artifact users load (PPM safetensors, LoRA adapters)
and optionally `progress`, which the loop sets to the share of optimiser steps done before each batch (for
schedules inside the loss, e.g. stage 2's temperature).
Everything else is here: accelerate (one process, DDP, FSDP/DeepSpeed through an accelerate config file),
gradient accumulation, AdamW with a cosine schedule, bf16 autocast on CUDA, checkpoints with optimiser and
scheduler state written atomically every `save_every` steps, `resume`, a tqdm bar, wandb and a local metrics file.

Batches: `batch_size` is the global batch of one micro-step; with several processes each takes an equal slice of
it (accelerate's `split_batches`), so a run gives the same updates whatever the number of processes. Data order
is a seeded permutation per epoch, which makes a resumed run replay exactly the batches it had left.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from covipal.data.conversation import SKIPPED
from covipal.errors import CovipalError
from covipal.training.run_log import RunLog

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


@dataclass
class LoopConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # the cosine ends at lr · min_lr_ratio
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; None = `epochs` passes over the data
    batch_size: int = 8  # global batch of one micro-step (split across processes)
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    save_every: int = 0  # optimiser steps between checkpoints; 0 = only the final one
    keep_checkpoints: int = 2  # the newest N checkpoints are kept (0 = all)
    log_every: int = 1
    seed: int = 0
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or "no" / "bf16"
    num_workers: int = 0
    cpu: bool = False  # force CPU even when CUDA is present
    progress: bool = True


class EpochPermutation(Sampler):
    """A seeded permutation of the data set, a different one each epoch; no global RNG is touched."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def cosine_schedule(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def latest_checkpoint(path: str | Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest complete checkpoint of the run directory `path`."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = sorted((path / CHECKPOINTS).glob("step-*/" + STATE_FILE), key=lambda p: int(p.parent.name[5:]))
    if not found:
        raise CovipalError(f"resume={path}: no checkpoint there (expected {STATE_FILE} or {CHECKPOINTS}/step-N/)")
    return found[-1].parent


def _accelerator(config: LoopConfig) -> Accelerator:
    cpu = config.cpu or not torch.cuda.is_available()
    precision = config.precision
    if precision == "auto":
        precision = "no" if cpu else "bf16"
    if precision not in ("no", "bf16"):
        raise CovipalError(f"train.precision={precision!r}: use auto, no or bf16")
    if precision == "bf16" and cpu:
        raise CovipalError("train.precision=bf16 needs a CUDA GPU here; use train.precision=auto on CPU")
    return Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=config.grad_accum,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def train(
    task,
    dataset,
    collate: Callable,
    config: LoopConfig,
    output_dir: str | Path,
    log: RunLog | None = None,
    resume: str | Path | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train `task.trainable` on `dataset`; returns the directory of the final artifact (`output_dir/final`).

    `on_step(step, metrics)` runs on the main process after each optimiser step (diagnostics, tests)."""
    output_dir = Path(output_dir)
    accelerator = _accelerator(config)
    if config.batch_size % accelerator.num_processes:
        raise CovipalError(
            f"train.batch_size={config.batch_size} does not split over {accelerator.num_processes} processes; "
            f"use a multiple of {accelerator.num_processes}"
        )
    if len(dataset) < config.batch_size:
        raise CovipalError(f"the data set has {len(dataset)} samples, fewer than train.batch_size={config.batch_size}")
    set_seed(config.seed)
    sampler = EpochPermutation(len(dataset), config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=collate,
        drop_last=True,
        num_workers=config.num_workers,
    )
    steps_per_epoch = len(loader) // config.grad_accum
    if steps_per_epoch == 0:
        raise CovipalError(
            f"one optimiser step needs batch_size × grad_accum = {config.batch_size * config.grad_accum} samples "
            f"but the data set has {len(dataset)}"
        )
    total = config.max_steps or steps_per_epoch * config.epochs
    trainable = task.trainable
    parameters = [p for p in trainable.parameters() if p.requires_grad]
    if not parameters:
        raise CovipalError("the trainer has no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(total, warmup, config.min_lr_ratio))
    task.to(accelerator.device)
    trainable, optimizer, loader, scheduler = accelerator.prepare(trainable, optimizer, loader, scheduler)

    step = 0
    if resume is not None:
        checkpoint = latest_checkpoint(resume)
        accelerator.load_state(str(checkpoint / "state"))
        step = json.loads((checkpoint / STATE_FILE).read_text())["step"]
        accelerator.print(f"resumed from {checkpoint} at step {step}/{total}")

    log = log or RunLog(output_dir, enabled=accelerator.is_main_process)
    bar = tqdm(total=total, initial=step, desc="train", disable=not (config.progress and accelerator.is_main_process))
    window: dict[str, list[float]] = {}
    skipped = 0
    while step < total:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        batches = loader
        if done_in_epoch:
            batches = accelerator.skip_first_batches(loader, done_in_epoch * config.grad_accum)
        micro = 0
        for batch in batches:
            skipped += int(batch.pop(SKIPPED, 0))
            if hasattr(task, "progress"):
                task.progress = step / total
            with accelerator.accumulate(trainable):
                with accelerator.autocast():
                    loss, metrics = task.loss(trainable, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss.item(), **metrics}.items():
                window.setdefault(key, []).append(float(value))
            micro += 1
            if micro % config.grad_accum:
                continue
            step += 1
            row = {key: sum(values) / len(values) for key, values in window.items()}
            row = {key: _mean_across_processes(accelerator, value) for key, value in row.items()}
            window.clear()
            row["lr"] = scheduler.get_last_lr()[0]
            row["skipped_samples"] = _mean_across_processes(accelerator, float(skipped)) * accelerator.num_processes
            if accelerator.is_main_process:
                if step % config.log_every == 0 or step == total:
                    log.metrics(step, row)
                if on_step is not None:
                    on_step(step, row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            if step == total or (config.save_every and step % config.save_every == 0):
                _checkpoint(accelerator, task, trainable, output_dir, step, config)
            if step == total or done_in_epoch + micro // config.grad_accum >= steps_per_epoch:
                break
    bar.close()
    final = output_dir / "final"
    if accelerator.is_main_process:
        task.save(accelerator.unwrap_model(trainable), final)
        (final / "train_config.json").write_text(json.dumps(asdict(config), indent=1))
    accelerator.wait_for_everyone()
    log.close()
    accelerator.end_training()
    return final


def _mean_across_processes(accelerator: Accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], device=accelerator.device, dtype=torch.float64)
    return accelerator.reduce(tensor, reduction="mean").item()


def _checkpoint(accelerator: Accelerator, task, trainable, output_dir: Path, step: int, config: LoopConfig) -> None:
    """Write checkpoints/step-N atomically: artifact, accelerate state (weights, optimiser, scheduler, RNGs)."""
    root = output_dir / CHECKPOINTS
    target = root / f"step-{step}"
    staging = root / f".step-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging / "state"), safe_serialization=True)
    if accelerator.is_main_process:
        task.save(accelerator.unwrap_model(trainable), staging / "artifact")
        (staging / STATE_FILE).write_text(json.dumps({"step": step}))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        if config.keep_checkpoints:
            done = sorted(root.glob("step-*"), key=lambda p: int(p.name[5:]))
            for old in done[: -config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
