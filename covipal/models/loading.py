"""Loading a model of a supported family (LLaVA-OneVision, Qwen2.5-VL) and its processor with `from_pretrained`:
the paper's checkpoints and the tiny models' cached ones (covipal/tiny_world/model.py) go through the same path."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, snapshot_download
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import is_flash_attn_2_available

from covipal.errors import CovipalError
from covipal.models.adapters import merge_adapter
from covipal.models.families import family_of

ATTENTION_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager", "flex_attention")


@dataclass
class LoadedModel:
    """A model with the processor that feeds it."""

    model: object  # a supported family's ...ForConditionalGeneration (covipal/models/families)
    processor: object
    name: str
    ppm: dict | None = None  # the PPM architecture suited to this model (used when a PPM is built from scratch)
    # where layer-indexed methods act on this model's LLM (model.layer_plan; pruner and training configs read it)
    layer_plan: dict | None = None
    # how benchmarks ask this model (model.evaluation): instructions per answer format, video frames
    evaluation: dict | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CovipalError(f"model.device={device} but no CUDA device is visible; use model.device=cpu")
    return torch.device(device)


BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")  # with either, bf16 matrix products beat float32 on CPU


def cpu_bf16_features(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The CPU's bf16 matrix features: without them bf16 runs ~5x slower than float32 on CPU, with AMX ~10x
    faster (../shared/FACTS.md). Empty where /proc/cpuinfo cannot be read."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return []
    return [feature for feature in BF16_CPU_FEATURES if feature in flags]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU and on a CPU with AMX-bf16 or AVX512-BF16, float32 on any other CPU."""
    if dtype == "auto":
        fast_bf16 = device.type == "cuda" or bool(cpu_bf16_features())
        return torch.bfloat16 if fast_bf16 else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise CovipalError(f"model.dtype={dtype} is not one of auto, float32, bfloat16, float16") from None


def dtype_choice(dtype: str, device: torch.device) -> str:
    """What `resolve_dtype` picks and why, in one line (the bench prints it)."""
    chosen = str(resolve_dtype(dtype, device)).replace("torch.", "")
    if dtype != "auto":
        return f"{chosen} (model.dtype={dtype})"
    if device.type == "cuda":
        return f"{chosen} (model.dtype=auto on a GPU)"
    features = cpu_bf16_features()
    why = f"this CPU has {', '.join(features)}" if features else "this CPU has neither amx_bf16 nor avx512_bf16"
    return f"{chosen} (model.dtype=auto: {why}; set model.dtype=float32 or bfloat16 to choose)"


def resolve_attention(name: str, device: torch.device) -> str:
    """`auto` picks FlashAttention-2 when it is installed and a GPU is in use, otherwise SDPA."""
    if name not in ATTENTION_CHOICES:
        raise CovipalError(f"model.attn_implementation={name} is not one of {', '.join(ATTENTION_CHOICES)}")
    flash = is_flash_attn_2_available() and device.type == "cuda"
    if name == "auto":
        return "flash_attention_2" if flash else "sdpa"
    if name == "flash_attention_2" and not flash:
        raise CovipalError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and flash-attn "
            "(pip install 'covipal[flash]'); use model.attn_implementation=sdpa"
        )
    return name


def check_processor_matches(model, processor, name: str) -> None:
    """Fail early when the processor would produce a number or kind of placeholder the model does not expect."""
    config = model.config
    problems = []
    if processor.image_token_id != config.image_token_id:
        problems.append(f"image token id {processor.image_token_id} != model's {config.image_token_id}")
    if processor.video_token_id != config.video_token_id:
        problems.append(f"video token id {processor.video_token_id} != model's {config.video_token_id}")
    problems += family_of(model).processor_problems(model, processor)
    if len(processor.tokenizer) > config.text_config.vocab_size:
        problems.append(f"tokenizer size {len(processor.tokenizer)} > model vocabulary {config.text_config.vocab_size}")
    if problems:
        raise CovipalError(
            f"processor does not match model {name}: {'; '.join(problems)}; load both from the same checkpoint"
        )


def _stored_locally(name_or_path: str) -> bool:
    """A local directory, or a hub id whose files are already in the Hugging Face cache."""
    if Path(name_or_path).is_dir():
        return True
    try:
        snapshot_download(name_or_path, local_files_only=True)
    except Exception:  # not cached, or not a valid id
        return False
    return True


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails in seconds instead of minutes of download retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_pretrained(
    name_or_path: str,
    attn_implementation: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    processor_path: str | None = None,
    name: str | None = None,
    ppm: dict | None = None,
    layer_plan: dict | None = None,
    evaluation: dict | None = None,
    adapter: str | None = None,
) -> LoadedModel:
    """Load model and processor with `from_pretrained`, from a hub id or a local directory; `adapter`: a LoRA
    adapter (e.g. PDrop*'s) merged into the weights."""
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    attention = resolve_attention(attn_implementation, target)
    missing = CovipalError(
        f"cannot load model '{name_or_path}': no local copy and the hub is unreachable; download it where "
        f"there is network (`hf download {name_or_path}`) and pass model.name_or_path=/path/to/local/copy"
    )
    if not _stored_locally(str(name_or_path)) and not _hub_reachable():
        raise missing
    try:
        processor = AutoProcessor.from_pretrained(processor_path or name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=torch_dtype, attn_implementation=attention
        )
    except OSError:
        raise missing from None
    family_of(model)  # a family covipal knows, or the one-line error
    check_processor_matches(model, processor, name_or_path)
    if adapter:
        model = merge_adapter(model, adapter)
    model.to(target).eval()
    name = name or Path(str(name_or_path)).name
    return LoadedModel(
        model,
        processor,
        name,
        dict(ppm) if ppm else None,
        dict(layer_plan) if layer_plan else None,
        dict(evaluation) if evaluation else None,
    )
