"""Stage 2: end-to-end training of the PPM through the frozen LLM with the soft mask (Eqs. 5–10).

Loss = CE on answer tokens + k · L_reg. L_reg is the separation regulariser |1 − (mean P_high − mean P_low)|
with P_high the top floor(r·n_v) retention probabilities of a sample and P_low the rest (Eqs. 9–10), or, for the
paper's comparison, the naive |r − mean P|. Both are averaged over the samples of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from covipal.errors import CovipalError
from covipal.models.ppm import PPMClassifier
from covipal.pruning.budget import check_ratio
from covipal.training.soft_mask import SoftMaskSession
from covipal.training.stage1 import freeze

REGULARIZERS = ("separation", "naive")


@dataclass
class Stage2Settings:
    k: float = 0.01
    reserve_ratio: float = 0.25
    regularizer: str = "separation"  # separation (Eq. 10) | naive (|r − mean P|)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_ratio(self.reserve_ratio, "stage2.reserve_ratio")
        if self.regularizer not in REGULARIZERS:
            raise CovipalError(f"stage2.regularizer={self.regularizer!r}: use one of {', '.join(REGULARIZERS)}")


def retention_regularizer(probabilities: torch.Tensor, visual: torch.Tensor, ratio: float, kind: str) -> torch.Tensor:
    """Mean over samples with visual tokens of the per-sample regulariser."""
    terms = []
    for row in range(probabilities.shape[0]):
        p = probabilities[row][visual[row]]
        if len(p) == 0:
            continue
        if kind == "naive":
            terms.append((ratio - p.mean()).abs())
            continue
        high = max(1, int(ratio * len(p)))
        ordered = p.sort(descending=True).values
        low = ordered[high:]
        margin = ordered[:high].mean() - (low.mean() if len(low) else torch.zeros((), device=p.device))
        terms.append((1 - margin).abs())
    if not terms:
        return probabilities.sum() * 0
    return torch.stack(terms).mean()


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def near_binary(probabilities: torch.Tensor, visual: torch.Tensor) -> float:
    """Share of visual retention probabilities within 0.1 of 0 or 1."""
    p = probabilities[visual]
    return float(((p < 0.1) | (p > 0.9)).float().mean()) if len(p) else 0.0


class Stage2Task:
    """The loop's task for stage 2: `trainable` is the PPM; the LLM is frozen but back-propagated through."""

    def __init__(self, model: nn.Module, ppm: PPMClassifier, settings: Stage2Settings):
        self.model = freeze(model)
        if settings.gradient_checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            self.model.train()  # checkpointing is active in training mode only; the model has no dropout
        self.settings = settings
        self.trainable = ppm
        self.last_probabilities: torch.Tensor | None = None  # visual P of the last batch, for diagnostics

    def to(self, device) -> None:
        self.model.to(device)

    def loss(self, ppm: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        with SoftMaskSession(self.model, lambda embeds, mask: ppm(embeds, attention_mask=mask)) as session:
            logits = self.model(**inputs, use_cache=False).logits
        ce = answer_cross_entropy(logits, labels)
        probabilities = torch.sigmoid(session.scores)
        s = self.settings
        reg = retention_regularizer(probabilities, session.visual, s.reserve_ratio, s.regularizer)
        with torch.no_grad():
            visual_p = probabilities[session.visual]
            self.last_probabilities = visual_p.detach().cpu()
            metrics = {
                "ce": ce.item(),
                "reg": reg.item(),
                "p_mean": float(visual_p.mean()) if len(visual_p) else 0.0,
                "p_near_binary": near_binary(probabilities, session.visual),
            }
        return ce + s.k * reg, metrics

    def save(self, ppm: PPMClassifier, directory: Path) -> None:
        ppm.save_pretrained(directory)
