"""FlashAttention-2 on a GPU: the pruned forward and pruned generation agree with SDPA. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image_batch
from pruning_helpers import make_pruner
from test_baselines import make
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.utils import is_flash_attn_2_available

from covipal.pruning.session import PruningSession

pytestmark = pytest.mark.gpu


def cuda_model(tiny_dir, attention):
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_dir, attn_implementation=attention, dtype=torch.bfloat16
    )
    return model.to("cuda").eval()


@pytest.mark.skipif(not is_flash_attn_2_available(), reason="flash-attn is not installed")
def pruner_for(name: str):
    return make_pruner(name, 0.5) if name in ("covipal", "fastv") else make(name, 0.5)


@pytest.mark.parametrize("pruner", ["covipal", "fastv", "pdrop", "sparsevlm", "visionzip", "vitcop", "pool"])
def test_flash_attention_pruned_matches_sdpa(tiny_dir, processor, pruner):
    inputs = {k: v.to("cuda") for k, v in make_image_batch(processor).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    results = {}
    for attention in ("flash_attention_2", "sdpa"):
        model = cuda_model(tiny_dir, attention)
        with torch.no_grad(), PruningSession(model, pruner_for(pruner)) as session:
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        results[attention] = (logits[session.record.kept.valid].float(), tokens, session.record.layer_visual_tokens)
    flash, sdpa = results["flash_attention_2"], results["sdpa"]
    assert torch.equal(flash[2], sdpa[2])
    torch.testing.assert_close(flash[0], sdpa[0], atol=0.1, rtol=0.05)
    assert (flash[1] == sdpa[1]).float().mean() > 0.9
