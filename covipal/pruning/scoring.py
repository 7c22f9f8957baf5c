"""Attention rows recomputed from a decoder layer's input, so scoring never needs the kernel's attention weights.

Only the requested query rows are materialised ([B, heads, rows, T]), which keeps pruners and stage-1 labels
working with sdpa and FlashAttention. Matches eager attention (fp32 softmax) of that layer."""

from __future__ import annotations

import sys

import torch
from torch import nn


def heads(attn: nn.Module, which: str, normed: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, head_dim]: the layer's queries (`which` = "q") or keys ("k") of its normed input, before the
    rotation; with the per-head RMSNorm the layer applies there where it has one (Qwen3's LLM: q_norm, k_norm)."""
    batch, length = normed.shape[:2]
    states = getattr(attn, f"{which}_proj")(normed).view(batch, length, -1, attn.head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    return (states if norm is None else norm(states)).transpose(1, 2)


class _LayerAttention:
    """Keys of one decoder layer for a whole sequence; query rows on demand."""

    def __init__(self, layer: nn.Module, hidden_states: torch.Tensor, position_embeddings, key_mask: torch.Tensor):
        self.attn = layer.self_attn
        if getattr(self.attn, "sliding_window", None):
            raise NotImplementedError("attention scores of sliding-window layers are not supported")
        self.rope = sys.modules[type(self.attn).__module__].apply_rotary_pos_emb
        self.batch, self.length, _ = hidden_states.shape
        self.head_dim = self.attn.head_dim
        self.normed = layer.input_layernorm(hidden_states)
        self.cos, self.sin = (t.expand(self.batch, -1, -1) for t in position_embeddings)
        key = heads(self.attn, "k", self.normed)
        _, key = self.rope(key, key, self.cos, self.sin)
        self.key = key.float()
        self.key_mask = key_mask

    def probabilities(self, query_index: torch.Tensor) -> torch.Tensor:
        """Softmax attention [B, H, Q, T] (float32) of the query positions `query_index` [B, Q]."""
        index = query_index[..., None]
        rows = self.normed.gather(1, index.expand(-1, -1, self.normed.shape[-1]))
        query = heads(self.attn, "q", rows)
        row_cos = self.cos.gather(1, index.expand(-1, -1, self.head_dim))
        row_sin = self.sin.gather(1, index.expand(-1, -1, self.head_dim))
        query, _ = self.rope(query, query, row_cos, row_sin)
        key = self.key.repeat_interleave(query.shape[1] // self.key.shape[1], dim=1)
        scores = torch.matmul(query.float(), key.transpose(-1, -2)) * self.attn.scaling
        positions = torch.arange(self.length, device=self.key_mask.device)
        allowed = self.key_mask[:, None, None, :] & (positions[None, None, None, :] <= query_index[:, None, :, None])
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)


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
    return _LayerAttention(layer, hidden_states, position_embeddings, key_mask).probabilities(query_index)


def attention_received(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor,
    query_mask: torch.Tensor,
    chunk: int = 256,
    reduce: str = "sum",
) -> torch.Tensor:
    """Attention each key receives [B, T] (float32) from the query rows in `query_mask`: summed over heads and
    rows (`reduce="sum"`), or the most any one head of any one row pays it (`reduce="max"`).

    Rows are processed `chunk` at a time, so memory stays at [B, H, chunk, T] whatever the sequence length."""
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce={reduce!r}: use sum or max")
    scorer = _LayerAttention(layer, hidden_states, position_embeddings, key_mask)
    batch, length = key_mask.shape
    total = torch.zeros(batch, length, dtype=torch.float32, device=key_mask.device)
    weights = query_mask.float()
    for start in range(0, length, chunk):
        rows = weights[:, start : start + chunk]
        if not bool(rows.any()):
            continue
        index = torch.arange(start, start + rows.shape[1], device=key_mask.device).expand(batch, -1)
        probabilities = scorer.probabilities(index)  # [B, H, c, T]
        if reduce == "sum":
            total += torch.einsum("bhqt,bq->bt", probabilities, rows)
        else:
            total = torch.maximum(total, (probabilities * rows[:, None, :, None]).amax(dim=(1, 2)))
    return total


def last_real_index(key_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, [B, 1] (works for left and right padding)."""
    positions = torch.arange(key_mask.shape[1], device=key_mask.device).expand_as(key_mask)
    return torch.where(key_mask, positions, torch.full_like(positions, -1)).amax(1, keepdim=True).clamp(min=0)
