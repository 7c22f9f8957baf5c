"""LLaVA-OneVision (and LLaVA-Video, the same classes): SigLIP tower, anyres crops with newline tokens, video
frames pooled 2×2; the LLM (Qwen2) takes 1D positions [B, T]."""

from __future__ import annotations

import torch

MODEL_TYPE = "llava_onevision"


class LlavaOneVision:
    name = MODEL_TYPE
    position_rows = 0  # 1D positions: [B, T]

    @staticmethod
    def prefill_positions(position_ids: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
        """The LLM's prefill positions as [B, T] (the model passes none: 0..T-1)."""
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None]
        return position_ids.expand(batch, length)

    @staticmethod
    def layer_position_ids(positions: torch.Tensor) -> torch.Tensor:
        """What a decoder layer is given as `position_ids` for a stage with these positions."""
        return positions

    @staticmethod
    def decode_positions(multimodal, position_ids, mask, start: int, steps: int, batch: int, device):
        """Positions [B, steps] of new tokens after an original (unpruned) sequence of `start` tokens, or None to
        keep the call's `position_ids`. The model would count the pruned cache, so positions it did not get from
        the caller (generate passes them) continue the original length."""
        if position_ids is not None:
            return None
        return (torch.arange(steps, device=device) + start)[None].expand(batch, steps)


ADAPTER = LlavaOneVision()
