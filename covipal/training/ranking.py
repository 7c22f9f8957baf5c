"""How well a PPM ranks visual tokens against the stage-1 labels: overlap of the top floor(r·n_v) sets and
Spearman rank correlation, per sample, averaged."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from covipal.training.guidance import GuidanceProbe


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


def top_overlap(scores: torch.Tensor, labels: torch.Tensor, ratio: float) -> float:
    k = max(1, int(ratio * len(scores)))
    return len(set(scores.topk(k).indices.tolist()) & set(labels.topk(k).indices.tolist())) / k


@torch.no_grad()
def ranking_report(model, ppms: dict, batches, probe: GuidanceProbe, ratios=(0.25, 0.5), progress=True) -> dict:
    """{name: {"overlap@r": …, "spearman": …, "samples": n}} for each PPM in `ppms`, on the same batches."""
    sums = {name: {**{f"overlap@{r}": 0.0 for r in ratios}, "spearman": 0.0} for name in ppms}
    count = 0
    with probe:
        for batch in tqdm(batches, desc="ranking", disable=not progress):
            batch = {k: v for k, v in batch.items() if torch.is_tensor(v) and k != "labels"}
            guidance = probe(batch)
            for name, ppm in ppms.items():
                scores = ppm(guidance.embeds, attention_mask=guidance.attention_mask)
                for row in range(scores.shape[0]):
                    visual = guidance.visual[row]
                    if not visual.any():
                        continue
                    s, y = scores[row][visual], guidance.labels[row][visual]
                    for r in ratios:
                        sums[name][f"overlap@{r}"] += top_overlap(s, y, r)
                    sums[name]["spearman"] += spearman(s, y)
            count += int(guidance.visual.any(1).sum())
    return {
        name: {**{k: v / max(1, count) for k, v in values.items()}, "samples": count} for name, values in sums.items()
    }
