"""The baselines at equal budget: PyramidDrop, SparseVLM, VisionZip, ViTCoP and pooling.

Per-layer counts follow each method's schedule, solved so the average is r; infeasible settings fail naming a
feasible one; drop-only methods equal the full model with the dropped keys masked; merges do what they say; a
padded batch behaves like its samples alone; scores from the fused path equal eager attention weights."""

from __future__ import annotations

import contextlib
import math
import re

import numpy as np
import pytest
import torch
from pruning_helpers import (
    NUM_LAYERS,
    batch_samples,
    float64_model,
    generate_position_ids,
    get_inputs,
    keep_from_compaction,
    pristine,
    to_float64,
    tower_facts,
    visual_mask,
)
from transformers.masking_utils import create_causal_mask

from covipal.errors import CovipalError
from covipal.pruning.budget import split_budget, visual_budget
from covipal.pruning.clustering import (
    cutoff_distance,
    knn_density_peaks,
    nearest_denser,
    propagate_labels,
    visual_information_clusters,
)
from covipal.pruning.context import LayerContext
from covipal.pruning.pdrop import PyramidDropPruner
from covipal.pruning.pool import PoolPruner, grid_cells
from covipal.pruning.session import PruningSession
from covipal.pruning.sparsevlm import SparseVLMPruner, recycle_split, text_raters
from covipal.pruning.visionzip import VisionZipPruner, contextual_merge
from covipal.pruning.vitcop import ViTCoPPruner, cluster_selection, group_means, key_norms

PDROP_LAYERS = [0, 4, 8]
SPARSE_LAYERS = [1, 4, 7]
VITCOP_LAYERS = [2, 9]


def make(name: str, ratio: float, **kw):
    if name == "pdrop":
        return PyramidDropPruner(ratio, layers=kw.pop("layers", PDROP_LAYERS), **kw)
    if name == "sparsevlm":
        return SparseVLMPruner(ratio, layers=kw.pop("layers", SPARSE_LAYERS), **kw)
    if name == "visionzip":
        return VisionZipPruner(ratio, **kw)
    if name == "vitcop":
        return ViTCoPPruner(ratio, layers=kw.pop("layers", VITCOP_LAYERS), **kw)
    if name == "pool":
        return PoolPruner(ratio, **kw)
    raise ValueError(name)


def run(model, inputs, pruner, **extra):
    with torch.no_grad(), PruningSession(model, pruner) as session:
        logits = model(**inputs, **extra).logits
    return session.record, logits


def pdrop_lambda_by_roots(ratio: float, layers: list[int], num_layers: int) -> float:
    """λ from the polynomial l1 + Σ (l_{i+1} − l_i) λ^i + (L − l_m) λ^m = r·L, by numpy's root finder."""
    bounds = [*layers, num_layers]
    coefficients = [0.0] * (len(layers) + 1)  # coefficients[i] multiplies λ^i
    coefficients[0] = layers[0] - ratio * num_layers
    for i in range(len(layers)):
        coefficients[i + 1] = bounds[i + 1] - bounds[i]
    roots = np.roots(coefficients[::-1])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and 0 < r.real <= 1 + 1e-12]
    assert len(real) == 1
    return real[0]


def expected_counts(name: str, pruner, ratio: float, n: int) -> list[int]:
    """Per-layer visual counts from the method's definition, computed here independently of its code."""
    if name in ("pool", "visionzip"):
        return [max(1, int(np.floor(ratio * n + 1e-9)))] * NUM_LAYERS
    if name == "pdrop":
        lam = pdrop_lambda_by_roots(ratio, PDROP_LAYERS, NUM_LAYERS)
        assert pruner.solved_lambda == pytest.approx(lam, abs=1e-9)
        bounds = [*PDROP_LAYERS, NUM_LAYERS]
        counts = [n] * PDROP_LAYERS[0]
        for i in range(len(PDROP_LAYERS)):
            counts += [max(1, int(np.floor(lam ** (i + 1) * n + 1e-9)))] * (bounds[i + 1] - bounds[i])
        return counts
    if name == "sparsevlm":
        drops = [layer + 1 for layer in SPARSE_LAYERS]
        fractions = pruner.fractions
        ratios = np.array(fractions) / np.array([0.52, 0.35, 0.19])
        assert np.allclose(ratios, ratios[0])  # one scale for the v1.5 shape
        bounds = [*drops, NUM_LAYERS]
        average = (drops[0] + sum((bounds[i + 1] - bounds[i]) * fractions[i] for i in range(3))) / NUM_LAYERS
        assert average == pytest.approx(ratio, abs=1e-9)
        counts = [n] * drops[0]
        for i in range(3):
            counts += [max(1, int(np.floor(fractions[i] * n + 1e-9)))] * (bounds[i + 1] - bounds[i])
        return counts
    if name == "vitcop":
        S, D = VITCOP_LAYERS
        V = pruner.solved_vision_keep
        assert V == pytest.approx(min(1.0, 0.3 + 0.8 * ratio))
        k1 = int(np.floor(V * n + 1e-9))
        k2 = int(round((ratio * n * NUM_LAYERS - S * k1) / ((D - S) + (NUM_LAYERS - D) / 5)))
        return [k1] * S + [k2] * (D - S) + [k2 // 5] * (NUM_LAYERS - D)
    raise ValueError(name)


METHODS = ["pdrop", "sparsevlm", "visionzip", "vitcop", "pool"]


@pytest.mark.parametrize("kind", ["batch", "video", "image", "multi_image"])
@pytest.mark.parametrize("ratio", [0.5, 0.25])
@pytest.mark.parametrize("name", METHODS)
def test_layer_counts_follow_each_schedule(sdpa_model, processor, name, ratio, kind):
    inputs = get_inputs(processor, kind)
    pruner = make(name, ratio)
    record, logits = run(sdpa_model, inputs, pruner)
    assert torch.isfinite(logits).all()
    n_visual = (visual_mask(sdpa_model, inputs["input_ids"]) & inputs["attention_mask"].bool()).sum(1).tolist()
    expected = torch.tensor([expected_counts(name, pruner, ratio, n) for n in n_visual]).T
    assert torch.equal(record.layer_visual_tokens, expected)
    # the achieved average is r up to the floors of the per-stage counts
    for b, n in enumerate(n_visual):
        assert abs(float(record.reserve_ratio[b]) - ratio) <= 1.5 / n + 1e-9


@pytest.mark.parametrize(
    "name, kw, bad, fix",
    [
        ("pdrop", {"layers": [3, 6, 9]}, 0.25, "pruner.layers="),
        ("sparsevlm", {"layers": [2, 5, 8]}, 0.25, "pruner.reserve_ratio>="),
        ("vitcop", {"vision_keep": 0.2}, 0.25, "pruner.vision_keep>="),
    ],
)
def test_infeasible_settings_name_a_feasible_one(sdpa_model, processor, name, kw, bad, fix):
    with pytest.raises(CovipalError) as error:
        run(sdpa_model, get_inputs(processor, "image"), make(name, bad, **kw))
    message = str(error.value)
    assert "\n" not in message and fix in message
    value = re.split(r" \(| and| or", message.rsplit(fix, 1)[1])[0]
    if name == "pdrop":
        feasible = dict(kw, layers=[int(x) for x in re.findall(r"\d+", value)])
        ratio = bad
    elif name == "sparsevlm":
        feasible, ratio = kw, float(value)
    else:
        feasible, ratio = dict(kw, vision_keep=float(value)), bad
    record, _ = run(sdpa_model, get_inputs(processor, "image"), make(name, ratio, **feasible))
    assert abs(float(record.reserve_ratio[0]) - ratio) < 0.02


def test_pdrop_on_28_layers_follows_the_baselines_note():
    """BASELINES.md: layers [7,14,21] reach 0.5 with λ≈0.544 and not 0.25; [2,8,16] give λ≈0.693 and 0.429."""
    from covipal.pruning.schedules import pdrop_lambda

    assert pdrop_lambda(0.5, [7, 14, 21], 28) == pytest.approx(0.544, abs=5e-4)
    assert pdrop_lambda(0.5, [2, 8, 16], 28) == pytest.approx(0.693, abs=5e-4)
    assert pdrop_lambda(0.25, [2, 8, 16], 28) == pytest.approx(0.429, abs=5e-4)
    with pytest.raises(CovipalError, match=r"pruner.layers=\[\d+, \d+, \d+\]"):
        pdrop_lambda(0.25, [7, 14, 21], 28)


# -- pruned == masked (drop-only methods) ----------------------------------------------------------------------------
@contextlib.contextmanager
def staged_key_masks(lm, keeps: dict[int, torch.Tensor], mask2d: torch.Tensor):
    """Layer j hides the keys outside keeps[s] for the last stage s <= j (queries still see themselves)."""
    handles = []
    for index, layer in enumerate(lm.layers):
        starts = [s for s in keeps if s <= index]
        if not starts:
            continue
        keep = keeps[max(starts)]

        def hook(module, args, kwargs, keep=keep):
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = create_causal_mask(
                config=lm.config,
                inputs_embeds=args[0],
                attention_mask=mask2d.bool(),
                past_key_values=None,
                and_mask_function=lambda b, h, q, kv: keep[b, kv] | (q == kv),
            )
            return args, kwargs

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("kind", ["batch", "video"])
@pytest.mark.parametrize(
    "name, kw", [("pdrop", {}), ("pool", {"mode": "subsample"}), ("sparsevlm", {"recycle": False})]
)
def test_drop_only_methods_equal_the_masked_full_model(tiny_dir, processor, name, kw, kind):
    model = float64_model(tiny_dir, "sdpa", "session")
    reference = float64_model(tiny_dir, "sdpa", "pristine")
    inputs = to_float64(get_inputs(processor, kind))
    length = inputs["input_ids"].shape[1]
    record, pruned = run(model, inputs, make(name, 0.25, **kw))
    keeps = {}
    for stage in record.stages[1:]:
        keeps[stage.layer] = keep_from_compaction(stage.compaction, length)
    assert len(keeps) == {"pdrop": 3, "pool": 1, "sparsevlm": 3}[name]
    with torch.no_grad(), staged_key_masks(reference.model.language_model, keeps, inputs["attention_mask"]):
        full = reference(**inputs).logits
    kept = record.kept
    rows = full.gather(1, kept.index[..., None].expand(-1, -1, full.shape[-1]))[kept.valid]
    torch.testing.assert_close(pruned[kept.valid], rows, atol=1e-5, rtol=0)


# -- merges -------------------------------------------------------------------------------------------------------
def layer0_inputs(model):
    """A pre-hook recording what decoder layer 0 receives (after the session compacted the input)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    return seen, model.model.language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)


def stock_embeddings(model, inputs) -> torch.Tensor:
    seen, handle = layer0_inputs(model)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["hidden"]


@pytest.mark.parametrize("kind", ["image", "video"])
def test_pool_mean_gives_each_cell_the_mean_of_its_tokens(tiny_dir, processor, kind):
    model = float64_model(tiny_dir, "sdpa", "session")
    inputs = to_float64(get_inputs(processor, kind))
    embeds = stock_embeddings(float64_model(tiny_dir, "sdpa", "pristine"), inputs)[0]
    pruner = make("pool", 0.25)
    pruner.tokens.frozen = True  # keep the recorded facts for inspection after the run
    seen, handle = layer0_inputs(model)
    try:
        record, _ = run(model, inputs, pruner)
    finally:
        handle.remove()
    facts = pruner.tokens.facts()
    visual = visual_mask(model, inputs["input_ids"])[0]
    index = record.kept.index[0]
    rebuilt = 0
    for view in torch.unique(facts.view[0][visual & (facts.view[0] >= 0)]).tolist():
        positions = torch.nonzero(facts.view[0] == view).squeeze(1)
        share = int((torch.isin(index, positions)).sum())
        for cell in grid_cells(facts.row[0, positions], facts.col[0, positions], share):
            members = positions[cell]
            centre = members[len(members) // 2]
            slot = int(torch.nonzero(index == centre)[0, 0])
            torch.testing.assert_close(seen["hidden"][0, slot], embeds[members].mean(0), atol=1e-12, rtol=0)
            rebuilt += 1
    assert rebuilt == int(record.layer_visual_tokens[0, 0])


def test_grid_cells_are_a_partition_into_compact_rectangles():
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    for cells in (1, 3, 12, 13, 48):
        groups = grid_cells(rows, cols, cells)
        assert len(groups) == cells
        assert sorted(torch.cat(groups).tolist()) == list(range(48))
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= max(2, 48 // cells)  # near-equal cells
        for g in groups:  # each cell spans few rows: it is a band's run of columns
            assert len(torch.unique(rows[g])) <= max(1, 6 * 2 // max(1, int(round((cells * 6 / 8) ** 0.5))))


def test_visionzip_merge_folds_each_token_into_its_most_similar_target():
    torch.manual_seed(0)
    hidden = torch.randn(10, 4, dtype=torch.float64)
    keys = torch.randn(10, 3, dtype=torch.float64)
    targets, merged = contextual_merge(hidden, keys, 3)
    assert targets.tolist() == [0, 3, 6]  # every ⌊10/3⌋-th token
    normed = torch.nn.functional.normalize(keys, dim=-1)
    for slot, target in enumerate(targets.tolist()):
        joiners = [
            i for i in range(10) if i not in targets.tolist() and int((normed[i] @ normed[targets].T).argmax()) == slot
        ]
        want = hidden[target] + (hidden[joiners].mean(0) if joiners else 0)
        torch.testing.assert_close(merged[slot], want)


def test_visionzip_keeps_the_most_attended_tokens_of_each_view(sdpa_model, processor):
    inputs = get_inputs(processor, "video")
    pruner = make("visionzip", 0.5)
    pruner.tokens.frozen = True  # keep the recorded facts for inspection after the run
    record, _ = run(sdpa_model, inputs, pruner)
    facts = pruner.tokens.facts()
    kept = keep_from_compaction(record.kept, inputs["input_ids"].shape[1])[0]
    for view in torch.unique(facts.view[0][facts.view[0] >= 0]).tolist():
        positions = torch.nonzero(facts.view[0] == view).squeeze(1)
        share = int(kept[positions].sum())
        dominant = round(share * 54 / 64)
        top = positions[torch.argsort(facts.score[0, positions], descending=True, stable=True)[:dominant]]
        assert kept[top].all()


@pytest.mark.parametrize("current, target", [(c, t) for c in range(1, 80, 7) for t in range(1, c + 1, 3)])
def test_sparsevlm_recycling_keeps_exactly_the_schedule(current, target):
    keeps, candidates, groups = recycle_split(current, target)
    assert keeps + groups == target
    if target < current:
        deleted = current - keeps
        assert candidates <= deleted and groups <= candidates and groups >= 1


def test_density_peak_clusterings_label_everything():
    torch.manual_seed(0)
    blobs = torch.cat([torch.randn(12, 4) * 0.1 + centre for centre in (0.0, 5.0, -5.0)])
    labels = knn_density_peaks(blobs, 3)
    assert sorted(torch.unique(labels).tolist()) == [0, 1, 2]
    assert all(len(torch.unique(labels[i * 12 : (i + 1) * 12])) == 1 for i in range(3))  # the blobs
    places = torch.rand(36, 2)
    vic = visual_information_clusters(blobs, places, centre_ratio=0.1, spatial=2.0)
    assert vic.min() == 0 and vic.max() == 3  # ⌈36 · 0.1⌉ = 4 centres
    assert all(len(torch.unique(vic[i * 12 : (i + 1) * 12])) <= 2 for i in range(3))


def test_vitcop_stage2_keeps_elites_and_one_mean_per_cluster(tiny_dir, processor):
    model = float64_model(tiny_dir, "sdpa", "session")
    inputs = to_float64(get_inputs(processor, "image"))
    pruner = make("vitcop", 0.5)
    captured = {}
    original = pruner._stage2

    def spy(context):
        merge = original(context)
        captured.update(context=context, merge=merge)
        return merge

    pruner._stage2 = spy
    record, _ = run(model, inputs, pruner)
    context, merge = captured["context"], captured["merge"]
    assert int((merge.keep & context.visual).sum()) == int(pruner._counts[0, 1])
    labels = pruner._labels.gather(1, context.source_index)[0]
    norms = key_norms(context.language_model.layers[context.layer], context.hidden_states)[0]
    clusters = torch.unique(labels[context.visual[0]]).tolist()
    assert len(clusters) > 3
    for label in clusters:
        members = torch.nonzero((labels == label) & context.visual[0]).squeeze(1)
        kept = members[merge.keep[0, members]]
        assert len(kept) >= 1  # every cluster keeps at least its merged token
        by_norm = members[torch.argsort(norms[members], stable=True)]
        elites = by_norm[: len(kept) - 1]  # the lowest key norms of the cluster
        rest = torch.sort(by_norm[len(kept) - 1 :]).values
        slot = rest[(len(rest) - 1) // 2]  # the merged token sits at the rest's median position
        assert set(kept.tolist()) == set(elites.tolist()) | {int(slot)}
        torch.testing.assert_close(merge.hidden_states[0, elites], context.hidden_states[0, elites], atol=0, rtol=0)
        torch.testing.assert_close(merge.hidden_states[0, slot], context.hidden_states[0, rest].mean(0))


# -- batches, determinism -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_padded_batch_matches_samples_alone(tiny_dir, processor, name):
    model = float64_model(tiny_dir, "sdpa", "session")
    batch = to_float64(get_inputs(processor, "batch"))
    singles = [to_float64(sample) for sample in batch_samples(processor)]
    length = batch["input_ids"].shape[1]
    record, batch_logits = run(
        model, batch, make(name, 0.5), position_ids=generate_position_ids(batch["attention_mask"])
    )
    for b, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        alone, logits = run(model, single, make(name, 0.5))
        assert torch.equal(alone.layer_visual_tokens[:, 0], record.layer_visual_tokens[:, b])
        positions = record.kept.index[b][record.kept.valid[b]] - (length - n)
        assert torch.equal(positions, alone.kept.index[0][alone.kept.valid[0]])
        torch.testing.assert_close(
            batch_logits[b][record.kept.valid[b]], logits[0][alone.kept.valid[0]], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("name", METHODS)
def test_runs_are_deterministic(sdpa_model, processor, name):
    inputs = get_inputs(processor, "batch")
    first, logits = run(sdpa_model, inputs, make(name, 0.25))
    second, again = run(sdpa_model, inputs, make(name, 0.25))
    assert torch.equal(first.kept.index, second.kept.index) and torch.equal(logits, again)


@pytest.mark.parametrize("kind", ["batch", "video"])
@pytest.mark.parametrize("name", METHODS)
def test_generate_keeps_what_a_forward_keeps(sdpa_model, processor, name, kind):
    """generate() encodes the pixels before its first forward; the methods must see the same layout and tower
    facts there, so its prefill keeps exactly the tokens a plain forward keeps."""
    inputs = get_inputs(processor, kind)
    forward, logits = run(sdpa_model, inputs, make(name, 0.25))
    with torch.no_grad(), PruningSession(sdpa_model, make(name, 0.25)) as session:
        out = sdpa_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    prefill = session.record
    assert torch.equal(prefill.layer_visual_tokens, forward.layer_visual_tokens)
    for stage, other in zip(prefill.stages[1:], forward.stages[1:], strict=True):
        mine, theirs = stage.compaction, other.compaction
        assert torch.equal(mine.index[mine.valid], theirs.index[theirs.valid])
    assert torch.equal(out[:, inputs["input_ids"].shape[1]], logits[:, -1].argmax(-1))


# -- scores on the fused path equal eager attention weights --------------------------------------------------------
def test_pdrop_and_sparsevlm_scores_equal_eager_attentions(tiny_dir, processor):
    model = pristine(tiny_dir, "eager")
    lm = model.model.language_model
    inputs = get_inputs(processor, "batch")
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    batch, length = inputs["input_ids"].shape
    mask = inputs["attention_mask"].bool()
    position_ids = torch.arange(length)[None].expand(batch, -1)
    visual = visual_mask(model, inputs["input_ids"]) & mask
    layer = 4
    hidden = out.hidden_states[layer]  # input of `layer`
    embeddings = lm.rotary_emb(hidden, position_ids)

    def context(at, hidden_states, previous):
        return LayerContext(
            layer=at,
            hidden_states=hidden_states,
            previous_hidden_states=previous,
            visual=visual,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=embeddings,
            n_visual=visual.sum(1),
            language_model=lm,
            source_index=position_ids,
        )

    pdrop = make("pdrop", 0.5)
    pdrop.setup(model)
    with torch.no_grad():
        scores = pdrop.scores(context(layer, hidden, None))
    torch.testing.assert_close(scores, out.attentions[layer][:, :, -1, :].mean(1), atol=1e-6, rtol=1e-5)

    sparse = make("sparsevlm", 0.5)
    sparse.setup(model)
    embeds = out.hidden_states[0]
    sparse._raters = text_raters(embeds, visual, mask)
    assert sparse._raters.any(1).all()
    with torch.no_grad():
        scores = sparse.scores(context(layer + 1, None, hidden))
    eager = (out.attentions[layer] * sparse._raters[:, None, :, None]).sum(dim=(1, 2))
    torch.testing.assert_close(scores, eager, atol=1e-5, rtol=1e-5)


def test_tower_attention_received_equals_eager_siglip(tiny_dir, processor):
    model = pristine(tiny_dir, "eager")
    inputs = get_inputs(processor, "image")
    facts = tower_facts(model, inputs)
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"][0], output_attentions=True)
    from covipal.models.families.llava_onevision import scoring_layer

    attentions = tower.attentions[scoring_layer(model)]  # [crops, H, n, n]
    received = attentions.mean(dim=(1, 2))  # per crop: mean over heads and query rows
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    places = inputs["input_ids"][0] == model.config.image_token_id
    # the base crop comes first, in raster order, unchanged by packing
    torch.testing.assert_close(facts.score[0, places][: side * side], received[0], atol=1e-6, rtol=1e-5)
    assert set(facts.view[0, places].tolist()) == {0, 1, -1}  # base view, high-resolution grid, newlines
    assert torch.all(
        (facts.row[0, places][facts.view[0, places] >= 0] > 0) & (facts.row[0, places][facts.view[0, places] >= 0] < 1)
    )


def test_vic_pieces_equal_their_plain_definitions():
    """The vectorised cutoff and label propagation of VIC against the plain definitions: torch.quantile of the
    off-diagonal distances, and visiting tokens densest first."""
    torch.manual_seed(0)
    for trial in range(12):
        n = int(torch.randint(2, 200, ()))
        features = torch.randn(n, 8).round() if trial % 2 else torch.randn(n, 8)  # with and without ties
        distance = torch.cdist(features[None], features[None])[0]
        expected = max(float(torch.quantile(distance[~torch.eye(n, dtype=torch.bool)], 0.02)), 1e-6)
        assert cutoff_distance(features) == pytest.approx(expected, rel=1e-6, abs=1e-6)
        density = torch.randint(0, 4, (n,)).float() + torch.rand(n) * (trial % 3)  # ties in density too
        near = torch.rand(n, n) < 0.3
        _, parent, has_parent = nearest_denser(density, distance, near)
        centres = torch.sort(torch.randperm(n)[: max(1, n // 7)]).values
        labels = torch.full((n,), -1)
        labels[centres] = torch.arange(len(centres))
        fallback = distance[:, centres].argmin(1)
        sequential = labels.clone()
        for i in torch.argsort(density, descending=True, stable=True).tolist():
            if sequential[i] < 0:
                sequential[i] = sequential[parent[i]] if has_parent[i] else fallback[i]
        assert torch.equal(propagate_labels(labels, parent, has_parent, fallback), sequential)
    # past a million pairs (n = 1,500 here) every third token's distances stand for all pairs: near the exact value
    features = torch.randn(1500, 8)
    distance = torch.cdist(features[None], features[None])[0]
    reference = torch.quantile(
        distance[~torch.eye(1500, dtype=torch.bool)][::4], 0.02
    )  # a quarter: quantile takes ≤ 16M
    assert cutoff_distance(features) == pytest.approx(float(reference), rel=0.02)


def plain_vic(features, places, views, centre_ratio, spatial):
    """VIC as written in its docstring, on whole n × n matrices, labelling tokens one by one, densest first."""
    n = len(features)
    distance = torch.cdist(features[None], features[None])[0]
    d_c = cutoff_distance(features)
    similarity = torch.exp(-((distance / d_c) ** 2))
    density = similarity.sum(1) - similarity.diagonal()
    near = (torch.cdist(places[None], places[None])[0] <= spatial) & (views[:, None] == views[None, :])
    delta, parent, has_parent = nearest_denser(density, distance, near)
    centres = torch.argsort(density * delta, descending=True, stable=True)[: math.ceil(n * centre_ratio)]
    labels = torch.full((n,), -1)
    labels[torch.sort(centres).values] = torch.arange(len(centres))
    for i in torch.argsort(density, descending=True, stable=True).tolist():
        if labels[i] < 0:
            labels[i] = labels[parent[i]] if has_parent[i] else labels[centres][distance[i, centres].argmin()]
    return labels


@pytest.mark.parametrize("chunk_pairs", [1 << 20, 500])
def test_vic_equals_its_plain_definition(monkeypatch, chunk_pairs):
    """The chunked densities and the per-view search for a denser token give VIC's labels: frames of a video
    (views of unequal sizes) and one image (no views), in float64 so that no rounding tells the two apart;
    with 500 pairs per chunk the densities are summed over many row chunks."""
    monkeypatch.setattr("covipal.pruning.clustering.CHUNK_PAIRS", chunk_pairs)
    generator = torch.Generator().manual_seed(0)
    for trial in range(8):
        views = torch.repeat_interleave(torch.arange(6), torch.randint(5, 40, (6,), generator=generator))
        views = views if trial % 4 else torch.zeros_like(views)
        n = len(views)
        places = (torch.randint(0, 7, (n, 2), generator=generator).double() + 0.5) / 7
        features = torch.randn(n, 12, generator=generator, dtype=torch.float64)
        features += 2 * torch.randn(6, 12, generator=generator, dtype=torch.float64)[views]
        got = visual_information_clusters(features, places, 0.15, spatial=0.4, views=views)
        assert torch.equal(got, plain_vic(features, places, views, 0.15, 0.4)), trial


def test_vitcop_stage2_selection_equals_the_cluster_by_cluster_rule():
    """`cluster_selection` against the rule written cluster by cluster (docs of ViTCoPPruner): same tokens kept,
    same merged means."""
    torch.manual_seed(0)
    for trial in range(60):
        length = int(torch.randint(1, 200, ()))
        labels = torch.randint(0, int(torch.randint(1, max(2, length // 2), ())), (length,))
        norms = torch.rand(length) if trial % 2 else torch.randint(0, 3, (length,)).float()
        hidden = torch.randn(length, 6, dtype=torch.float64)
        budget = int(torch.randint(1, length + 1, ()))
        expected_keep, expected_hidden = torch.zeros(length, dtype=torch.bool), hidden.clone()
        clusters = [torch.nonzero(labels == c).squeeze(1) for c in torch.unique(labels).tolist()]
        clusters = sorted(
            sorted(clusters, key=lambda m: -len(m))[: min(len(clusters), budget)], key=lambda m: int(m[0])
        )
        quotas = split_budget([len(m) - 1 for m in clusters], budget - len(clusters))
        for members, quota in zip(clusters, quotas):
            order = members[torch.argsort(norms[members], stable=True)]
            rest = torch.sort(order[quota:]).values
            expected_keep[order[:quota]] = True
            expected_keep[rest[(len(rest) - 1) // 2]] = True
            expected_hidden[rest[(len(rest) - 1) // 2]] = hidden[rest].mean(0)
        elites, slots, rest, group = cluster_selection(labels, norms, budget)
        keep = torch.zeros(length, dtype=torch.bool)
        keep[elites] = True
        keep[slots] = True
        merged = hidden.clone()
        merged[slots] = group_means(hidden[rest], group, len(slots))
        assert torch.equal(keep, expected_keep) and int(keep.sum()) == min(budget, length)
        torch.testing.assert_close(merged, expected_hidden)


def test_split_budget_is_proportional_and_exact():
    for sizes, total in (([5, 5], 5), ([64, 272], 84), ([3, 1, 1], 4), ([10], 20), ([4, 4, 4], 0)):
        shares = split_budget(sizes, total)
        assert sum(shares) == min(total, sum(sizes))
        assert all(0 <= s <= n for s, n in zip(shares, sizes))
        assert all(abs(s - total * n / sum(sizes)) < 1 + 1e-9 for s, n in zip(shares, sizes) if total <= sum(sizes))
    assert visual_budget(torch.tensor([336]), 0.25).item() == sum(split_budget([64, 272], 84))


@pytest.mark.parametrize("name", METHODS)
def test_exit_removes_every_hook_the_method_attached(sdpa_model, processor, name):
    from pruning_helpers import hook_counts

    inputs = get_inputs(processor, "image")
    with torch.no_grad():
        sdpa_model(**inputs)  # transformers installs its own output-capturing hooks on the first call
    before = hook_counts(sdpa_model)
    pruner = make(name, 0.5)
    with torch.no_grad(), PruningSession(sdpa_model, pruner):
        during = hook_counts(sdpa_model)
        sdpa_model(**inputs)
    assert during != before
    assert hook_counts(sdpa_model) == before
