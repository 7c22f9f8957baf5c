"""Compacting a batch of sequences to the tokens a pruner keeps, left-padded so rows of unequal length align."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Compaction:
    """Where each row of the compacted batch comes from.

    `index[b, j]` is the position in the uncompacted row that slot j holds; `valid[b, j]` is False for the
    left padding added when rows keep different numbers of tokens."""

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> Compaction:
        batch = keep.shape[0]
        counts = keep.sum(1)
        width = int(counts.max()) if batch else 0
        # Kept positions first (in order), then the dropped ones: a stable sort on "dropped".
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        shift = width - counts  # left padding of each row
        slots = torch.arange(width, device=keep.device).expand(batch, width)
        source = (slots - shift[:, None]).clamp(min=0)
        index = order.gather(1, source)
        valid = slots >= shift[:, None]
        index = torch.where(valid, index, torch.zeros_like(index))
        return cls(index=index, valid=valid)

    def gather(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Gather a [B, T, ...] (dim=1) tensor into the compacted layout; padding slots copy position 0."""
        index = self.index
        shape = [index.shape[0], index.shape[1]] + [1] * (tensor.dim() - 2)
        index = index.view(shape).expand(*index.shape, *tensor.shape[2:])
        if tensor.shape[0] != index.shape[0]:
            tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
        return tensor.gather(dim, index)

    def gather_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Gather position ids [B, T], or [k, B, T] (M-RoPE's axes), into the compacted layout."""
        if positions.dim() == 2:
            return self.gather(positions)
        rows = positions.shape[0]
        batch, width = self.index.shape
        positions = positions.expand(rows, batch, positions.shape[-1])
        return positions.gather(-1, self.index.expand(rows, batch, width))

    def gather_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return self.gather(mask) & self.valid

    def compose(self, inner: Compaction) -> Compaction:
        """`inner` compacts the output of `self`; return the compaction from the original sequence."""
        return Compaction(
            index=self.index.gather(1, inner.index), valid=inner.valid & self.valid.gather(1, inner.index)
        )
