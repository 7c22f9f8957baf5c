"""PPM ("Plug-and-Play Pruning Module"): a small bidirectional encoder that scores LLM input tokens.

The classifier reads the LLM's input embedding sequence (visual and text tokens) and emits one
relevance logit per token. Callers keep only the scores at visual positions.

Architecture (pre-norm transformer encoder):
    Linear(input_size -> hidden, bias)
    num_layers x [RMSNorm -> GQA self-attention (bidirectional, RoPE) ; RMSNorm -> SwiGLU MLP]
    RMSNorm -> Linear(hidden -> 1, bias)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

PPM_FORMAT = "covipal-ppm"
PPM_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class PPMConfig:
    input_size: int
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 8
    num_heads: int = 16
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PPMConfig:
        """Build from a dict; the checkpoint metadata keys ``format``/``version`` are ignored."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"format", "version"}
        if unknown:
            raise ValueError(f"unknown PPMConfig keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16 weights, then return to the working dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, 1, T, head_dim] for rotate-half RoPE, computed in fp32 from explicit positions."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    angles = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class PPMAttention(nn.Module):
    def __init__(self, cfg: PPMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kv_size = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_size, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_size, bias=True)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x, key_mask, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class PPMMLP(nn.Module):
    def __init__(self, cfg: PPMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PPMLayer(nn.Module):
    def __init__(self, cfg: PPMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = PPMAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = PPMMLP(cfg)

    def forward(self, x, key_mask, cos, sin):
        x = x + self.attn(self.attn_norm(x), key_mask, cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class PPMClassifier(nn.Module):
    def __init__(self, config: PPMConfig):
        super().__init__()
        self.config = config
        self.in_proj = nn.Linear(config.input_size, config.hidden_size, bias=True)
        self.layers = nn.ModuleList(PPMLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.out_proj = nn.Linear(config.hidden_size, 1, bias=True)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, 0.02) linears, zero biases, unit norms. Init ops are no-ops on the meta device."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score every token. Returns float32 logits [B, T]; values at padding positions are meaningless."""
        dtype = self.in_proj.weight.dtype
        b, t, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if attention_mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=device)
        else:
            mask = attention_mask.to(device=device).bool()
        if position_ids is None:
            # cumsum-based positions make each sample's positions independent of how it was padded.
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)

        # Boolean key mask [B, 1, 1, T] (True = attend). A sample with no real tokens would give an
        # all-masked row and NaNs, so such samples attend everywhere instead.
        key_mask = mask | ~mask.any(-1, keepdim=True)
        key_mask = key_mask[:, None, None, :]

        cos, sin = rotary_cos_sin(position_ids.to(device), self.config.head_dim, self.config.rope_theta, dtype)
        h = self.in_proj(inputs_embeds.to(dtype))
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, key_mask, cos, sin, use_reentrant=False)
            else:
                h = layer(h, key_mask, cos, sin)
        return self.out_proj(self.norm(h)).squeeze(-1).float()

    # ---------------------------------------------------------------- persistence

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {**self.config.to_dict(), "format": PPM_FORMAT, "version": PPM_FORMAT_VERSION}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        expected_input_size: int | None = None,
        map_location: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> PPMClassifier:
        directory = Path(directory)
        for path in (directory, directory / CONFIG_NAME, directory / WEIGHTS_NAME):
            if not path.exists():
                raise FileNotFoundError(
                    f"PPM checkpoint not found: {path} does not exist; train one with "
                    "`python -m covipal.train stage=1` or use explicit random init "
                    "(classifier=random)"
                )
        meta = json.loads((directory / CONFIG_NAME).read_text())
        if meta.get("format") != PPM_FORMAT:
            raise ValueError(f"{directory / CONFIG_NAME} is not a {PPM_FORMAT} config (format={meta.get('format')!r})")
        if meta.get("version", 0) > PPM_FORMAT_VERSION:
            raise ValueError(
                f"PPM checkpoint at {directory} has format version {meta['version']}, newer than supported "
                f"version {PPM_FORMAT_VERSION}; upgrade covipal"
            )
        config = PPMConfig.from_dict(meta)
        if expected_input_size is not None and expected_input_size != config.input_size:
            raise ValueError(
                f"PPM checkpoint at {directory} was trained for LLM width {config.input_size} "
                f"but this model's width is {expected_input_size}; train a classifier for this model "
                "(python -m covipal.train stage=1) or pass the matching checkpoint"
            )
        # Build on meta and adopt the loaded tensors directly: no wasted random init.
        with torch.device("meta"):
            model = cls(config)
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        model.load_state_dict(state, strict=True, assign=True)
        if dtype is not None:
            model.to(dtype=dtype)
        return model
