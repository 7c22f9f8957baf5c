"""Both training stages on the tiny Qwen2.5-VL: stage-1 labels equal eager attention of the guidance layer (with
M-RoPE positions), the stage-2 soft mask is the stock forward at P ≡ 1 and the hard-pruned one at P ∈ {0, 1}, and
a stage-2 step trains the PPM alone."""

from __future__ import annotations

import pytest
import torch
from pruning_helpers import KeepMask, small_ppm
from qwen_helpers import (
    qwen_family,  # noqa: F401 (the autouse fixture: every test runs for each Qwen family)
    qwen_inputs,
    qwen_model,
    qwen_processor,
)

from covipal.data.conversation import turn_token_ids
from covipal.models.families import visual_mask
from covipal.pruning.session import PruningSession
from covipal.training.guidance import GuidanceProbe, query_rows_mask
from covipal.training.soft_mask import SoftMaskSession
from covipal.training.stage2 import Stage2Settings, Stage2Task


@pytest.mark.parametrize("reduce", ["max", "sum"])
@pytest.mark.parametrize("mode", ["question", "literal"])
@pytest.mark.parametrize("kind", ["batch", "video"])
def test_stage1_labels_equal_eager_attention(kind, mode, reduce):
    inputs = qwen_inputs(kind)
    turn_ids = turn_token_ids(qwen_processor().tokenizer)
    reference = qwen_model("reference", backend="eager")
    with torch.no_grad():
        attention = reference(**inputs, output_attentions=True).attentions[2].float()
    mask = inputs["attention_mask"].bool()
    visual = visual_mask(reference.config, inputs["input_ids"]) & mask
    rows = query_rows_mask(mask, visual, mode, inputs["input_ids"], turn_ids)
    if reduce == "max":
        expected = (attention * rows[:, None, :, None]).amax(dim=(1, 2))
    else:
        expected = torch.einsum("bhqt,bq->bt", attention, rows.float())
    with GuidanceProbe(qwen_model(), 2, query_rows=mode, chunk=7, turn_ids=turn_ids, reduce=reduce) as probe:
        batch = probe(inputs)
    assert torch.equal(batch.visual, visual) and expected[visual].abs().sum() > 0
    torch.testing.assert_close(batch.labels[visual], expected[visual], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["image", "video", "batch"])
def test_soft_mask_at_p_one_is_the_stock_forward_and_at_zero_one_the_hard_one(kind):
    model = qwen_model()
    inputs = qwen_inputs(kind)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        stock = model(**inputs).logits
        with SoftMaskSession(model, lambda embeds, m: torch.full(embeds.shape[:2], float("inf"))):
            soft = model(**inputs).logits
    torch.testing.assert_close(soft[mask], stock[mask], rtol=1e-5, atol=1e-5)
    ids = inputs["input_ids"]
    keep = ~visual_mask(model.config, ids) | (torch.arange(ids.shape[1])[None].expand_as(ids) % 3 == 0)
    with torch.no_grad():
        with PruningSession(model, KeepMask(keep)) as session:
            hard = model(**inputs).logits
        with SoftMaskSession(model, lambda embeds, m: torch.where(keep, 1e4, -1e4)):
            soft = model(**inputs).logits
    kept = session.record.kept
    soft_kept = soft.gather(1, kept.index[..., None].expand(-1, -1, soft.shape[-1]))
    torch.testing.assert_close(soft_kept[kept.valid], hard[kept.valid], rtol=1e-4, atol=1e-4)


def test_a_stage2_step_trains_only_the_ppm():
    from conftest import random_image

    from covipal.data.conversation import Conversation, TrainingCollator

    model = qwen_model("stage2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ppm = small_ppm(model)
    conversations = [
        Conversation([("what colour is it?", "red")], images=[random_image(0, 40, 56)]),
        Conversation([("how many?", "two"), ("where?", "top left")], images=[random_image(1, 64, 32)]),
    ]
    batch = TrainingCollator(qwen_processor(), mark_prompt=True)(conversations)
    batch.pop("skipped_samples")
    assert "image_grid_thw" in batch and "mm_token_type_ids" in batch
    loss, metrics = Stage2Task(model, ppm, Stage2Settings(k=0.1)).loss(ppm, batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["ce"] > 0 and 0 < metrics["p_mean"] < 1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ppm.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pdrop_star_lora_steps_change_only_the_adapters_and_merge_back(tmp_path):
    from conftest import random_image

    from covipal.data.conversation import Conversation, TrainingCollator
    from covipal.models.adapters import merge_adapter
    from covipal.pruning.pdrop import PyramidDropPruner
    from covipal.training.loop import LoopConfig, train
    from covipal.training.lora import LoRASettings, PrunedLoRATask

    model = qwen_model("lora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = PrunedLoRATask(model, PyramidDropPruner(0.5, layers=[1, 2, 3]), LoRASettings(rank=4, alpha=8, dropout=0.0))
    data = [
        Conversation([("what colour is it?", "red")], images=[random_image(i, 64, 96 - 16 * (i % 3))]) for i in range(4)
    ]
    collate = TrainingCollator(qwen_processor(), labels=True)
    final = train(task, data, collate, LoopConfig(lr=1e-2, batch_size=2, max_steps=2, progress=False), tmp_path / "run")
    state = task.trainable.state_dict()
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k
    }
    assert set(base) == set(before) and all(torch.equal(base[k], before[k]) for k in before)
    lora = [k for k in state if "lora_B" in k]
    assert lora and all("language_model" in k for k in lora) and any(state[k].abs().sum() > 0 for k in lora)
    batch = collate(data[:2])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "skipped_samples")}
    merged = merge_adapter(qwen_model("lora-merge"), final).eval()
    task.trainable.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, task.trainable(**inputs).logits, atol=1e-3, rtol=1e-3)
