"""LoRA adapters trained with a pruner active (PDrop*): merged into the LLM's weights when the model loads, so
pruned inference runs the plain model at full speed and no peft wrapper stays around."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from torch import nn

from covipal.errors import CovipalError


@contextlib.contextmanager
def peft_quiet():
    """peft 0.21 still calls `is_gradient_checkpointing`, which transformers 5.23 deprecates (a FutureWarning on
    every wrap); only that warning is silenced, so any other deprecation still fails the tests."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def merge_adapter(model: nn.Module, adapter: str | Path) -> nn.Module:
    """`model` with the LoRA adapter saved in `adapter` (peft's save_pretrained layout) merged into its weights."""
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise CovipalError(
            f"adapter={adapter} has no adapter_config.json; pass the directory a LoRA run saved "
            "(python -m covipal.train stage=lora prints it)"
        )
    from peft import PeftModel

    with peft_quiet():
        wrapped = PeftModel.from_pretrained(model, str(path))
    return wrapped.merge_and_unload()


def trainable_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
