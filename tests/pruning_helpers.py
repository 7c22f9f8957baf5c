"""Shared helpers for the pruning tests: pruner factories, inputs, and references built WITHOUT a session.

Every reference here runs stock transformers code on a "pristine" model instance (loaded once per backend and
never given a PruningSession), optionally with plain forward-pre-hooks on decoder layers that mask the pruned
visual KEYS. The sessions under test run on other instances: the conftest `model`/`sdpa_model`, `session_model`,
or the float64 "session" instances.
"""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction

import torch
from conftest import load_tiny, make_image_batch, make_inputs, prompt, random_image
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.masking_utils import create_causal_mask

from covipal.models.ppm import PPMClassifier, PPMConfig
from covipal.pruning.covipal import CoViPALPruner
from covipal.pruning.fastv import FastVPruner
from covipal.pruning.none import NoPruner
from covipal.pruning.vision_tokens import VisionTokens

PPM = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
NUM_LAYERS = 12
MAX_NEW = 6


# -- pruners ----------------------------------------------------------------------------------------------------
def make_pruner(name: str, ratio: float = 1.0, **kw):
    if name == "none":
        return NoPruner()
    if name == "covipal":
        return CoViPALPruner(ratio, classifier="random", ppm=PPM, seed=kw.pop("seed", 0))
    if name == "fastv":
        return FastVPruner(ratio, K=kw.pop("K", 2), R=kw.pop("R", None))
    raise ValueError(name)


def drop_layer(pruner) -> int:
    """The first decoder layer whose keys exclude the pruned tokens (0 for CoViPAL, K for FastV)."""
    return 0 if isinstance(pruner, CoViPALPruner) else pruner.K


# -- inputs -----------------------------------------------------------------------------------------------------
def get_inputs(processor, kind: str):
    """make_inputs kinds plus "batch" (the padded batch of 2 from make_image_batch)."""
    if kind == "batch":
        return make_image_batch(processor)
    return make_inputs(processor, kind)


def batch_samples(processor, seed: int = 0):
    """The two samples of make_image_batch(processor, seed), each processed alone (no padding)."""
    texts = [
        prompt(processor, "are they the same?", images=2),
        prompt(processor, "what colour is the big square at the top right of the image?", images=1),
    ]
    images = [[random_image(seed, 40, 40), random_image(seed + 1, 64, 32)], [random_image(seed + 2, 64, 96)]]
    return [processor(text=[t], images=[i], return_tensors="pt") for t, i in zip(texts, images)]


def visual_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == model.config.image_token_id) | (input_ids == model.config.video_token_id)


def generate_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as stock `generate` builds them (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# -- models -----------------------------------------------------------------------------------------------------
_PRISTINE: dict = {}


def pristine(tiny_dir, backend: str):
    """A model instance that no session ever touches; stock references are computed on it."""
    key = (str(tiny_dir), backend, "pristine")
    if key not in _PRISTINE:
        _PRISTINE[key] = load_tiny(tiny_dir, backend)
    return _PRISTINE[key]


def session_model(tiny_dir, backend: str):
    """Another float32 instance, for sessions in tests that have no `model` fixture of the backend they need."""
    key = (str(tiny_dir), backend, "session")
    if key not in _PRISTINE:
        _PRISTINE[key] = load_tiny(tiny_dir, backend)
    return _PRISTINE[key]


_FLOAT64: dict = {}


def float64_model(tiny_dir, backend: str, role: str):
    """A float64 instance per (backend, role); role "session" runs pruned, role "reference" never sees a session.

    The tiny test model (initializer_range=0.3, logits ~10) has a float32 noise floor above 1e-5: stock
    transformers alone gives a sample's logits 2.5e-5 apart alone vs inside the padded batch (sdpa). Comparisons
    at atol=1e-5 therefore run in float64."""
    key = (str(tiny_dir), backend, role)
    if key not in _FLOAT64:
        _FLOAT64[key] = LlavaOnevisionForConditionalGeneration.from_pretrained(
            tiny_dir, attn_implementation=backend, dtype=torch.float64
        ).eval()
    return _FLOAT64[key]


def to_float64(inputs) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def backend_of(model) -> str:
    return model.config._attn_implementation


def hook_counts(model) -> dict:
    """Every forward / pre hook registered on any submodule: {(module name, dict name): ((id, hook), ...)}.

    transformers itself installs persistent output-capturing forward hooks on the vision tower's layers on the
    first forward, so tests compare against a snapshot instead of expecting no hooks at all."""
    hooks = {}
    for name, module in model.named_modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            registered = getattr(module, attr)
            if registered:
                hooks[name, attr] = tuple(registered.items())
    return hooks


def covipal_hooks(model) -> list:
    """Hooks whose function comes from covipal, or that sit on the modules a session hooks."""
    found = []
    lm = model.model.language_model
    hooked = {id(model.model), id(lm), *(id(layer) for layer in lm.layers)}
    for name, module in model.named_modules():
        for attr in (
            "_forward_pre_hooks",
            "_forward_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_with_kwargs",
        ):
            for hook in getattr(module, attr, {}).values():
                if id(module) in hooked or "covipal" in getattr(hook, "__module__", "") + repr(hook):
                    found.append((name, attr, hook))
    return found


# -- the masked reference -----------------------------------------------------------------------------------------
def keep_from_compaction(kept, length: int) -> torch.Tensor:
    """keep[b, t] in original coordinates: True for every position the compaction keeps (valid slots)."""
    hits = torch.zeros(kept.index.shape[0], length, dtype=torch.long)
    hits.scatter_add_(1, kept.index, kept.valid.long())  # scatter_add: padding slots (index 0, valid False) add 0
    assert int(hits.max()) <= 1, "a kept position appears twice in the compaction"
    return hits > 0


@contextlib.contextmanager
def masked_keys(lm, keep: torch.Tensor, mask2d: torch.Tensor, from_layer: int):
    """Pre-hooks on decoder layers >= from_layer that hide the keys where keep is False (queries still see
    themselves). Yields a list that counts the hook calls, so a test can check the hooks ran."""
    keep = keep.bool()
    mask2d = mask2d.bool()
    calls = []

    def and_mask(b, h, q, kv):
        return keep[b, kv] | (q == kv)

    def hook(module, args, kwargs):
        calls.append(1)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = create_causal_mask(
            config=lm.config,
            inputs_embeds=args[0],
            attention_mask=mask2d,
            past_key_values=None,
            and_mask_function=and_mask,
        )
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in lm.layers[from_layer:]]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def masked_logits(model, inputs, keep, from_layer: int, **extra) -> torch.Tensor:
    """Full forward (no session) with the keys outside `keep` hidden in layers >= from_layer."""
    lm = model.model.language_model
    mask2d = inputs["attention_mask"]
    with torch.no_grad(), masked_keys(lm, keep, mask2d, from_layer) as calls:
        logits = model(**inputs, **extra).logits
    assert len(calls) == NUM_LAYERS - from_layer
    return logits


def stock_logits(model, inputs, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **extra).logits


def stock_generate(model, inputs, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, **kw)
    return out[:, inputs["input_ids"].shape[1] :]


def placeholder_ids(model) -> list[int]:
    return [model.config.image_token_id, model.config.video_token_id]


def reference_decode(
    model, inputs, keep, from_layer: int, steps: int = MAX_NEW, positions: str = "generate", suppress=()
):
    """Greedy tokens [B, steps] with no session and no cache: the whole sequence is re-run at every step, with the
    keys outside `keep` (extended by the generated tokens, all kept) hidden in layers >= from_layer.

    positions: "generate" = cumsum of the attention mask - 1 (what stock generate gives), "arange" = 0..T-1 (what a
    model called without position_ids uses). `suppress`: token ids never picked (like generate's suppress_tokens).
    Returns (tokens, first-step logits)."""
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    batch = ids.shape[0]
    lm = model.model.language_model
    tokens, first = [], None
    for step in range(steps):
        if positions == "generate":
            position_ids = generate_position_ids(mask)
        else:
            position_ids = torch.arange(ids.shape[1])[None].expand(batch, -1)
        context = contextlib.nullcontext([0] * (NUM_LAYERS - from_layer))
        if keep is not None:
            full_keep = torch.cat([keep, torch.ones(batch, step, dtype=torch.bool)], dim=1)
            context = masked_keys(lm, full_keep, mask, from_layer)
        with torch.no_grad(), context as calls:
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **extra
            ).logits
        assert len(calls) == NUM_LAYERS - from_layer
        if first is None:
            first = logits
        nxt = suppressed(logits[:, -1], suppress).argmax(-1)
        tokens.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, dim=1), first


def suppressed(logits: torch.Tensor, suppress) -> torch.Tensor:
    if not suppress:
        return logits
    logits = logits.clone()
    logits[..., list(suppress)] = float("-inf")
    return logits


def finish_at_eos(tokens: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """What generate returns for free-running greedy tokens: everything after a row's first EOS becomes pad."""
    done = torch.zeros(tokens.shape[0], dtype=torch.bool)
    out = tokens.clone()
    for step in range(tokens.shape[1]):
        out[done, step] = pad
        done |= tokens[:, step] == eos
    return out


# -- budgets ----------------------------------------------------------------------------------------------------
def floor_budget(n_visual: int, fraction: Fraction) -> int:
    if n_visual == 0:
        return 0
    return max(1, math.floor(fraction * n_visual))


def exact(x: float) -> Fraction:
    """The decimal a user typed (0.29 means 29/100, not the binary float)."""
    return Fraction(str(x))


# -- shared by the training and vision-side tests of both families ---------------------------------------------------
def small_ppm(model) -> PPMClassifier:
    """A seeded one-layer PPM at `model`'s LLM width."""
    torch.manual_seed(0)
    config = PPMConfig(model.config.text_config.hidden_size, 16, 32, num_layers=1, num_heads=2, num_kv_heads=1)
    return PPMClassifier(config)


class KeepMask:
    """A test pruner keeping exactly the visual tokens in `keep` (before layer 0)."""

    reserve_ratio = 1.0
    drop_layers = (0,)

    def __init__(self, keep: torch.Tensor):
        self.keep = keep

    def setup(self, model) -> None:
        return None

    def select(self, context):
        return self.keep


def tower_facts(model, inputs):
    """The vision-side facts (with keys) of one forward of `model` on `inputs`, hooks removed afterwards."""
    tokens = VisionTokens(with_attention=True, with_keys=True)
    handles = tokens.attach(model)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return tokens.facts()
