"""Fine-tuning the LLM with LoRA while a pruner is active (PDrop*: PyramidDrop during training and inference).

The loop is the shared one (covipal/training/loop.py); this task only says what is trained and what the loss is.
Each step runs a pruning session, so the LLM learns to answer from the tokens the pruner keeps; text is never
dropped, so every answer token is still there to be scored. The pruner learns where the instruction ends from the
labels: the queries that rank visual tokens are the tokens just before each answer span (PyramidDrop's training
rule), passed to the session as `extras["query_positions"]`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from covipal.models.adapters import peft_quiet
from covipal.pruning.session import PruningSession
from covipal.training.stage2 import answer_cross_entropy


@dataclass
class LoRASettings:
    rank: int = 32
    alpha: int = 64
    dropout: float = 0.05
    # module names (regex, peft's `target_modules` string form): by default the LLM's attention and MLP projections
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    extra: dict = field(default_factory=dict)  # more peft LoraConfig fields


def answer_starts(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions just before each answer span (the last prompt token of each turn)."""
    answer = labels != -100
    starts = answer[:, 1:] & ~answer[:, :-1]
    return torch.nn.functional.pad(starts, (0, 1), value=False)


class PrunedLoRATask:
    """`trainable` is the peft-wrapped model: only the LoRA matrices require gradients."""

    def __init__(self, model: nn.Module, pruner, settings: LoRASettings):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=settings.target_modules,
            **settings.extra,
        )
        self.model = model
        self.pruner = pruner
        with peft_quiet():
            self.trainable = get_peft_model(model, config)

    def to(self, device) -> None:
        self.trainable.to(device)

    def loss(self, trainable: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        with PruningSession(self.model, self.pruner) as session:
            session.extras = {"query_positions": answer_starts(labels)}
            logits = trainable(**inputs, use_cache=False).logits
        kept = session.record.kept
        if kept is not None:  # the LLM's output rows are the kept tokens; text (so every label) is among them
            labels = torch.where(kept.valid, labels.gather(1, kept.index), torch.full_like(kept.index, -100))
        loss = answer_cross_entropy(logits, labels)
        ratio = session.record.reserve_ratio
        return loss, {"ce": loss.item(), "reserve_ratio": float(ratio.mean())}

    def save(self, trainable: nn.Module, directory: Path) -> None:
        trainable.save_pretrained(directory)
