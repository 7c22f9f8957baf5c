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
    query_rows: str = "literal"  # literal (Eq. 3: the last n_v rows) | text_after_visual | last
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


def topk_recall(scores: torch.Tensor, labels: torch.Tensor, visual: torch.Tensor, ratio: float) -> float:
    """Share of the label's top floor(r·n_v) visual tokens that the scores also put in their top floor(r·n_v)."""
    recalls = []
    for row in range(scores.shape[0]):
        s, y = scores[row][visual[row]], labels[row][visual[row]]
        k = max(1, int(ratio * len(s)))
        if len(s) == 0:
            continue
        top_s = set(s.topk(k).indices.tolist())
        top_y = set(y.topk(k).indices.tolist())
        recalls.append(len(top_s & top_y) / k)
    return sum(recalls) / max(1, len(recalls))


class Stage1Task:
    """The loop's task for stage 1: `trainable` is the PPM."""

    def __init__(self, model: nn.Module, ppm: PPMClassifier, settings: Stage1Settings, free_unused: bool = True):
        self.model = freeze(model)
        self.settings = settings
        if free_unused:
            drop_layers_after(self.model, settings.guidance_layer)
        self.probe = GuidanceProbe(
            self.model, settings.guidance_layer, settings.query_rows, settings.normalize_labels, settings.chunk
        )
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
