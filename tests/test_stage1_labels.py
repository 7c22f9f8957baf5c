"""Stage-1 labels (Eq. 3) recomputed from the guidance layer's input equal eager `output_attentions`."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny, make_image_batch, make_inputs

from covipal.data.conversation import turn_token_ids
from covipal.errors import CovipalError
from covipal.training.guidance import QUERY_ROWS, REDUCTIONS, GuidanceProbe, query_rows_mask


def eager_labels(model, inputs, layer: int, mode: str, turn_ids, reduce: str = "sum") -> torch.Tensor:
    """Eq. 3 from eager attention weights at `layer`: the sum over heads and the chosen query rows (or the most
    any head of any of those rows pays)."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    attention = out.attentions[layer].float()  # [B, H, T, T]
    mask = inputs["attention_mask"].bool()
    ids = inputs["input_ids"]
    visual = ((ids == model.config.image_token_id) | (ids == model.config.video_token_id)) & mask
    rows = query_rows_mask(mask, visual, mode, ids, turn_ids)
    if reduce == "max":
        return (attention * rows[:, None, :, None]).amax(dim=(1, 2)), visual
    return torch.einsum("bhqt,bq->bt", attention, rows.float()), visual


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("mode", QUERY_ROWS)
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_labels_equal_eager_attention(tiny_dir, processor, mode, backend, reduce):
    turn_ids = turn_token_ids(processor.tokenizer)
    reference = load_tiny(tiny_dir, "eager")
    model = load_tiny(tiny_dir, backend)
    inputs = make_image_batch(processor)
    expected, visual = eager_labels(reference, inputs, 3, mode, turn_ids, reduce)
    with GuidanceProbe(model, 3, query_rows=mode, chunk=7, turn_ids=turn_ids, reduce=reduce) as probe:
        batch = probe(inputs)
    assert torch.equal(batch.visual, visual)
    assert expected[visual].abs().sum() > 0
    torch.testing.assert_close(batch.labels[visual], expected[visual], rtol=1e-4, atol=1e-5)


def test_each_mode_selects_the_rows_it_names():
    """A hand-built prompt, left-padded: pad pad <s> user v v v what ? </s> <s> assistant (ids below)."""
    start, end, user, assistant, image, what, mark, pad = 1, 2, 3, 4, 9, 5, 6, 0
    ids = torch.tensor([[pad, pad, start, user, image, image, image, what, mark, end, start, assistant]])
    mask = ids != pad
    visual = ids == image
    rows = {
        mode: query_rows_mask(mask, visual, mode, ids, (start, end))[0].nonzero().squeeze(1).tolist()
        for mode in QUERY_ROWS
    }
    assert rows == {
        "literal": [9, 10, 11],  # the last n_v = 3 rows
        "text_after_visual": [7, 8, 9, 10, 11],  # question, end of turn, generation prompt
        "question": [7, 8],  # the user's text after the visual span
        "last_prompt": [9],  # the end of the user's turn, just before the generation prompt
        "last": [11],  # the end of the generation prompt
    }
    with pytest.raises(CovipalError, match="needs the chat template's turn tokens"):
        query_rows_mask(mask, visual, "question", ids)


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
    with pytest.raises(CovipalError, match="query_rows=question needs the chat template's turn tokens"):
        GuidanceProbe(sdpa_model, 2, query_rows="question")
    with pytest.raises(CovipalError, match="reduce='mean'"):
        GuidanceProbe(sdpa_model, 2, reduce="mean")
    with GuidanceProbe(sdpa_model, 2), pytest.raises(CovipalError, match="already installed"):
        GuidanceProbe(sdpa_model, 2).__enter__()
