"""Density-peak clustering, as SparseVLM (kNN density, for recycling) and ViTCoP (Gaussian density within a
spatial neighbourhood, VIC) use it: a token is a centre when it is dense and far from any denser token."""

from __future__ import annotations

import torch


def nearest_denser(density: torch.Tensor, distance: torch.Tensor, allowed: torch.Tensor | None = None):
    """(δ, parent, has_parent): each token's distance to, and index of, the nearest token of higher density
    (among `allowed` pairs); a token with none gets the largest distance it has to any token. Ties in density
    break by index, so "denser" is a total order."""
    n = density.shape[0]
    index = torch.arange(n, device=density.device)
    higher = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )
    if allowed is not None:
        higher = higher & allowed
    masked = distance.masked_fill(~higher, float("inf"))
    nearest, parent = masked.min(dim=1)
    has_parent = torch.isfinite(nearest)
    delta = torch.where(has_parent, nearest, distance.max(dim=1).values)
    return delta, parent, has_parent


def assign_to_centres(distance: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Cluster label (index into `centres`) of every token: its nearest centre; centres label themselves."""
    labels = distance[:, centres].argmin(dim=1)
    labels[centres] = torch.arange(len(centres), device=distance.device)
    return labels


def knn_density_peaks(features: torch.Tensor, clusters: int, k: int = 5) -> torch.Tensor:
    """DPC-kNN (SparseVLM's recycling): ρ_i = exp(−mean of squared distances to the k nearest), centres = the
    `clusters` largest ρ·δ. Returns labels [n] in 0..clusters-1."""
    n = features.shape[0]
    clusters = max(1, min(clusters, n))
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    distance = torch.cdist(features.float()[None], features.float()[None])[0] / features.shape[-1] ** 0.5
    k = max(1, min(k, n - 1))
    nearest = torch.topk(distance, k + 1, dim=1, largest=False).values[:, 1:]
    density = torch.exp(-(nearest**2).mean(dim=1))
    gamma = density * nearest_denser(density, distance)[0]
    centres = torch.sort(torch.argsort(gamma, descending=True, stable=True)[:clusters]).values
    return assign_to_centres(distance, centres)


CUTOFF_PAIRS = 1 << 20  # above this many pairs the cutoff is taken from every stride-th token's distances


def cutoff_distance(distance: torch.Tensor, quantile: float = 0.02) -> float:
    """The usual density-peak rule of thumb: a cutoff that makes about `quantile` of all pairs neighbours — the
    `quantile` of the off-diagonal distances, interpolated linearly (as `torch.quantile`, here in double), from
    the two order statistics around it, found by selection rather than by sorting all n² values. Past
    `CUTOFF_PAIRS` pairs (n > 1024: real models' images and videos; never the tiny world's) the distances of every
    stride-th token to all others stand for all pairs, so the search stays near a million values."""
    n = distance.shape[0]
    stride = max(1, -(-n * (n - 1) // CUTOFF_PAIRS))
    rows = torch.arange(0, n, stride, device=distance.device)
    sample = distance[rows]  # a copy: [rows, n]
    sample[torch.arange(len(rows), device=distance.device), rows] = float("-inf")  # each row's own distance
    count = sample.numel() - len(rows)
    if count == 0:
        return 1.0
    rank = quantile * (count - 1)
    below = int(rank)
    flat = sample.view(-1)
    low = flat.kthvalue(len(rows) + below + 1).values  # the −inf entries are the smallest
    if below + 1 >= count or int((flat <= low).sum()) >= len(rows) + below + 2:
        high = low  # the next order statistic is the same value
    else:
        high = flat[flat > low].min()
    low, high = float(low), float(high)
    return max(low + (rank - below) * (high - low), 1e-6)


def propagate_labels(labels: torch.Tensor, parent: torch.Tensor, has_parent: torch.Tensor, fallback: torch.Tensor):
    """Every unlabelled token (label −1) takes the label at the end of its chain of parents (each parent denser,
    so chains end): the first labelled token on it, or, where the chain ends at a token with no parent, that
    token's `fallback`. The same labels as visiting tokens densest first, in log(depth) vectorised steps."""
    index = torch.arange(len(labels), device=labels.device)
    labelled = labels >= 0
    up = torch.where(labelled | ~has_parent, index, parent)
    while True:
        further = up[up]
        if torch.equal(further, up):
            break
        up = further
    return torch.where(labelled, labels, fallback)[up]


def visual_information_clusters(
    features: torch.Tensor,
    places: torch.Tensor,
    centre_ratio: float,
    cutoff: float | None = None,
    spatial: float = 0.6,
    same_view: torch.Tensor | None = None,
) -> torch.Tensor:
    """ViTCoP's VIC. ρ_i = Σ_{j≠i} exp(−(d_ij/d_c)²) on feature distances; δ_i = distance to the nearest denser
    token within spatial distance `spatial` (on the normalised grid `places` [n, 2], and in the same view);
    the ⌈n·ratio⌉ largest ρ·δ are centres; the others take the label of their nearest denser neighbour, densest
    first (a token with none joins its nearest centre). Returns labels [n] in 0..centres-1."""
    n = features.shape[0]
    distance = torch.cdist(features.float()[None], features.float()[None])[0]
    d_c = cutoff if cutoff is not None else cutoff_distance(distance)
    similarity = distance / d_c  # exp(−(d/d_c)²), in place: n² floats are large at video lengths
    similarity.square_().neg_().exp_()
    density = similarity.sum(1) - similarity.diagonal()
    del similarity
    near = torch.cdist(places.float()[None], places.float()[None])[0] <= spatial
    if same_view is not None:
        near = near & same_view
    delta, parent, has_parent = nearest_denser(density, distance, near)
    centres_count = max(1, min(n, -(-int(n * centre_ratio * 1e6) // 1_000_000)))  # ceil, robust to float noise
    centres = torch.sort(torch.argsort(density * delta, descending=True, stable=True)[:centres_count]).values
    labels = torch.full((n,), -1, dtype=torch.long, device=features.device)
    labels[centres] = torch.arange(centres_count, device=features.device)
    return propagate_labels(labels, parent, has_parent, distance[:, centres].argmin(1))
