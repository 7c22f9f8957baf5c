"""Exactness: a hard-pruned forward equals the full stock forward with the pruned visual KEYS masked out (on the
rows the pruned model keeps), and the pruners select exactly the tokens their scores say."""

from __future__ import annotations

import pytest
import torch
from pruning_helpers import (
    NUM_LAYERS,
    PPM,
    backend_of,
    drop_layer,
    exact,
    float64_model,
    floor_budget,
    get_inputs,
    keep_from_compaction,
    make_pruner,
    masked_logits,
    pristine,
    session_model,
    stock_logits,
    to_float64,
    visual_mask,
)

from covipal.models.ppm import PPMClassifier, PPMConfig
from covipal.pruning.context import LayerContext
from covipal.pruning.scoring import attention_rows, last_real_index
from covipal.pruning.session import PruningSession

CONFIGS = {
    "covipal-r0.5": ("covipal", dict(ratio=0.5)),
    "covipal-r0.25": ("covipal", dict(ratio=0.25)),
    "fastv-r0.5": ("fastv", dict(ratio=0.5)),
    "fastv-R0.75": ("fastv", dict(ratio=0.5, R=0.75)),
}
# The numeric comparison at atol=1e-5 runs in float64 with sdpa, where the pruned and the masked forward agree to
# the last bit. It cannot run with eager: transformers' eager attention takes its softmax in float32 whatever the
# model dtype, so eager float64 is only float32-accurate in attention (pruned vs masked differ by 2e-6..3e-5 on
# this model, depending on which tokens are kept), and it turns the fully masked rows of a left-padded batch into
# NaN (stock transformers, no session involved). In float32 either backend differs by 1e-5..9e-5, at the level of
# stock transformers' own noise (a sample alone vs inside the padded batch: 2.5e-5). What the session does
# differently per backend is only the form of the attention masks it hands each layer; that is checked exactly, for
# both backends in float32, by test_layer_masks_match_the_kept_tokens.
NUMERIC_CASES = [
    pytest.param(kind, config, id=f"sdpa-float64-{kind}-{config}") for kind in ("batch", "video") for config in CONFIGS
]


def pruned_run(model, inputs, config, extra_hooks=None):
    name, kw = CONFIGS[config]
    pruner = make_pruner(name, kw["ratio"], **{k: v for k, v in kw.items() if k != "ratio"})
    with torch.no_grad(), PruningSession(model, pruner) as session:
        handles = extra_hooks(model) if extra_hooks else []
        try:
            logits = model(**inputs).logits
        finally:
            for handle in handles:
                handle.remove()
    return pruner, session.record, logits


def check_kept(model, inputs, kept):
    """keep[b, t] over original positions; every real text token is kept, padding is not, and every row lost
    some visual tokens."""
    assert kept is not None
    keep = keep_from_compaction(kept, inputs["input_ids"].shape[1])
    real = inputs["attention_mask"].bool()
    visual = visual_mask(model, inputs["input_ids"]) & real
    assert torch.equal(keep & ~visual, real & ~visual)
    assert ((visual & ~keep).sum(1) > 0).all()
    return keep


def kept_rows(logits, kept):
    return logits.gather(1, kept.index[..., None].expand(-1, -1, logits.shape[-1]))[kept.valid]


@pytest.mark.parametrize("kind, config", NUMERIC_CASES)
def test_pruned_forward_equals_masked_full_forward(tiny_dir, processor, kind, config):
    inputs = to_float64(get_inputs(processor, kind))
    model = float64_model(tiny_dir, "sdpa", "session")
    pruner, record, pruned = pruned_run(model, inputs, config)
    kept = record.kept
    keep = check_kept(model, inputs, kept)
    assert pruned.shape[:2] == kept.index.shape

    reference = float64_model(tiny_dir, "sdpa", "reference")
    masked = masked_logits(reference, inputs, keep, drop_layer(pruner))
    got = pruned[kept.valid]
    torch.testing.assert_close(got, kept_rows(masked, kept), atol=1e-5, rtol=0)
    # the check has teeth: without the key mask the kept rows come out different
    assert (got - kept_rows(stock_logits(reference, inputs), kept)).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_float32_pruned_forward_matches_masked_within_float_noise(tiny_dir, processor, backend, config):
    """The same property in the dtype users run, on an unpadded sample, at float32's noise level (logits ~10)."""
    inputs = get_inputs(processor, "video")
    pruner, record, pruned = pruned_run(session_model(tiny_dir, backend), inputs, config)
    reference = pristine(tiny_dir, backend)
    keep = check_kept(reference, inputs, record.kept)
    masked = masked_logits(reference, inputs, keep, drop_layer(pruner))
    torch.testing.assert_close(pruned[record.kept.valid], kept_rows(masked, record.kept), atol=3e-4, rtol=0)


def allowed_keys(mask, batch: int, length: int) -> torch.Tensor:
    """[B, q, k] bool from a layer's attention mask in its backend's form (None = plain causal for sdpa)."""
    if mask is None:
        return torch.ones(length, length, dtype=torch.bool).tril().expand(batch, -1, -1)
    assert mask.shape == (batch, 1, length, length)
    if mask.dtype == torch.bool:  # sdpa
        return mask[:, 0]
    assert mask.dtype == torch.float32  # eager: additive, 0 or the dtype's minimum
    assert bool(((mask == 0) | (mask == torch.finfo(torch.float32).min)).all())
    return mask[:, 0] == 0


@pytest.mark.parametrize("kind", ["batch", "video"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_layer_masks_match_the_kept_tokens(model, tiny_dir, processor, config, kind):
    """Every decoder layer gets, in its backend's form, exactly the causal mask over the tokens in force at that
    layer: the real tokens of the original sequence before the drop, the kept ones (compacted) from it on."""
    inputs = get_inputs(processor, kind)
    lm = model.model.language_model
    seen = {}

    def install(m):
        def grab(index):
            def hook(module, args, kwargs):
                seen[index] = (args[0].shape[1], kwargs["attention_mask"])

            return hook

        return [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]

    pruner, record, pruned = pruned_run(model, inputs, config, extra_hooks=install)
    kept = record.kept
    check_kept(model, inputs, kept)
    real = inputs["attention_mask"].bool()
    assert sorted(seen) == list(range(12))
    for index, (length, mask) in seen.items():
        valid = kept.valid if index >= drop_layer(pruner) else real
        assert length == valid.shape[1]
        q = torch.arange(length)[:, None]
        k = torch.arange(length)[None, :]
        expected = valid[:, None, :] & (k <= q)[None]  # [B, q, k]
        allowed = allowed_keys(mask, valid.shape[0], length)
        rows = valid[:, :, None].expand_as(expected)  # compare real query rows
        assert torch.equal(allowed[rows], expected[rows]), index
    full = stock_logits(pristine(tiny_dir, backend_of(model)), inputs)
    assert pruned.shape[:2] == kept.index.shape
    assert (pruned[kept.valid] - kept_rows(full, kept)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["batch", "video"])
@pytest.mark.parametrize("K", [2, 3])
def test_fastv_scores_equal_eager_attentions(tiny_dir, processor, kind, K):
    model = pristine(tiny_dir, "eager")
    lm = model.model.language_model
    inputs = get_inputs(processor, kind)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    attentions = out.attentions[K - 1]  # [B, H, T, T], eager softmax of layer K-1
    hidden = out.hidden_states[K - 1]  # input of layer K-1
    batch, length = inputs["input_ids"].shape
    mask = inputs["attention_mask"].bool()
    position_ids = torch.arange(length)[None]
    embeddings = lm.rotary_emb(hidden, position_ids)
    visual = visual_mask(model, inputs["input_ids"]) & mask

    pruner = make_pruner("fastv", 0.5, K=K)
    pruner.setup(model)
    context = LayerContext(
        layer=K,
        hidden_states=None,
        previous_hidden_states=hidden,
        visual=visual,
        attention_mask=mask,
        position_ids=position_ids.expand(batch, -1),
        position_embeddings=embeddings,
        n_visual=visual.sum(1),
        language_model=lm,
    )
    with torch.no_grad():
        scores = pruner.scores(context)
    last = last_real_index(mask)
    assert torch.equal(last[:, 0], torch.full((batch,), length - 1))  # left padding: the last column
    eager_scores = attentions[:, :, -1, :].mean(1)
    torch.testing.assert_close(scores, eager_scores, atol=1e-6, rtol=1e-5)

    # every real query row, not only the last one
    with torch.no_grad():
        rows = attention_rows(lm.layers[K - 1], hidden, embeddings, mask, torch.arange(length)[None].expand(batch, -1))
    real_rows = mask[:, None, :, None].expand_as(rows)
    torch.testing.assert_close(rows[real_rows], attentions[real_rows], atol=1e-6, rtol=1e-5)

    # and a session keeps exactly the top floor(keep_fraction * n_v) visual tokens by that eager score
    working = session_model(tiny_dir, "eager")
    with torch.no_grad(), PruningSession(working, make_pruner("fastv", 0.5, K=K)) as session:
        working(**inputs)
    kept = keep_from_compaction(session.record.kept, length) & visual
    fraction = (exact(0.5) * NUM_LAYERS - K) / (NUM_LAYERS - K)
    for b in range(batch):
        budget = floor_budget(int(visual[b].sum()), fraction)
        ranked = eager_scores[b].masked_fill(~visual[b], float("-inf")).argsort(descending=True, stable=True)
        assert (eager_scores[b, ranked[:budget]] > eager_scores[b, ranked[budget]]).all()  # no tie at the cut
        assert set(ranked[:budget].tolist()) == set(kept[b].nonzero()[:, 0].tolist())


@pytest.mark.parametrize("kind", ["batch", "video", "image"])
@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_covipal_keeps_top_ppm_scores(sdpa_model, tiny_dir, processor, kind, ratio):
    model = sdpa_model
    inputs = get_inputs(processor, kind)
    # the merged LLM input embeddings of an unpruned stock run
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    reference = pristine(tiny_dir, "sdpa")
    handle = reference.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        stock_logits(reference, inputs)
    finally:
        handle.remove()

    # the same untrained PPM the pruner builds (seeded), scored on those embeddings
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ppm = PPMClassifier(PPMConfig(input_size=model.config.text_config.hidden_size, **PPM)).eval()
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        scores = ppm(captured["embeds"], attention_mask=mask)
    visual = visual_mask(model, inputs["input_ids"]) & mask

    pruner = make_pruner("covipal", ratio)
    with torch.no_grad(), PruningSession(model, pruner) as session:
        model(**inputs)
    assert all(torch.equal(a, b) for a, b in zip(ppm.state_dict().values(), pruner.ppm.state_dict().values()))
    kept = keep_from_compaction(session.record.kept, inputs["input_ids"].shape[1]) & visual
    for b in range(visual.shape[0]):
        n_v = int(visual[b].sum())
        budget = floor_budget(n_v, exact(ratio))
        ranked = scores[b].masked_fill(~visual[b], float("-inf")).argsort(descending=True, stable=True)
        top = ranked[:budget]
        assert (scores[b, top] > scores[b, ranked[budget]]).all()  # no tie at the cut: the top set is well defined
        assert set(top.tolist()) == set(kept[b].nonzero()[:, 0].tolist())
