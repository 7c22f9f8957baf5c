"""Stage-1 labels (Eq. 3) recomputed from the guidance layer's input equal eager `output_attentions`."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny, make_image_batch, make_inputs

from covipal.errors import CovipalError
from covipal.training.guidance import QUERY_ROWS, GuidanceProbe, query_rows_mask


def eager_labels(model, inputs, layer: int, mode: str) -> torch.Tensor:
    """Eq. 3 from eager attention weights: sum over heads and the chosen query rows, at `layer`."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    attention = out.attentions[layer].float()  # [B, H, T, T]
    mask = inputs["attention_mask"].bool()
    ids = inputs["input_ids"]
    visual = ((ids == model.config.image_token_id) | (ids == model.config.video_token_id)) & mask
    rows = query_rows_mask(mask, visual, mode)
    return torch.einsum("bhqt,bq->bt", attention, rows.float()), visual


@pytest.mark.parametrize("mode", QUERY_ROWS)
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_labels_equal_eager_attention(tiny_dir, processor, mode, backend):
    reference = load_tiny(tiny_dir, "eager")
    model = load_tiny(tiny_dir, backend)
    inputs = make_image_batch(processor)
    expected, visual = eager_labels(reference, inputs, 3, mode)
    with GuidanceProbe(model, 3, query_rows=mode, chunk=7) as probe:
        batch = probe(inputs)
    assert torch.equal(batch.visual, visual)
    assert expected[visual].abs().sum() > 0
    torch.testing.assert_close(batch.labels[visual], expected[visual], rtol=1e-4, atol=1e-5)


def test_literal_rows_are_the_last_n_visual_rows(processor):
    inputs = make_image_batch(processor)
    mask = inputs["attention_mask"].bool()
    visual = (inputs["input_ids"] == 1) & False
    visual[0, -5:-2] = True
    visual[1, -10:-1] = True
    rows = query_rows_mask(mask, visual, "literal")
    assert rows.sum(1).tolist() == [3, 9]
    assert rows[:, -1].all() and not rows[0, -4] and rows[0, -3]


def test_later_layers_never_run(sdpa_model, processor):
    calls = []
    layers = sdpa_model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        with GuidanceProbe(sdpa_model, 4) as probe:
            probe(make_inputs(processor, "video"))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1, 2, 3, 4]


def test_normalized_labels_sum_to_one(sdpa_model, processor):
    with GuidanceProbe(sdpa_model, 2, normalize=True) as probe:
        batch = probe(make_image_batch(processor))
    torch.testing.assert_close((batch.labels * batch.visual).sum(1), torch.ones(2))


def test_bad_settings_fail_in_one_line(sdpa_model):
    with pytest.raises(CovipalError, match="guidance_layer=99"):
        GuidanceProbe(sdpa_model, 99)
    with pytest.raises(CovipalError, match="query_rows='middle'"):
        GuidanceProbe(sdpa_model, 2, query_rows="middle")
    with GuidanceProbe(sdpa_model, 2), pytest.raises(CovipalError, match="already installed"):
        GuidanceProbe(sdpa_model, 2).__enter__()
