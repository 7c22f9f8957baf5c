"""The stage-2 soft mask: P ≡ 1 is the stock forward, P ∈ {0, 1} the hard-pruned one, backends agree."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny, make_image_batch, make_inputs
from pruning_helpers import KeepMask

from covipal.pruning.session import PruningSession
from covipal.training.soft_mask import SoftMaskSession


def constant(value: float):
    return lambda embeds, mask: torch.full(embeds.shape[:2], value)


def keep_pattern(inputs, config) -> torch.Tensor:
    ids = inputs["input_ids"]
    visual = (ids == config.image_token_id) | (ids == config.video_token_id)
    pattern = torch.arange(ids.shape[1])[None].expand_as(ids) % 3 == 0
    return ~visual | pattern


@pytest.mark.parametrize("kind", ["image", "video", "batch"])
def test_all_kept_is_the_stock_forward(sdpa_model, processor, kind):
    inputs = make_image_batch(processor) if kind == "batch" else make_inputs(processor, kind)
    with torch.no_grad():
        stock = sdpa_model(**inputs).logits
        with SoftMaskSession(sdpa_model, constant(float("inf"))):
            soft = sdpa_model(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(soft[mask], stock[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["image", "batch"])
def test_zero_one_probabilities_are_the_hard_pruned_forward(sdpa_model, processor, kind):
    inputs = make_image_batch(processor) if kind == "batch" else make_inputs(processor, kind)
    keep = keep_pattern(inputs, sdpa_model.config)
    with torch.no_grad():
        with PruningSession(sdpa_model, KeepMask(keep)) as session:
            hard = sdpa_model(**inputs).logits
        kept = session.record.kept
        scores = lambda embeds, mask: torch.where(keep, 1e4, -1e4)  # noqa: E731
        with SoftMaskSession(sdpa_model, scores):
            soft = sdpa_model(**inputs).logits
    soft_kept = soft.gather(1, kept.index[..., None].expand(-1, -1, soft.shape[-1]))
    torch.testing.assert_close(soft_kept[kept.valid], hard[kept.valid], rtol=1e-4, atol=1e-4)


def test_backends_agree_in_outputs_and_gradients(tiny_dir, processor):
    """The soft mask adds no disagreement between eager and SDPA beyond what the stock kernels already show."""
    inputs = make_image_batch(processor)
    mask = inputs["attention_mask"].bool()
    results, stock = {}, {}
    for name in ("eager", "sdpa"):
        model = load_tiny(tiny_dir, name)
        with torch.no_grad():
            stock[name] = model(**inputs).logits[mask]
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(model.config.text_config.hidden_size))
        scorer = lambda embeds, mask, w=weight: embeds @ w * 50  # noqa: E731
        with SoftMaskSession(model, scorer):
            logits = model(**inputs).logits
        logits[mask].square().mean().backward()
        results[name] = (logits.detach()[mask], weight.grad.clone())
    kernel_gap = (stock["sdpa"] - stock["eager"]).abs().max().item()
    assert (results["sdpa"][0] - results["eager"][0]).abs().max().item() <= 2 * kernel_gap + 1e-6
    assert not torch.allclose(results["sdpa"][0], stock["sdpa"], atol=1e-3)  # the bias did change the outputs
    torch.testing.assert_close(results["sdpa"][1], results["eager"][1], rtol=1e-3, atol=1e-7)
    assert results["eager"][1].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_scores_stay_finite(tiny_dir, processor, dtype):
    model = load_tiny(tiny_dir, "sdpa").to(dtype)
    inputs = make_image_batch(processor)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    weight = torch.nn.Parameter(torch.zeros(()))
    ids = inputs["input_ids"]
    sign = torch.where(torch.arange(ids.shape[1]) % 2 == 0, 50.0, -50.0).expand_as(ids)
    with SoftMaskSession(model, lambda embeds, mask: sign * (1 + weight)):
        logits = model(**inputs).logits
    logits[inputs["attention_mask"].bool()].float().square().mean().backward()
    assert torch.isfinite(logits[inputs["attention_mask"].bool()].float()).all()
    assert torch.isfinite(weight.grad)


@pytest.mark.slow  # compiles FlexAttention for the vision tower
def test_flex_backward_on_cpu_is_refused_in_one_line(tiny_dir, processor):
    model = load_tiny(tiny_dir, "flex_attention").requires_grad_(False)  # frozen, as in stage 2
    with SoftMaskSession(model, constant(1.0)), pytest.raises(Exception, match="no backward pass on CPU"):
        model(**make_inputs(processor, "image"))


@pytest.mark.gpu
def test_flex_agrees_with_sdpa_on_gpu(tiny_dir, processor):
    inputs = {k: v.cuda() for k, v in make_image_batch(processor).items()}
    mask = inputs["attention_mask"].bool()
    results = {}
    for name in ("sdpa", "flex_attention"):
        model = load_tiny(tiny_dir, name).cuda()
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(model.config.text_config.hidden_size, device="cuda"))
        with SoftMaskSession(model, lambda embeds, m, w=weight: embeds @ w * 50):
            logits = model(**inputs).logits
        logits[mask].square().mean().backward()
        results[name] = (logits.detach()[mask], weight.grad.clone())
    torch.testing.assert_close(results["flex_attention"][0], results["sdpa"][0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(results["flex_attention"][1], results["sdpa"][1], rtol=1e-3, atol=1e-5)
