"""How good a token ranking is as a guide to the question, measured against ground truth (the tiny world's
relevance, which nothing under test ever reads): the stage-1 labels of each query-row mode, a trained PPM's
scores, and two references that know nothing of the question (the first tokens; random).

Per sample, over its visual tokens, with k = floor(r · n_v):
  recall        share of the question's relevant tokens among the ranking's top k;
  spearman_pos  Spearman correlation of the ranking with token position (−1: earlier tokens rank first);
  base_tile     share of the top k in the image's base tile (its first side² visual tokens);
  label_overlap for a PPM, share of its top k that its own training labels also put in their top k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from covipal.tiny_world.oracle import relevance_positions
from covipal.training.guidance import GuidanceProbe
from covipal.training.stage1 import top_overlap


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype, device=values.device)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum().item() / denominator) if denominator else 0.0


@dataclass
class RankingQuality:
    recall: list[float] = field(default_factory=list)
    spearman_pos: list[float] = field(default_factory=list)
    base_tile: list[float] = field(default_factory=list)
    label_overlap: list[float] = field(default_factory=list)

    def add(self, scores: torch.Tensor, relevant: torch.Tensor, base: int, ratio: float, labels=None) -> None:
        """`scores`, `relevant` ([n_v] bool), `labels`: one sample's visual tokens in order."""
        k = max(1, int(ratio * len(scores)))
        top = scores.topk(k).indices
        if relevant.any():
            self.recall.append(float(relevant[top].sum() / relevant.sum()))
        self.spearman_pos.append(spearman(scores, torch.arange(len(scores), dtype=torch.float64)))
        self.base_tile.append(float((top < base).float().mean()))
        if labels is not None:
            self.label_overlap.append(top_overlap(scores, labels, ratio))

    def summary(self) -> dict[str, float | None]:
        mean = lambda values: float(sum(values) / len(values)) if values else None  # noqa: E731
        return {
            "recall": mean(self.recall),
            "spearman_pos": mean(self.spearman_pos),
            "base_tile": mean(self.base_tile),
            "label_overlap": mean(self.label_overlap),
            "samples": len(self.spearman_pos),
        }


@torch.no_grad()
def ranking_quality(
    probes: dict[str, GuidanceProbe],
    ppms: dict[str, tuple[torch.nn.Module, str | None]],
    batches,
    relevance: list,
    base_tokens: int,
    ratio: float = 0.25,
    seed: int = 0,
) -> dict[str, dict]:
    """{name: summary} for each probe's labels, each PPM's scores (`ppms`: name -> (PPM, name of the probe whose
    labels it was trained on, or None)), "first tokens" and "random", on the same batches of prompts.
    `relevance`: per sample in batch order, a bool mask over its visual tokens; `base_tokens`: side² of the base
    tile."""
    results = {name: RankingQuality() for name in [*probes, *ppms, "first tokens", "random"]}
    generator = torch.Generator().manual_seed(seed)
    offset = 0
    for batch in batches:
        labels, guidance = {}, None
        for name, probe in probes.items():
            with probe:
                guidance = probe(batch)
            labels[name] = guidance.labels
        marks = relevance_positions(guidance.visual, relevance[offset : offset + guidance.visual.shape[0]])
        offset += guidance.visual.shape[0]
        ppm_scores = {
            name: ppm(guidance.embeds, attention_mask=guidance.attention_mask) for name, (ppm, _) in ppms.items()
        }
        for row in range(guidance.visual.shape[0]):
            visual = guidance.visual[row]
            if not visual.any():
                continue
            relevant = marks[row][visual]
            count = int(visual.sum())
            for name in probes:
                results[name].add(labels[name][row][visual], relevant, base_tokens, ratio)
            for name, (_, trained_on) in ppms.items():
                own = labels[trained_on][row][visual] if trained_on in labels else None
                results[name].add(ppm_scores[name][row][visual].float(), relevant, base_tokens, ratio, own)
            results["first tokens"].add(-torch.arange(count, dtype=torch.float32), relevant, base_tokens, ratio)
            results["random"].add(torch.rand(count, generator=generator), relevant, base_tokens, ratio)
    return {name: quality.summary() for name, quality in results.items()}
