"""Identity: a session that keeps every token changes nothing, and leaving a session restores the model exactly.

References are stock transformers outputs computed on a separate model instance that never sees a session."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs
from pruning_helpers import (
    backend_of,
    covipal_hooks,
    get_inputs,
    hook_counts,
    make_pruner,
    placeholder_ids,
    pristine,
    stock_generate,
    stock_logits,
    visual_mask,
)

from covipal.errors import CovipalError
from covipal.pruning.session import PruningSession

MARK = "_covipal_pruning_session"
KINDS = ["image", "multi_image", "video", "text", "batch"]


@pytest.fixture(scope="module")
def stock(tiny_dir, processor):
    """(logits, generated tokens) of the untouched model, per (backend, kind)."""
    cache = {}

    def get(backend, kind):
        if (backend, kind) not in cache:
            reference = pristine(tiny_dir, backend)
            inputs = get_inputs(processor, kind)
            cache[backend, kind] = (stock_logits(reference, inputs), stock_generate(reference, inputs))
        return cache[backend, kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["none", "covipal", "fastv"])
def test_keep_all_is_identity(model, processor, stock, name, kind):
    inputs = get_inputs(processor, kind)
    ref_logits, ref_tokens = stock(backend_of(model), kind)
    pruner = make_pruner(name, 1.0)
    with torch.no_grad(), PruningSession(model, pruner) as session:
        logits = model(**inputs).logits
        record = session.record
        tokens = stock_generate(model, inputs)
    if name == "fastv":
        assert pruner.keep_fraction == 1.0  # R solved from reserve_ratio=1 keeps everything
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    assert record.kept is None
    n_visual = (visual_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()).sum(1)
    assert torch.equal(record.n_visual, n_visual)
    assert torch.equal(record.layer_visual_tokens, n_visual.expand(12, -1))


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "class": type(model),
        "classes": {name: type(m) for name, m in model.named_modules()},
        "attrs": {name: set(vars(m)) for name, m in model.named_modules()},
        "attn": (
            model.config._attn_implementation,
            model.config.text_config._attn_implementation,
            model.config.vision_config._attn_implementation,
        ),
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": hook_counts(model),
        "global_hooks": (
            len(torch.nn.modules.module._global_forward_pre_hooks),
            len(torch.nn.modules.module._global_forward_hooks),
        ),
    }


def _assert_same(model, before):
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype and torch.equal(after["state"][key], value), key
    for key in ("class", "classes", "attrs", "attn", "training", "hooks", "global_hooks"):
        assert after[key] == before[key], key
    assert MARK not in vars(model)
    assert covipal_hooks(model) == []
    lm = model.model.language_model
    for module in (model, model.model, lm, *lm.layers):
        assert not module._forward_pre_hooks and not module._forward_hooks


@pytest.mark.parametrize("name, ratio", [("none", 1.0), ("covipal", 0.25), ("fastv", 0.5)])
def test_exit_restores_model(model, processor, name, ratio):
    inputs = get_inputs(processor, "batch")
    before_logits = stock_logits(model, inputs)
    before_tokens = stock_generate(model, inputs)
    assert covipal_hooks(model) == []
    before = _snapshot(model)
    with torch.no_grad(), PruningSession(model, make_pruner(name, ratio)) as session:
        assert getattr(model, MARK) is session
        assert covipal_hooks(model)  # the session did install something
        pruned = model(**inputs).logits
        stock_generate(model, inputs)
    if name != "none":
        assert session.record.kept is not None
        assert pruned.shape[1] < before_logits.shape[1] or not torch.equal(pruned, before_logits)
    _assert_same(model, before)
    assert torch.equal(stock_logits(model, inputs), before_logits)
    assert torch.equal(stock_generate(model, inputs), before_tokens)


def test_second_session_is_refused(sdpa_model, processor):
    model = sdpa_model
    inputs = get_inputs(processor, "image")
    length = inputs["input_ids"].shape[1]
    before_logits = stock_logits(model, inputs)  # first forward: transformers adds its lazy attributes / hooks
    before = _snapshot(model)
    with torch.no_grad(), PruningSession(model, make_pruner("covipal", 0.25)) as first:
        installed = hook_counts(model)
        with pytest.raises(CovipalError):
            with PruningSession(model, make_pruner("fastv", 0.5)):
                pass  # pragma: no cover
        with pytest.raises(CovipalError):
            PruningSession(model, make_pruner("none")).__enter__()
        # the first session is untouched and still prunes
        assert getattr(model, MARK) is first
        assert hook_counts(model) == installed
        logits = model(**inputs).logits
        assert first.record.kept is not None and logits.shape[1] < length
    _assert_same(model, before)
    assert torch.equal(stock_logits(model, inputs), before_logits)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["block", "forward"])
def test_exception_still_removes_hooks(sdpa_model, processor, where):
    model = sdpa_model
    inputs = get_inputs(processor, "batch")
    before_logits = stock_logits(model, inputs)
    before = _snapshot(model)
    with pytest.raises(Boom if where == "block" else CovipalError):
        with torch.no_grad(), PruningSession(model, make_pruner("fastv", 0.5)):
            model(**inputs)
            if where == "block":
                raise Boom("inside the with block")
            # a prepared 4D mask is refused by the language-model hook, in the middle of a forward
            batch, length = inputs["attention_mask"].shape
            four_d = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
            model(**{**inputs, "attention_mask": four_d})
    _assert_same(model, before)
    assert torch.equal(stock_logits(model, inputs), before_logits)
    # and a new session can be entered afterwards
    with PruningSession(model, make_pruner("none")):
        pass
    _assert_same(model, before)


# Inputs for which the untrained tiny model's stock greedy decoding emits a placeholder id (<image> = 3 here) as an
# ordinary generated token; stock generate simply embeds it as text.
PLACEHOLDER_CASES = [pytest.param("image", 0, id="image-seed0"), pytest.param("video", 1, id="video-seed1")]


@pytest.mark.parametrize("kind, seed", PLACEHOLDER_CASES)
def test_generated_placeholder_id_is_identity(sdpa_model, tiny_dir, processor, kind, seed):
    inputs = make_inputs(processor, kind, seed=seed)
    expected = stock_generate(pristine(tiny_dir, "sdpa"), inputs)
    assert bool(torch.isin(expected, torch.tensor(placeholder_ids(sdpa_model))).any())  # the case is what it claims
    with torch.no_grad(), PruningSession(sdpa_model, make_pruner("none")):
        tokens = stock_generate(sdpa_model, inputs)
    assert torch.equal(tokens, expected)
