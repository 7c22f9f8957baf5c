"""Analytic FLOPs (multiply-adds × 2) of a prefill: the LLM from the visual tokens each layer takes in, plus the
vision tower and the PPM. Matrix products only (norms, softmax and activations are a rounding error here)."""

from __future__ import annotations

from dataclasses import dataclass


def transformer_layer_flops(
    tokens: int, hidden: int, intermediate: int, heads_dim: int, kv_dim: int, context: float, gated: bool = True
) -> float:
    """One layer over `tokens` queries that each attend to `context` keys on average."""
    projections = hidden * (heads_dim + 2 * kv_dim) + heads_dim * hidden  # q, k, v, o
    mlp = (3 if gated else 2) * hidden * intermediate
    attention = 2 * heads_dim * context  # scores and weighted values
    return 2.0 * tokens * (projections + mlp + attention)


@dataclass
class PrefillFlops:
    llm: float
    vision: float
    ppm: float
    head: float

    @property
    def total(self) -> float:
        return self.llm + self.vision + self.ppm + self.head


def llm_prefill_flops(text_config, layer_tokens: list[int]) -> float:
    """Σ over layers of the layer's cost at the number of tokens it takes in (causal: n/2 keys on average)."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    q_dim = head_dim * text_config.num_attention_heads
    kv_dim = head_dim * text_config.num_key_value_heads
    return sum(
        transformer_layer_flops(n, text_config.hidden_size, text_config.intermediate_size, q_dim, kv_dim, n / 2)
        for n in layer_tokens
    )


def vision_flops(work: tuple[list[tuple], float]) -> float:
    """The tower's FLOPs from the family's description of its work (`tower_work`): layer groups (layers, tokens,
    hidden, intermediate, keys per query, gated MLP) and other multiply-adds."""
    groups, other = work
    total = 2.0 * other
    for layers, tokens, hidden, intermediate, context, gated in groups:
        total += layers * transformer_layer_flops(tokens, hidden, intermediate, hidden, hidden, context, gated)
    return total


def ppm_flops(ppm_config, tokens: int) -> float:
    head_dim = ppm_config.hidden_size // ppm_config.num_heads
    kv_dim = head_dim * ppm_config.num_kv_heads
    layer = transformer_layer_flops(
        tokens, ppm_config.hidden_size, ppm_config.intermediate_size, ppm_config.hidden_size, kv_dim, tokens
    )
    return 2.0 * tokens * ppm_config.input_size * ppm_config.hidden_size + ppm_config.num_layers * layer


def decode_flops_per_token(text_config, context: int, vocab: int) -> float:
    """One new token against a cache of `context` tokens, plus the LM head."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    q_dim = head_dim * text_config.num_attention_heads
    kv_dim = head_dim * text_config.num_key_value_heads
    layer = transformer_layer_flops(1, text_config.hidden_size, text_config.intermediate_size, q_dim, kv_dim, context)
    return text_config.num_hidden_layers * layer + 2.0 * text_config.hidden_size * vocab
