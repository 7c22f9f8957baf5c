"""The design's properties on the second family, a tiny untrained Qwen2.5-VL (M-RoPE positions, native-resolution
images, videos in frame pairs), for the pruners that decide in the LLM or before it: r = 1 equals untouched
transformers; pruned equals masked (the masked reference runs the full sequence with the model's own 3D
positions); budgets exact per layer; a padded batch equals each sample alone; generate with the KV cache keeps
what a forward keeps and decodes as the masked reference; hooks are gone on exit."""

from __future__ import annotations

import contextlib
from fractions import Fraction

import pytest
import torch
from pruning_helpers import PPM, exact, floor_budget, hook_counts, keep_from_compaction
from qwen_helpers import (
    QWEN_LAYERS,
    current_family,
    qwen_batch_samples,
    qwen_family,  # noqa: F401 (the autouse fixture: every test runs for each Qwen family)
    qwen_inputs,
    qwen_model,
    qwen_positions,
)

from covipal.models.families import family_of, visual_mask
from covipal.pruning.covipal import CoViPALPruner
from covipal.pruning.fastv import FastVPruner
from covipal.pruning.none import NoPruner
from covipal.pruning.pdrop import PyramidDropPruner
from covipal.pruning.random import RandomPruner
from covipal.pruning.session import PruningSession
from covipal.pruning.sparsevlm import SparseVLMPruner

MAX_NEW = 5


def make(name: str, ratio: float):
    if name == "none":
        return NoPruner()
    if name == "covipal":
        return CoViPALPruner(ratio, classifier="random", ppm=PPM, seed=0)
    if name == "random":
        return RandomPruner(ratio, seed=0)
    if name == "fastv":
        return FastVPruner(ratio, K=2)
    if name == "pdrop":
        return PyramidDropPruner(ratio, layers=[1, 2, 3])
    if name == "sparsevlm":
        return SparseVLMPruner(ratio, layers=[1, 2], shape=[0.52, 0.35], recycle=False)
    raise ValueError(name)


PRUNED = [("covipal", 0.5), ("covipal", 0.25), ("random", 0.25), ("fastv", 0.5), ("pdrop", 0.5), ("sparsevlm", 0.7)]
KINDS = ["image", "video", "batch"]


def test_family_is_qwen():
    model = qwen_model()
    assert family_of(model).name == current_family()


def run(model, pruner, inputs):
    with torch.no_grad(), PruningSession(model, pruner) as session:
        logits = model(**inputs).logits
    return session.record, logits


@pytest.mark.parametrize("kind", KINDS + ["text"])
@pytest.mark.parametrize("name", ["none", "covipal", "random", "fastv"])
def test_keep_all_equals_untouched_transformers(name, kind):
    inputs = qwen_inputs(kind)
    reference = qwen_model("reference")
    with torch.no_grad():
        stock = reference(**inputs).logits
        stock_tokens = reference.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    model = qwen_model()
    _, logits = run(model, make(name, 1.0), inputs)
    assert torch.equal(logits, stock)
    with torch.no_grad(), PruningSession(model, make(name, 1.0)):
        tokens = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert torch.equal(tokens, stock_tokens)


def layer_keeps(record, length: int) -> list[torch.Tensor]:
    """keep[b, t] over the original positions for every decoder layer."""
    keeps = []
    for layer in range(QWEN_LAYERS):
        compaction = record.stage_at(layer).compaction
        if compaction is None:
            keeps.append(torch.ones(record.n_visual.shape[0], length, dtype=torch.bool))
        else:
            keeps.append(keep_from_compaction(compaction, length))
    return keeps


@contextlib.contextmanager
def masked_layers(model, keeps, mask2d):
    """Each decoder layer sees only the keys its stage keeps (queries see themselves), via its own mask."""
    from transformers.masking_utils import create_causal_mask

    lm = model.model.language_model
    handles, calls = [], []

    def hook_for(keep):
        def and_mask(b, h, q, kv):
            return keep[b, kv] | (q == kv)

        def hook(module, args, kwargs):
            calls.append(1)
            mask = create_causal_mask(
                config=lm.config,
                inputs_embeds=args[0],
                attention_mask=mask2d.bool(),
                past_key_values=None,
                and_mask_function=and_mask,
            )
            return args, {**kwargs, "attention_mask": mask}

        return hook

    for layer, keep in zip(lm.layers, keeps):
        handles.append(layer.register_forward_pre_hook(hook_for(keep), with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def kept_rows(logits, kept):
    return logits.gather(1, kept.index[..., None].expand(-1, -1, logits.shape[-1]))[kept.valid]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name, ratio", PRUNED)
def test_pruned_forward_equals_masked_full_forward(name, ratio, kind):
    inputs = qwen_inputs(kind, dtype=torch.float64)
    model = qwen_model("session", torch.float64)
    record, pruned = run(model, make(name, ratio), inputs)
    kept = record.kept
    assert kept is not None
    length = inputs["input_ids"].shape[1]
    keeps = layer_keeps(record, length)
    real = inputs["attention_mask"].bool()
    visual = visual_mask(model.config, inputs["input_ids"]) & real
    assert torch.equal(keeps[-1] & ~visual, real & ~visual)  # text is never dropped, padding always
    assert ((visual & ~keeps[-1]).sum(1) > 0).all()
    reference = qwen_model("reference", torch.float64)
    positions = qwen_positions(reference, inputs)  # the original 3D positions, given explicitly
    with torch.no_grad(), masked_layers(reference, keeps, inputs["attention_mask"]) as calls:
        masked = reference(**inputs, position_ids=positions).logits
    assert len(calls) == QWEN_LAYERS
    got = pruned[kept.valid]
    torch.testing.assert_close(got, kept_rows(masked, kept), atol=1e-5, rtol=0)
    with torch.no_grad():
        stock = reference(**inputs).logits
    assert (got - kept_rows(stock, kept)).abs().max() > 1e-3  # the check has teeth


@pytest.mark.parametrize("kind", ["image", "batch"])
def test_deepstack_inputs_go_with_their_tokens(kind, monkeypatch):
    """Qwen3-VL adds DeepStack's visual inputs after the first LLM layers. Pruned == masked holds with each kept
    token given its own inputs (the session's post-hooks) and a pruned token's dropped; given none, or each
    token its neighbour's, the pruned forward is far from the masked reference — so that check sees them."""
    if current_family() != "qwen3_vl":
        pytest.skip("DeepStack is Qwen3-VL's")
    inputs = qwen_inputs(kind, dtype=torch.float64)
    model = qwen_model("session", torch.float64)
    assert family_of(model).injected_layers(model) == 2
    record, pruned = run(model, RandomPruner(0.5, seed=1), inputs)
    keeps = layer_keeps(record, inputs["input_ids"].shape[1])
    reference = qwen_model("reference", torch.float64)
    with torch.no_grad(), masked_layers(reference, keeps, inputs["attention_mask"]):
        masked = kept_rows(reference(**inputs, position_ids=qwen_positions(reference, inputs)).logits, record.kept)
    torch.testing.assert_close(pruned[record.kept.valid], masked, atol=1e-5, rtol=0)
    injection = PruningSession._injection
    for wrong in (
        lambda mask, inputs: (mask, [x * 0 for x in inputs]),
        lambda mask, inputs: (mask, [x.roll(1, 0) for x in inputs]),
    ):
        monkeypatch.setattr(
            PruningSession, "_injection", staticmethod(lambda mask, inputs, w=wrong: injection(*w(mask, inputs)))
        )
        _, misplaced = run(model, RandomPruner(0.5, seed=1), inputs)
        assert (misplaced[record.kept.valid] - masked).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratio", [0.5, 0.29, 0.25])
@pytest.mark.parametrize("name", ["covipal", "random"])
def test_budget_is_exact_at_every_layer(name, ratio, kind):
    inputs = qwen_inputs(kind)
    record, _ = run(qwen_model(), make(name, ratio), inputs)
    counts = record.layer_visual_tokens  # [layers, B]
    n_visual = visual_mask(qwen_model().config, inputs["input_ids"]).sum(1)
    for b, n in enumerate(n_visual.tolist()):
        assert int(record.n_visual[b]) == n
        want = floor_budget(n, exact(ratio))
        assert counts[:, b].tolist() == [want] * QWEN_LAYERS
        assert Fraction(want, n) <= exact(ratio)


@pytest.mark.parametrize("name, ratio", [case for case in PRUNED if case[0] != "random"])  # draws follow the shape
def test_padded_batch_equals_each_sample_alone(name, ratio):
    batch = qwen_inputs("batch", dtype=torch.float64)
    model = qwen_model("session", torch.float64)
    record, logits = run(model, make(name, ratio), batch)
    for b, single in enumerate(qwen_batch_samples(torch.float64)):
        alone_record, alone = run(model, make(name, ratio), single)
        assert record.layer_visual_tokens[:, b].tolist() == alone_record.layer_visual_tokens[:, 0].tolist()
        torch.testing.assert_close(logits[b, -1], alone[0, -1], atol=1e-6, rtol=0)


def placeholders(model) -> list[int]:
    return [model.config.image_token_id, model.config.video_token_id]


def reference_decode(model, inputs, keeps, steps: int):
    """Greedy tokens with no session and no cache: the whole sequence re-run every step, each layer's keys
    restricted to what its stage keeps (generated tokens all kept), positions the model's own; the end-of-message
    token is never chosen, as `generate(min_new_tokens=steps)` never chooses it, nor are the placeholders (a stock
    re-run would count a generated one as visual; `generate` is given `suppress_tokens=placeholders(model)`)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    types = inputs["mm_token_type_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    batch = ids.shape[0]
    tokens = []
    for step in range(steps):
        grown = [torch.cat([keep, torch.ones(batch, step, dtype=torch.bool)], dim=1) for keep in keeps]
        with torch.no_grad(), masked_layers(model, grown, mask):
            logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False, **extra).logits
        last = logits[:, -1].clone()
        last[:, [model.generation_config.eos_token_id, *placeholders(model)]] = float("-inf")
        nxt = last.argmax(-1)
        tokens.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        types = torch.cat([types, torch.zeros_like(types[:, :1])], dim=1)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("kind", ["image", "video", "batch"])
@pytest.mark.parametrize("name, ratio", [("covipal", 0.25), ("fastv", 0.5), ("pdrop", 0.5)])
def test_generate_equals_masked_reference(name, ratio, kind):
    inputs = qwen_inputs(kind, dtype=torch.float64)
    model = qwen_model("session", torch.float64)
    with torch.no_grad(), PruningSession(model, make(name, ratio)) as session:
        out = model.generate(
            **inputs,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            min_new_tokens=MAX_NEW,
            suppress_tokens=placeholders(model),
        )
    generated = out[:, inputs["input_ids"].shape[1] :]
    keeps = layer_keeps(session.record, inputs["input_ids"].shape[1])
    want = reference_decode(qwen_model("reference", torch.float64), inputs, keeps, MAX_NEW)
    assert torch.equal(generated, want)
    # and the positions mattered: decoding from the pruned length (no rope delta) gives other tokens
    assert session.record.kept is not None


@pytest.mark.parametrize("kind, pass_mask", [("image", True), ("image", False), ("batch", True)])
def test_manual_decode_loop_continues_the_original_positions(kind, pass_mask):
    """model(...) step by step with the cache, with or without an attention mask (a padded batch needs one): the
    same tokens as generate."""
    inputs = qwen_inputs(kind, dtype=torch.float64)
    model = qwen_model("session", torch.float64)
    with torch.no_grad(), PruningSession(model, make("covipal", 0.25)):
        want = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, min_new_tokens=MAX_NEW)
        out = model(**inputs, use_cache=True)
        cache, mask = out.past_key_values, inputs["attention_mask"]
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        for _ in range(MAX_NEW - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step = model(input_ids=token, attention_mask=mask if pass_mask else None, past_key_values=cache)
            token = step.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
    assert torch.equal(torch.cat(tokens, dim=1), want[:, inputs["input_ids"].shape[1] :])


@pytest.mark.parametrize("name, ratio", PRUNED)
def test_exit_restores_the_model(name, ratio):
    model = qwen_model()
    before = hook_counts(model)
    with torch.no_grad(), PruningSession(model, make(name, ratio)):
        model(**qwen_inputs("image"))
    assert hook_counts(model) == before
    assert not hasattr(model, "_covipal_pruning_session")


def test_ground_truth_of_another_layout_is_refused_in_one_line():
    """The tiny world's relevance masks count LLaVA-OneVision's tokens; measured against a Qwen prefill they are
    refused, not silently misread."""
    from covipal.errors import CovipalError

    record, _ = run(qwen_model(), make("random", 0.5), qwen_inputs("image"))
    assert record.relevant_kept(0, [True] * 24) == [0.5] * 4  # the right length: measured (random keeps half)
    with pytest.raises(CovipalError, match="relevance has 336 entries but sample 0 has 24 visual tokens") as error:
        record.relevant_kept(0, [True] * 336)
    assert "\n" not in str(error.value)
