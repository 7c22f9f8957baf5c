"""Attention rows recomputed from a decoder layer's input, so scoring never needs the kernel's attention weights.

Only the requested query rows are materialised ([B, heads, rows, T]), which keeps pruners and stage-1 labels
working with sdpa and FlashAttention. Matches eager attention (fp32 softmax) of that layer."""

from __future__ import annotations

import sys

import torch
from torch import nn


def attention_rows(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor,
    query_index: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention probabilities of `layer` for the query positions `query_index` [B, Q].

    hidden_states: the layer's input [B, T, D]; position_embeddings: (cos, sin) [B or 1, T, head_dim];
    key_mask: [B, T] bool, False for padding. Causality follows sequence order. Returns float32 [B, H, Q, T].
    """
    attn = layer.self_attn
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    batch, length, _ = hidden_states.shape
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden_states)
    rows = normed.gather(1, query_index[..., None].expand(-1, -1, normed.shape[-1]))
    query = attn.q_proj(rows).view(batch, rows.shape[1], -1, head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    row_cos = cos.gather(1, query_index[..., None].expand(-1, -1, head_dim))
    row_sin = sin.gather(1, query_index[..., None].expand(-1, -1, head_dim))
    query, _ = rope(query, query, row_cos, row_sin)
    _, key = rope(key, key, cos, sin)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scaling
    positions = torch.arange(length, device=key_mask.device)
    allowed = key_mask[:, None, None, :] & (positions[None, None, None, :] <= query_index[:, None, :, None])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def last_real_index(key_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, [B, 1] (works for left and right padding)."""
    positions = torch.arange(key_mask.shape[1], device=key_mask.device).expand_as(key_mask)
    return torch.where(key_mask, positions, torch.full_like(positions, -1)).amax(1, keepdim=True).clamp(min=0)
