"""Models with the real shapes of LLaVA-OneVision (SigLIP-so400m tower, Qwen2 LLM of 0.5B or 7B size) or Qwen2.5-VL
(its windowed ViT, the 7B LLM) and random weights, built in memory from a config: what the efficiency harness
times when no weights can be downloaded.
Costs depend on shapes only, so these time (and count FLOPs) like the real checkpoints; their answers mean
nothing. The tokenizer is the local word tokenizer, so the vocabulary (and the LM head) is small: decode figures
leave out the real 152k-word head, which the FLOP count adds back (`real_vocab_size`)."""

from __future__ import annotations

import torch
from transformers.initialization import no_init_weights

from covipal.models.adapters import merge_adapter
from covipal.models.architecture import set_generation_tokens
from covipal.models.families import family_named
from covipal.models.loading import LoadedModel, resolve_attention, resolve_device, resolve_dtype


def fill_random(model: torch.nn.Module, seed: int, std: float, block: int = 1 << 22) -> None:
    """Weights in place: matrices and embeddings tiled from one seeded N(0, std) block (drawing 0.8B normals one by
    one takes a minute on CPU; costs depend on shapes only), norms 1, biases 0."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty(block, dtype=torch.float32).normal_(0.0, std, generator=generator)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 or "newline" in name:
                flat = parameter.view(-1)
                for start in range(0, flat.numel(), block):
                    piece = flat[start : start + block]
                    piece.copy_(pool[: piece.numel()])
                pool = pool.roll(7919)  # parameters do not all start alike
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)


def load_shaped(
    spec: dict,
    name: str,
    real_vocab_size: int = 151646,
    attn_implementation: str = "sdpa",
    dtype: str = "auto",
    device: str = "auto",
    ppm: dict | None = None,
    layer_plan: dict | None = None,
    evaluation: dict | None = None,
    adapter: str | None = None,
    family: str = "llava_onevision",
) -> LoadedModel:
    """A randomly initialised model of `family` with `spec`'s shapes (the family's architecture spec fields:
    covipal/models/architecture.py, qwen_architecture.py), in memory, with its processor."""
    builder = family_named(family)
    processor, config, spec = builder.from_spec(spec)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    with no_init_weights():  # transformers' per-module init takes minutes at these sizes on CPU
        model = builder.model_class._from_config(
            config, dtype=torch_dtype, attn_implementation=resolve_attention(attn_implementation, target)
        )
    fill_random(model, spec.seed, spec.initializer_range)
    set_generation_tokens(model, processor.tokenizer)
    if adapter:
        model = merge_adapter(model, adapter)
    model.to(target).eval()
    model.config.real_vocab_size = real_vocab_size
    return LoadedModel(model, processor, name, ppm, layer_plan, evaluation)
