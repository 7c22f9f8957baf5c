"""Generation: pruned, cached decoding equals a cache-free stock reference that re-runs the whole sequence at every
step with the pruned visual keys masked (no session involved in the reference).

The untrained tiny model sometimes greedily emits the <image>/<video> placeholder ids. A re-run of the whole
sequence cannot feed those back (transformers counts placeholders against the pixel values), so every decoder here
suppresses them (generate's `suppress_tokens`, and the same -inf in the hand-written loops). The session's handling
of a generated placeholder id is tested separately in test_pruning_identity.py."""

from __future__ import annotations

import pytest
import torch
from pruning_helpers import (
    MAX_NEW,
    drop_layer,
    finish_at_eos,
    float64_model,
    generate_position_ids,
    get_inputs,
    keep_from_compaction,
    make_pruner,
    masked_logits,
    placeholder_ids,
    pristine,
    reference_decode,
    stock_generate,
    stock_logits,
    suppressed,
    to_float64,
)
from transformers import DynamicCache

from covipal.errors import CovipalError
from covipal.pruning.session import PruningSession

PRUNERS = {"covipal": ("covipal", 0.25), "fastv": ("fastv", 0.5)}
KINDS = ["image", "video", "batch"]


def pruned_generate(model, inputs, key):
    name, ratio = PRUNERS[key]
    pruner = make_pruner(name, ratio)
    with torch.no_grad(), PruningSession(model, pruner) as session:
        tokens = stock_generate(model, inputs, suppress_tokens=placeholder_ids(model))
    return pruner, session.record, tokens


def end_tokens(model):
    return model.generation_config.eos_token_id, model.generation_config.pad_token_id


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", list(PRUNERS))
def test_generate_equals_masked_reference(sdpa_model, tiny_dir, processor, key, kind):
    inputs = get_inputs(processor, kind)
    pruner, record, tokens = pruned_generate(sdpa_model, inputs, key)
    assert record.kept is not None
    assert tokens.shape == (inputs["input_ids"].shape[0], MAX_NEW)
    keep = keep_from_compaction(record.kept, inputs["input_ids"].shape[1])

    reference = pristine(tiny_dir, "sdpa")
    expected, first = reference_decode(
        reference, inputs, keep, drop_layer(pruner), positions="generate", suppress=placeholder_ids(reference)
    )
    assert torch.equal(tokens, finish_at_eos(expected, *end_tokens(sdpa_model)))
    # the reference has teeth: masking the pruned keys moves the next-token logits
    stock = stock_logits(reference, inputs, position_ids=generate_position_ids(inputs["attention_mask"]))
    assert (first[:, -1] - stock[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kind, pass_mask",
    [("image", True), ("video", True), ("batch", True), ("image", False), ("video", False)],
)
@pytest.mark.parametrize("key", list(PRUNERS))
def test_manual_decode_loop(sdpa_model, tiny_dir, processor, key, kind, pass_mask):
    """Prefill with the whole prompt into an explicit DynamicCache, then one token per call with no position_ids
    (and the attention mask extended by ones, or no mask at all)."""
    model = sdpa_model
    inputs = get_inputs(processor, kind)
    name, ratio = PRUNERS[key]
    pruner = make_pruner(name, ratio)
    with torch.no_grad(), PruningSession(model, pruner) as session:
        cache = DynamicCache(config=model.config)
        logits = model(**inputs, past_key_values=cache, use_cache=True).logits
        record = session.record
        mask = inputs["attention_mask"]
        suppress = placeholder_ids(model)
        steps = [suppressed(logits[:, -1], suppress).argmax(-1)]
        for _ in range(MAX_NEW - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            call = dict(input_ids=steps[-1][:, None], past_key_values=cache, use_cache=True)
            if pass_mask:
                call["attention_mask"] = mask
            steps.append(suppressed(model(**call).logits[:, -1], suppress).argmax(-1))
    tokens = torch.stack(steps, dim=1)
    assert session.record is record  # decoding steps leave the prefill record alone
    keep = keep_from_compaction(record.kept, inputs["input_ids"].shape[1])
    # no position_ids: positions count from 0 over the padded prompt, as in a stock model called the same way
    expected, _ = reference_decode(
        pristine(tiny_dir, "sdpa"), inputs, keep, drop_layer(pruner), positions="arange", suppress=suppress
    )
    assert torch.equal(tokens, expected)
    if kind != "batch":  # without padding this is exactly what generate does
        _, _, generated = pruned_generate(model, inputs, key)
        assert torch.equal(generated, finish_at_eos(tokens, *end_tokens(model)))


@pytest.mark.parametrize("pass_mask", [True, False])
@pytest.mark.parametrize("key", list(PRUNERS))
def test_multi_token_continuation(tiny_dir, processor, key, pass_mask):
    """Several new tokens in one cached call (teacher forcing) score like the masked full sequence (float64)."""
    model = float64_model(tiny_dir, "sdpa", "session")
    inputs = to_float64(get_inputs(processor, "image"))
    name, ratio = PRUNERS[key]
    pruner = make_pruner(name, ratio)
    new = torch.tensor([[17, 42, 99]])
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)
    with torch.no_grad(), PruningSession(model, pruner) as session:
        cache = DynamicCache(config=model.config)
        model(**inputs, past_key_values=cache, use_cache=True)
        call = dict(input_ids=new, past_key_values=cache, use_cache=True)
        if pass_mask:
            call["attention_mask"] = mask
        logits = model(**call).logits
    keep = keep_from_compaction(session.record.kept, inputs["input_ids"].shape[1])
    keep = torch.cat([keep, torch.ones_like(new, dtype=torch.bool)], dim=1)
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], new], dim=1), "attention_mask": mask}
    reference = float64_model(tiny_dir, "sdpa", "reference")
    expected = masked_logits(reference, full, keep, drop_layer(pruner))[:, -new.shape[1] :]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert (logits - stock_logits(reference, full)[:, -new.shape[1] :]).abs().max() > 1e-3


def test_new_images_while_decoding_are_refused(sdpa_model, processor):
    """A call that continues a KV cache may not bring new pixel values: the cache holds pruned tokens only."""
    model = sdpa_model
    inputs = get_inputs(processor, "image")
    with torch.no_grad(), PruningSession(model, make_pruner("covipal", 0.25)):
        cache = DynamicCache(config=model.config)
        model(**inputs, past_key_values=cache, use_cache=True)
        more = get_inputs(processor, "multi_image")
        mask = torch.cat([inputs["attention_mask"], more["attention_mask"]], dim=1)
        with pytest.raises(CovipalError):
            model(**{**more, "attention_mask": mask}, past_key_values=cache, use_cache=True)
