"""Stage 1: the PPM learns to predict, from the LLM's input embeddings, the attention each visual token receives
at the guidance layer (Eq. 3), with a per-sample MSE over the visual tokens (Eq. 4). The LLM stays frozen and
runs only up to the guidance layer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from covipal.models.ppm import PPMClassifier
from covipal.training.guidance import GuidanceProbe


@dataclass
class Stage1Settings:
    guidance_layer: int = 16  # 0-based index of the decoder layer whose attention gives the labels
    query_rows: str = "question"  # question | literal (Eq. 3) | text_after_visual | last_prompt | last (guidance.py)
    reduce: str = "max"  # over heads and query rows: max (the most any head of any row pays) | sum (Eq. 3)
    normalize_labels: bool = False  # False = raw sums, as in the paper
    chunk: int = 256  # query rows per attention block when computing labels
    reserve_ratio: float = 0.25  # only for the top-r recall metric


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def drop_layers_after(model: nn.Module, layer: int) -> None:
    """Free the decoder layers after `layer` on this instance (stage 1 never runs them)."""
    multimodal = model.model if hasattr(model, "lm_head") else model
    layers = multimodal.language_model.layers
    del layers[layer + 1 :]


def top_overlap(scores: torch.Tensor, labels: torch.Tensor, ratio: float) -> float:
    """Share of the labels' top floor(r·n) that the scores also put in their top floor(r·n)."""
    k = max(1, int(ratio * len(scores)))
    return len(set(scores.topk(k).indices.tolist()) & set(labels.topk(k).indices.tolist())) / k


def topk_recall(scores: torch.Tensor, labels: torch.Tensor, visual: torch.Tensor, ratio: float) -> float:
    """Share of the label's top floor(r·n_v) visual tokens that the scores also put in their top floor(r·n_v)."""
    recalls = [
        top_overlap(scores[row][visual[row]], labels[row][visual[row]], ratio)
        for row in range(scores.shape[0])
        if visual[row].any()
    ]
    return sum(recalls) / max(1, len(recalls))


class Stage1Task:
    """The loop's task for stage 1: `trainable` is the PPM."""

    def __init__(
        self,
        model: nn.Module,
        ppm: PPMClassifier,
        settings: Stage1Settings,
        free_unused: bool = True,
        turn_ids: tuple[int, int] | None = None,
    ):
        """Batches are prompts only (`TrainingCollator(prompt_only=True)`): neither the labels nor the PPM ever
        see an answer. `turn_ids`: the chat template's turn start/end tokens (the `question` and `last_prompt`
        rows need them)."""
        self.model = freeze(model)
        self.settings = settings
        s = settings
        self.probe = GuidanceProbe(
            self.model, s.guidance_layer, s.query_rows, s.normalize_labels, s.chunk, turn_ids=turn_ids, reduce=s.reduce
        )
        if free_unused:
            drop_layers_after(self.model, settings.guidance_layer)
        self.trainable = ppm

    def to(self, device) -> None:
        self.model.to(device)

    def loss(self, ppm: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        batch = {key: value for key, value in batch.items() if key != "labels"}
        with self.probe:
            guidance = self.probe(batch)
        scores = ppm(guidance.embeds, attention_mask=guidance.attention_mask).float()
        visual = guidance.visual
        counts = visual.sum(1)
        has_visual = counts > 0
        per_sample = ((scores - guidance.labels) ** 2 * visual).sum(1) / counts.clamp(min=1)
        # Rows without visual tokens contribute zero (kept in the mean so every process weighs rows alike).
        loss = (per_sample * has_visual).sum() / per_sample.shape[0]
        with torch.no_grad():
            metrics = {
                "label_mean": float((guidance.labels * visual).sum() / counts.sum().clamp(min=1)),
                "recall_at_r": topk_recall(scores, guidance.labels, visual, self.settings.reserve_ratio),
            }
        return loss, metrics

    def save(self, ppm: PPMClassifier, directory: Path) -> None:
        ppm.save_pretrained(directory)
