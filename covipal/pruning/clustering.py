"""Density-peak clustering, as SparseVLM (kNN density, for recycling) and ViTCoP (Gaussian density within a
spatial neighbourhood, VIC) use it: a token is a centre when it is dense and far from any denser token."""

from __future__ import annotations

import torch


def nearest_denser(
    density: torch.Tensor,
    distance: torch.Tensor,
    allowed: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
):
    """(δ, parent, has_parent): each token's distance to, and index of, the nearest token of higher density
    (among `allowed` pairs); a token with none gets the largest distance in its row. `distance` [n, m] holds each
    token's distances to its `candidates` [n, m] (token indices; None: every token, m = n). Ties in density break
    by index, so "denser" is a total order."""
    index = torch.arange(density.shape[0], device=density.device)
    rival, rival_index = (density[None, :], index[None, :]) if candidates is None else (density[candidates], candidates)
    higher = (rival > density[:, None]) | ((rival == density[:, None]) & (rival_index < index[:, None]))
    if allowed is not None:
        higher = higher & allowed
    masked = distance.masked_fill(~higher, float("inf"))
    nearest, pick = masked.min(dim=1)
    parent = pick if candidates is None else candidates.gather(1, pick[:, None]).squeeze(1)
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
CHUNK_PAIRS = 1 << 20  # VIC's densities are summed over row chunks of about this many pairs


def cutoff_distance(features: torch.Tensor, quantile: float = 0.02) -> float:
    """The usual density-peak rule of thumb: a cutoff that makes about `quantile` of all pairs of `features` [n, d]
    neighbours — the `quantile` of the off-diagonal distances, interpolated linearly (as `torch.quantile`, here in
    double), from the two order statistics around it, found by a partial selection (top-k), not a sort of all n².
    Past `CUTOFF_PAIRS` pairs (n > 1024: real models' images and videos; never the tiny world's) the distances of
    every stride-th token to all others stand for all pairs, so the search stays near a million values."""
    n = features.shape[0]
    stride = max(1, -(-n * (n - 1) // CUTOFF_PAIRS))
    rows = torch.arange(0, n, stride, device=features.device)
    sample = torch.cdist(features[rows][None], features[None])[0]  # [rows, n]
    sample[torch.arange(len(rows), device=features.device), rows] = float("-inf")  # each row's own distance
    count = sample.numel() - len(rows)
    if count == 0:
        return 1.0
    rank = quantile * (count - 1)
    below = int(rank)
    at = len(rows) + below  # where the lower order statistic is among all values, the −inf entries first
    smallest = torch.topk(sample.view(-1), min(at + 2, sample.numel()), largest=False).values  # ascending
    low, high = float(smallest[at]), float(smallest[min(at + 1, len(smallest) - 1)])
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


def view_members(views: torch.Tensor):
    """([n, m] long, [n, m] bool): for each token, the tokens of its view (ascending, padded to the largest view
    m with index 0) and which of the m entries are real."""
    labels, slot, sizes = torch.unique(views, return_inverse=True, return_counts=True)
    order = torch.sort(slot, stable=True).indices  # tokens grouped by view, ascending within each
    starts = torch.cumsum(sizes, 0) - sizes
    offset = torch.arange(int(sizes.max()), device=views.device)
    valid = offset[None, :] < sizes[:, None]  # [views, m]
    members = torch.where(valid, order[(starts[:, None] + offset[None, :]).clamp(max=len(views) - 1)], 0)
    return members[slot], valid[slot]


def visual_information_clusters(
    features: torch.Tensor,
    places: torch.Tensor,
    centre_ratio: float,
    cutoff: float | None = None,
    spatial: float = 0.6,
    views: torch.Tensor | None = None,
) -> torch.Tensor:
    """ViTCoP's VIC. ρ_i = Σ_{j≠i} exp(−(d_ij/d_c)²) on feature distances; δ_i = distance to the nearest denser
    token within spatial distance `spatial` (on the normalised grid `places` [n, 2]) and of the same view (`views`
    [n], any labels; None: one view); a token with none gets its largest distance to any token; the ⌈n·ratio⌉
    largest ρ·δ are centres; the others take the label of their nearest denser neighbour, densest first (a token
    with none joins its nearest centre). Returns labels [n] in 0..centres-1.

    The n² work is the density only: it is summed over chunks of rows (no n² tensor is ever held), and the search
    for the nearest denser token looks only among the token's own view ([n, largest view]; a video's frame)."""
    n = features.shape[0]
    features = features.to(torch.promote_types(features.dtype, torch.float32))
    d_c = cutoff if cutoff is not None else cutoff_distance(features)
    views = torch.zeros(n, dtype=torch.long, device=features.device) if views is None else views
    members, valid = view_members(views)
    density = features.new_empty(n)
    farthest = features.new_empty(n)
    peers = features.new_empty(members.shape)  # [n, m]: each token's distances to its view's tokens
    step = max(1, CHUNK_PAIRS // n)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        distance = torch.cdist(features[rows][None], features[None])[0]
        farthest[rows] = distance.max(1).values
        peers[rows] = distance.gather(1, members[rows])
        similarity = distance.div_(d_c).square_().neg_().exp_()  # exp(−(d/d_c)²), in place
        own = torch.arange(rows.stop - start, device=features.device)
        density[rows] = similarity.sum(1) - similarity[own, own + start]
    near = (places[members].float() - places.float()[:, None]).norm(dim=-1) <= spatial
    delta, parent, has_parent = nearest_denser(density, peers, near & valid, members)
    delta = torch.where(has_parent, delta, farthest)  # the farthest of all tokens, not only of the view
    centres_count = max(1, min(n, -(-int(n * centre_ratio * 1e6) // 1_000_000)))  # ceil, robust to float noise
    centres = torch.sort(torch.argsort(density * delta, descending=True, stable=True)[:centres_count]).values
    labels = torch.full((n,), -1, dtype=torch.long, device=features.device)
    labels[centres] = torch.arange(centres_count, device=features.device)
    roots = torch.nonzero(~has_parent).squeeze(1)  # chains end here: these join their nearest centre
    fallback = torch.zeros(n, dtype=torch.long, device=features.device)
    fallback[roots] = torch.cdist(features[roots][None], features[centres][None])[0].argmin(1)
    return propagate_labels(labels, parent, has_parent, fallback)
