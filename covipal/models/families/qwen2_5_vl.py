"""Qwen2.5-VL: a windowed ViT whose 2×2 patch merger makes each visual token, images at native resolution and
videos in pairs of frames; the LLM takes 3D rotary positions (M-RoPE: temporal, height, width) [3, B, T], and
decoding continues them from the original sequence by a per-sample `rope_deltas` the model keeps."""

from __future__ import annotations

import torch

MODEL_TYPE = "qwen2_5_vl"


class Qwen25VL:
    name = MODEL_TYPE
    position_rows = 3  # M-RoPE: [3, B, T]

    @staticmethod
    def prefill_positions(position_ids: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
        """The LLM's prefill positions as [3, B, T]. `generate` prepends a row of text positions ([4, B, T]),
        which only serves to build masks for packed sequences; the session builds its own masks and drops it."""
        if position_ids is None:  # text only: the model lets the LLM count 0..T-1 on every axis
            position_ids = torch.arange(length, device=device)[None, None]
        elif position_ids.dim() == 2:
            position_ids = position_ids[None]
        elif position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return position_ids.expand(3, batch, length)

    @staticmethod
    def layer_position_ids(positions: torch.Tensor) -> None:
        """Decoder layers get only text positions (for packed FlashAttention); the session's explicit masks
        need none."""
        return None

    @staticmethod
    def decode_positions(multimodal, position_ids, mask, start: int, steps: int, batch: int, device):
        """Positions [3, B, steps] of new tokens after an original (unpruned) sequence of `start` tokens, or None to
        keep the call's. The text position of a new token (the real tokens before it, as the model counts them
        from the caller's `mask`, or `start + i` without one) plus the sample's rope delta, on every axis.
        `generate` passes exactly these; a forward without a mask would count the pruned cache instead, and one
        with a mask gives positions for the whole mask rather than for the new tokens."""
        if position_ids is not None and position_ids.shape[-1] == steps and mask is not None:
            return None
        if mask is not None:
            text = mask.long().cumsum(-1)[:, -steps:] - 1
        else:
            text = (torch.arange(steps, device=device) + start)[None].expand(batch, steps)
        deltas = multimodal.rope_deltas
        deltas = torch.zeros(batch, 1, dtype=torch.long, device=device) if deltas is None else deltas.to(device)
        return (text + deltas.expand(batch, 1))[None].expand(3, batch, steps)


ADAPTER = Qwen25VL()
