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

from covipal.data.conversation import PROMPT_MASK
from covipal.errors import CovipalError
from covipal.models.families import visual_mask
from covipal.models.ppm import PPMClassifier
from covipal.pruning.budget import check_ratio
from covipal.pruning.sequence import Compaction
from covipal.training.soft_mask import SoftMaskSession
from covipal.training.stage1 import freeze

REGULARIZERS = ("separation", "naive")
RETENTIONS = ("sigmoid", "budget")


@dataclass
class Stage2Settings:
    k: float = 0.0  # the paper's 0.01 scrambles the budget ranking under Adam (README, stage 2); kept for sigmoid
    reserve_ratio: float = 0.25
    regularizer: str = "separation"  # separation (Eq. 10) | naive (|r − mean P|)
    retention: str = "budget"  # sigmoid: P = σ(S) (Eq. 5) | budget: P = σ((S − θ) / (τ·spread)), see budget_logits
    temperature: float = 0.5  # τ of the budget retention at the start of training
    final_temperature: float | None = 0.1  # τ at the end, reached linearly (None: τ stays `temperature`)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_ratio(self.reserve_ratio, "stage2.reserve_ratio")
        if self.regularizer not in REGULARIZERS:
            raise CovipalError(f"stage2.regularizer={self.regularizer!r}: use one of {', '.join(REGULARIZERS)}")
        if self.retention not in RETENTIONS:
            raise CovipalError(f"stage2.retention={self.retention!r}: use one of {', '.join(RETENTIONS)}")
        if self.k < 0:
            raise CovipalError(f"stage2.k={self.k} is negative: it would reward the opposite of separation; use k >= 0")
        for name in ("temperature", "final_temperature"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise CovipalError(f"stage2.{name}={value} must be positive, e.g. stage2.{name}=0.5")

    def temperature_at(self, progress: float) -> float:
        """τ after `progress` (0 → 1) of the training."""
        end = self.temperature if self.final_temperature is None else self.final_temperature
        return self.temperature + (end - self.temperature) * min(max(progress, 0.0), 1.0)


def budget_logits(scores: torch.Tensor, visual: torch.Tensor, ratio: float, temperature: float) -> torch.Tensor:
    """Logits whose sigmoid is above 1/2 for exactly each sample's top floor(r·n_v) visual scores: S − θ, with θ
    midway between the last score inside the budget and the first outside, divided by τ times the spread (standard
    deviation) of the sample's visual scores. θ and the spread are constants of the step (no gradient), so the
    retention probabilities depend on the ranking and the shape of the scores, not on their offset or scale: the
    soft mask keeps the budget inference keeps, and τ sets how hard it drops the rest."""
    logits = torch.zeros_like(scores)
    for row in range(scores.shape[0]):
        s = scores[row][visual[row]]
        if len(s) == 0:
            continue
        ordered = s.detach().sort(descending=True).values
        keep = max(1, int(ratio * len(s)))
        threshold = ordered[keep - 1] - 1 if keep == len(s) else (ordered[keep - 1] + ordered[keep]) / 2
        spread = ordered.std().clamp(min=1e-6) if len(s) > 1 else ordered.new_ones(())
        logits[row] = (scores[row] - threshold) / (temperature * spread)
    return logits


def separation(probabilities: torch.Tensor, visual: torch.Tensor, ratio: float) -> float:
    """Mean over samples of mean P of the top floor(r·n_v) minus mean P of the rest (1: a hard top-k mask)."""
    margins = []
    for row in range(probabilities.shape[0]):
        p = probabilities[row][visual[row]].sort(descending=True).values
        if len(p) < 2:
            continue
        high = max(1, int(ratio * len(p)))
        margins.append(float(p[:high].mean() - (p[high:].mean() if high < len(p) else 0)))
    return sum(margins) / len(margins) if margins else 0.0


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


def prompt_scores(ppm: nn.Module, embeds: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """PPM scores [B, T] of a batch of whole conversations, read from the `prompt` tokens only ([B, T] bool): they
    are gathered into a left-padded batch of their own, as inference gives them, so nothing outside the prompt
    (no answer) reaches the PPM. Positions outside the prompt score 0."""
    view = Compaction.from_keep(prompt)
    scores = ppm(view.gather(embeds), attention_mask=view.valid)
    rows = torch.arange(prompt.shape[0], device=prompt.device)[:, None].expand_as(view.index)
    return scores.new_zeros(prompt.shape).index_put((rows[view.valid], view.index[view.valid]), scores[view.valid])


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
        self.progress = 0.0  # share of training done, set by the loop (the temperature schedule reads it)

    def to(self, device) -> None:
        self.model.to(device)

    def loss(self, ppm: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        if PROMPT_MASK not in batch:
            raise CovipalError("stage 2 needs the prompt mask in its batches: TrainingCollator(..., mark_prompt=True)")
        prompt = batch[PROMPT_MASK]
        inputs = {key: value for key, value in batch.items() if key not in ("labels", PROMPT_MASK)}
        s = self.settings
        visual = visual_mask(self.model.config, inputs["input_ids"])

        def scorer(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            scores = prompt_scores(ppm, embeds, prompt & mask)
            if s.retention == "budget":
                temperature = s.temperature_at(self.progress)
                scores = budget_logits(scores.float(), visual & mask, s.reserve_ratio, temperature)
            return scores

        with SoftMaskSession(self.model, scorer) as session:
            logits = self.model(**inputs, use_cache=False).logits
        ce = answer_cross_entropy(logits, labels)
        probabilities = torch.sigmoid(session.scores)
        reg = retention_regularizer(probabilities, session.visual, s.reserve_ratio, s.regularizer)
        with torch.no_grad():
            visual_p = probabilities[session.visual]
            self.last_probabilities = visual_p.detach().cpu()
            metrics = {
                "ce": ce.item(),
                "reg": reg.item(),
                "p_mean": float(visual_p.mean()) if len(visual_p) else 0.0,
                "p_near_binary": near_binary(probabilities, session.visual),
                "separation": separation(probabilities, session.visual, s.reserve_ratio),
            }
        return ce + s.k * reg, metrics

    def save(self, ppm: PPMClassifier, directory: Path) -> None:
        ppm.save_pretrained(directory)
