"""Attention supervision in pretraining: the rows and targets are the right tokens, and each of the three terms
recomputed from a layer's input equals the one read off eager `output_attentions`, with and without dropped
tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from covipal.errors import CovipalError
from covipal.models.architecture import ArchitectureSpec
from covipal.pruning.session import PruningSession
from covipal.tiny_world.grounding import (
    answer_query_rows,
    attention_share_loss,
    grounding_losses,
    key_word_rows,
    question_rows,
    question_tokens,
    rows_as_targets,
    turn_relevance,
    unevenness,
)
from covipal.tiny_world.model import build_tiny
from covipal.tiny_world.oracle import FocusPruner
from covipal.tiny_world.pretrain import (
    PretrainRecipe,
    count_sink_targets,
    counted_tokens,
    grounding_token_ids,
    pretrain,
    pretraining_loss,
    short_answer_ids,
    training_batch,
    turn_heads,
)
from covipal.tiny_world.samples import image_sample, video_sample
from covipal.tiny_world.synthetic import IMAGE_QUESTION_TYPES, KEY_WORDS, NUMBERS
from covipal.training.layer_input import LayerInputCapture
from tests.test_pretrain import SMALL_WORLD


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    spec = ArchitectureSpec(**{**SMALL_WORLD, "initializer_range": 0.3})
    directory = build_tiny(spec, tmp_path_factory.mktemp("grounding"))
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(directory)


def test_answer_query_rows_mark_the_token_before_each_answer():
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100, 7, 6], [-100, -100, -100, -100, -100, 9, 6, -100]])
    assert answer_query_rows(labels).tolist() == [[-1, 0, -1, -1, -1, 1, -1, -1], [-1, -1, -1, -1, 0, -1, -1, -1]]


def test_every_turn_has_the_relevance_of_its_own_question():
    rng = np.random.default_rng(3)
    for sample in (image_sample(rng, "short", turns=5), video_sample(rng, "mcq", turns=5)):
        masks = sample.meta["turn_relevance"]
        assert len(masks) == 1 + len(sample.meta["turns"]) and np.array_equal(masks[0], sample.relevance)
        for mask in masks:
            assert mask.any() and not (mask & ~sample.meta["scene_relevance"]).any()


def test_each_turn_knows_the_first_token_of_its_short_answer(eager):
    _, processor = eager
    rng = np.random.default_rng(5)
    samples = [image_sample(rng, "mcq", turns=4), video_sample(rng, "short", turns=2)]
    answers = short_answer_ids(samples, processor.tokenizer, 4)
    for row, sample in enumerate(samples):
        shorts = sample.meta["turn_short_answers"]
        assert shorts[0] == sample.meta["short_answer"] and len(shorts) == 1 + len(sample.meta["turns"])
        for turn in range(4):
            expected = processor.tokenizer(shorts[turn]).input_ids[0] if turn < len(shorts) else -1
            assert answers[row, turn] == expected
    assert (answers[1, 2:] == -1).all()


def test_the_answer_probe_is_a_fourth_finite_term_with_gradients(eager):
    model, processor = eager
    recipe = PretrainRecipe(answer_probe=True, grounding_layer=1)
    samples = [image_sample(np.random.default_rng(s), "mcq", min_objects=1, max_objects=2, turns=3) for s in range(2)]
    batch = training_batch(processor, samples)
    model.zero_grad()
    _, grounding = pretraining_loss(model, batch, samples, 1.0, recipe, grounding_token_ids(processor.tokenizer))
    plain = pretraining_loss(
        model,
        training_batch(processor, samples),
        samples,
        1.0,
        PretrainRecipe(),
        grounding_token_ids(processor.tokenizer),
    )[1]
    assert torch.isfinite(grounding) and grounding > plain  # a cross-entropy over the vocabulary adds a lot
    on_key_words = [
        pretraining_loss(
            model,
            training_batch(processor, samples),
            samples,
            1.0,
            PretrainRecipe(answer_probe=probe, key_word_kinds=list(IMAGE_QUESTION_TYPES)),
            grounding_token_ids(processor.tokenizer),
        )[1].item()
        for probe in (True, False)
    ]
    assert on_key_words[0] == on_key_words[1] != plain.item()  # key-word rows are not probed
    grounding.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0  # the answer is read out through the LM head


def test_the_answer_probe_skips_turns_whose_row_is_a_key_word(eager):
    model, processor = eager
    batch, labels, samples = small_batch(processor)
    input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    relevance = turn_relevance(input_ids == model.config.image_token_id, [s.meta["turn_relevance"] for s in samples])
    ids = grounding_token_ids(processor.tokenizer)
    answers = short_answer_ids(samples, processor.tokenizer, relevance.shape[1])
    head = lambda hidden: model.lm_head(model.model.language_model.norm(hidden))  # noqa: E731
    every = torch.ones(relevance.shape[:2], dtype=torch.bool)
    first = every.clone()
    first[:, 1:] = False
    unasked = answers.clone()
    unasked[:, 0] = -1
    with torch.no_grad():
        captures = [LayerInputCapture(model, layer) for layer in (0, 1, 2)]
        for capture in captures:
            capture.__enter__()
        try:
            model(**batch)
            run = lambda answers, keyed: grounding_losses(  # noqa: E731
                captures, input_ids, mask, answer_query_rows(labels), relevance, ids, None, (head, answers), keyed=keyed
            )
            assert len(run(answers, every)) == 3  # no turn left to probe: no fourth term (and no NaN)
            assert run(answers, first)[3].item() == pytest.approx(run(unasked, None)[3].item(), rel=1e-6)
        finally:
            for capture in captures:
                capture.__exit__(None, None, None)


def test_a_relevance_mask_of_another_layout_is_refused():
    visual = torch.tensor([[False, True, True, False]])
    assert turn_relevance(visual, [[np.array([False, True])]]).tolist() == [[[False, False, True, False]]]
    with pytest.raises(CovipalError, match="relevance has 3 entries but the sample has 2 visual tokens"):
        turn_relevance(visual, [[np.array([True, False, True])]])


def small_batch(processor):
    samples = [image_sample(np.random.default_rng(5), "mcq", turns=3), image_sample(np.random.default_rng(6), "short")]
    batch = training_batch(processor, samples)
    return batch, batch.pop("labels"), samples


def test_question_rows_key_word_rows_and_key_words_are_those_of_each_turns_question(eager):
    _, processor = eager
    batch, labels, samples = small_batch(processor)
    tokenizer = processor.tokenizer
    ids = grounding_token_ids(tokenizer)
    input_ids = batch["input_ids"]
    answers = answer_query_rows(labels)
    questions = question_tokens(input_ids, answers, ids["user"], ids["end"])
    marks = question_rows(input_ids, questions, ids["mark"])
    keys = key_word_rows(input_ids, questions, marks, ids["keywords"])
    for row, sample in enumerate(samples):
        prompts = [sample.question] + [prompt for prompt, _ in sample.meta["turns"]]
        for turn, prompt in enumerate(prompts):
            (key,) = (keys[row] == turn).nonzero().squeeze(1).tolist()
            words = [w for w in prompt.split("?")[0].split() if w in KEY_WORDS]  # options come after the "?"
            assert tokenizer.convert_ids_to_tokens(int(input_ids[row, key])) == words[-1]
            text = tokenizer.decode(input_ids[row][questions[row, turn]]).replace("<image>", "").split()
            assert text == tokenizer.decode(tokenizer(prompt).input_ids).split()
            (mark,) = (marks[row] == turn).nonzero().squeeze(1).tolist()
            assert tokenizer.convert_ids_to_tokens(int(input_ids[row, mark])) == "?"
            assert mark < int((answers[row] == turn).nonzero())  # the question comes before its answer
            later = questions[row, turn, mark + 1 :] & (input_ids[row, mark + 1 :] == ids["mark"])
            assert questions[row, turn, mark] and not later.any()  # the question's last "?"
            assert questions[row, turn, key] and key < mark
        assert int((marks[row] >= 0).sum()) == int((keys[row] >= 0).sum()) == len(prompts)
    keywords = questions & torch.isin(input_ids, ids["keywords"])[:, None, :]
    for row, turns in enumerate((answers.max(1).values + 1).tolist()):
        assert keywords[row, :turns].any(-1).all()  # every question names what it is about
    assert rows_as_targets(marks, questions.shape[1]).sum(-1).max() == 1


def reference(attentions, query_turn, allowed, targets, columns=None, heads=None):
    """The same loss by loops over rows and columns (`columns[b][j]`: original position of row j, -1 = padding;
    `heads[b, turn]`: the heads a turn's rows average over, default all)."""
    losses = []
    for b in range(attentions.shape[0]):
        cols = columns[b] if columns is not None else list(range(attentions.shape[-1]))
        for j, original in enumerate(cols):
            if original < 0 or query_turn[b, original] < 0:
                continue
            wanted = targets[b, int(query_turn[b, original])]
            if not any(wanted[c] for c in cols if c >= 0):
                continue
            chosen = slice(None) if heads is None else heads[b, int(query_turn[b, original])]
            mean = attentions[b, chosen, j].mean(0)
            on_allowed = sum(float(mean[k]) for k, c in enumerate(cols) if c >= 0 and allowed[b, c])
            on_wanted = sum(float(mean[k]) for k, c in enumerate(cols) if c >= 0 and allowed[b, c] and wanted[c])
            losses.append(-math.log(on_wanted / on_allowed + 1e-6))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("keyed", [None, "all", "first"])  # which turns' question row is their last key word
@pytest.mark.parametrize("drop", [False, True])
def test_each_term_equals_the_one_from_eager_attention(eager, drop, keyed):
    model, processor = eager
    batch, labels, samples = small_batch(processor)
    input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    visual = input_ids == model.config.image_token_id
    relevance = turn_relevance(visual, [s.meta["turn_relevance"] for s in samples])
    if keyed is not None:
        turns = torch.ones(relevance.shape[:2], dtype=torch.bool)
        turns[:, 1:] = keyed == "all"
        keyed = turns
    ids = grounding_token_ids(processor.tokenizer)
    answers = answer_query_rows(labels)
    with torch.no_grad():
        captures = [LayerInputCapture(model, layer) for layer in (0, 1, 2)]
        for capture in captures:
            capture.__enter__()
        try:
            if drop:
                with PruningSession(model, FocusPruner(0.2, seed=1)) as session:
                    session.extras = {"relevance": [s.meta["scene_relevance"] for s in samples]}
                    out = model(**batch, output_attentions=True)
                kept = session.record.kept
                assert int(kept.valid.sum()) < int(mask.sum())  # tokens were dropped
                columns = [[int(i) if v else -1 for i, v in zip(ix, va)] for ix, va in zip(kept.index, kept.valid)]
            else:
                out, kept, columns = model(**batch, output_attentions=True), None, None
            terms = grounding_losses(captures, input_ids, mask, answers, relevance, ids, kept, keyed=keyed)
        finally:
            for capture in captures:
                capture.__exit__(None, None, None)
    questions = question_tokens(input_ids, answers, ids["user"], ids["end"])
    marks = question_rows(input_ids, questions, ids["mark"])
    if keyed is not None:  # those turns' rows move from their "?" to their last key word
        keys = key_word_rows(input_ids, questions, marks, ids["keywords"])
        for b, turn in keyed.nonzero().tolist():
            if (marks[b] == turn).any():
                marks[b][marks[b] == turn] = -1
                marks[b][keys[b] == turn] = turn
        assert int((marks >= 0).sum()) == int((keys >= 0).sum())
    keywords = questions & torch.isin(input_ids, ids["keywords"])[:, None, :]
    expected = [
        reference(out.attentions[0], marks, mask, keywords, columns),
        reference(out.attentions[1], marks, mask, relevance, columns),
        reference(out.attentions[2], answers, mask, rows_as_targets(marks, questions.shape[1]), columns),
    ]
    assert [t.item() for t in terms] == pytest.approx(expected, rel=1e-5)
    assert min(expected) > 0.05  # an untrained model does not already attend where it is told to


def test_the_image_term_of_a_kind_reads_only_the_heads_it_is_given(eager):
    model, processor = eager
    batch, labels, samples = small_batch(processor)
    input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    relevance = turn_relevance(input_ids == model.config.image_token_id, [s.meta["turn_relevance"] for s in samples])
    number = model.config.text_config.num_attention_heads
    kind = samples[0].meta["turn_kinds"][0]
    heads = turn_heads(samples, {kind: [0, 2]}, relevance.shape[1], number)
    for row, sample in enumerate(samples):
        for turn, other in enumerate(sample.meta["turn_kinds"]):
            assert heads[row, turn].tolist() == ([True, False, True, False] if other == kind else [True] * 4)
    assert not heads.all() and heads[0, 0].sum() == 2 and number == 4
    ids = grounding_token_ids(processor.tokenizer)
    answers = answer_query_rows(labels)
    with torch.no_grad(), LayerInputCapture(model, 1) as capture:
        out = model(**batch, output_attentions=True)
        marks = question_rows(input_ids, question_tokens(input_ids, answers, ids["user"], ids["end"]), ids["mark"])
        chosen = attention_share_loss(capture, mask, mask, marks, relevance, heads=heads)
        every = attention_share_loss(capture, mask, mask, marks, relevance)
        all_heads = attention_share_loss(capture, mask, mask, marks, relevance, heads=torch.ones_like(heads))
    assert chosen.item() == pytest.approx(reference(out.attentions[1], marks, mask, relevance, heads=heads), rel=1e-5)
    assert all_heads.item() == pytest.approx(every.item(), rel=1e-6) and abs(chosen.item() - every.item()) > 1e-3
    for bad, message in (
        ({"counting": [4]}, r"kind_heads.counting=\[4\] must name some of the LLM's attention heads 0..3"),
        ({"colour": [0]}, r"kind_heads names unknown question kinds \['colour'\]"),
    ):
        with pytest.raises(CovipalError, match=message):
            pretrain(model, processor, PretrainRecipe(steps=1, batch_size=1, kind_heads=bad), progress=False)


def test_grounding_layer_without_a_layer_on_each_side_is_refused(tmp_path):
    directory = build_tiny(ArchitectureSpec(**{**SMALL_WORLD, "text_layers": 2}), tmp_path / "m")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(directory)
    processor = AutoProcessor.from_pretrained(directory)
    with pytest.raises(CovipalError, match="grounding_layer=1"):
        pretrain(model, processor, PretrainRecipe(steps=1, batch_size=1, grounding_layer=1), progress=False)
    log = pretrain(model, processor, PretrainRecipe(steps=1, batch_size=1, grounding_weight=0.0), progress=False)
    assert log[0]["grounding"] == 0.0 and log[0]["loss"] > 0  # without supervision any depth trains


def spread_reference(attentions, query_turn, spread, columns=None):
    """Per row with two or more `spread` columns, by loops: KL(uniform ‖ its mean attention renormalised over them)
    (0 for the other rows), summed over rows."""
    total = 0.0
    for b in range(attentions.shape[0]):
        cols = columns[b] if columns is not None else list(range(attentions.shape[-1]))
        for j, original in enumerate(cols):
            if original < 0 or query_turn[b, original] < 0:
                continue
            among = [k for k, c in enumerate(cols) if c >= 0 and spread[b, int(query_turn[b, original]), c]]
            if len(among) < 2:
                continue
            mean = attentions[b, :, j].mean(0)
            share = sum(float(mean[k]) for k in among)
            total += sum(math.log((1 / len(among)) / (float(mean[k]) / share + 1e-6)) for k in among) / len(among)
    return total


def eager_forward(model, batch, samples, drop: bool):
    """(outputs with attentions, the kept tokens or None, each row's original position or -1) of one forward,
    with the focus pruner dropping background tokens when `drop`."""
    if not drop:
        return model(**batch, output_attentions=True), None, None
    with PruningSession(model, FocusPruner(0.2, seed=1)) as session:
        session.extras = {"relevance": [s.meta["scene_relevance"] for s in samples]}
        out = model(**batch, output_attentions=True)
    kept = session.record.kept
    columns = [[int(i) if v else -1 for i, v in zip(ix, va)] for ix, va in zip(kept.index, kept.valid)]
    return out, kept, columns


@pytest.mark.parametrize("drop", [False, True])
def test_counting_rows_are_also_told_to_spread_over_their_objects(eager, drop):
    model, processor = eager
    rng = np.random.default_rng(2)
    samples = [image_sample(rng, "short", kinds=("counting", "existence"), turns=3) for _ in range(3)]
    assert {"counting", "existence"} <= {k for s in samples for k in s.meta["turn_kinds"]}
    batch = training_batch(processor, samples)
    labels = batch.pop("labels")
    input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    visual = input_ids == model.config.image_token_id
    relevance = turn_relevance(visual, [s.meta["turn_relevance"] for s in samples])
    spread = turn_relevance(visual, counted_tokens(samples, 64))  # the 8x8 base tile
    for sample, row in zip(samples, spread):
        for turn, kind in enumerate(sample.meta["turn_kinds"]):
            about = sample.meta["turn_relevance"][turn]
            assert int(row[turn].sum()) == (int(about[:64].sum()) if kind == "counting" else 0)
    ids = grounding_token_ids(processor.tokenizer)
    answers = answer_query_rows(labels)
    with torch.no_grad(), LayerInputCapture(model, 1) as capture:
        out, kept, columns = eager_forward(model, batch, samples, drop)
        questions = question_tokens(input_ids, answers, ids["user"], ids["end"])
        marks = question_rows(input_ids, questions, ids["mark"])
        with_spread = attention_share_loss(capture, mask, mask, marks, relevance, kept, spread)
        plain = attention_share_loss(capture, mask, mask, marks, relevance, kept)
    # rows with something to look at (an existence question answered "no" has no relevant tokens: no image term)
    rows = sum(int(relevance[b, int(marks[b, t])].any()) for b, t in (marks >= 0).nonzero().tolist())
    uneven = spread_reference(out.attentions[1], marks, spread, columns)
    assert uneven > 0.01  # some counting row counts two or more objects and an untrained model is uneven
    assert with_spread.item() == pytest.approx(plain.item() + uneven / rows, rel=1e-5)
    assert plain.item() == pytest.approx(reference(out.attentions[1], marks, mask, relevance, columns), rel=1e-5)


@pytest.mark.parametrize("drop", [False, True])
def test_counting_rows_target_the_first_token_and_one_token_per_counted_object(eager, drop):
    model, processor = eager
    rng = np.random.default_rng(4)
    samples = [image_sample(rng, "short", kinds=kinds, turns=3) for kinds in (["counting"], ["counting", "existence"])]
    batch = training_batch(processor, samples)
    labels = batch.pop("labels")
    input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    visual = input_ids == model.config.image_token_id
    relevance = turn_relevance(visual, [s.meta["turn_relevance"] for s in samples])
    targets, sink = count_sink_targets(samples, visual, batch["attention_mask"], relevance)
    counts = []
    for row, sample in enumerate(samples):
        first = int(mask[row].nonzero()[0])
        for turn, kind in enumerate(sample.meta["turn_kinds"]):
            if kind != "counting":
                assert torch.equal(targets[row, turn], relevance[row, turn]) and not sink[row, turn].any()
                continue
            objects = NUMBERS.index(sample.meta["turn_short_answers"][turn])
            marked = sink[row, turn].nonzero().squeeze(1).tolist()
            assert (
                len(marked) == objects + 1 and marked[0] == first and torch.equal(targets[row, turn], sink[row, turn])
            )
            assert (relevance[row, turn] | ~sink[row, turn])[first + 1 :].all()  # the others are counted tokens
            counts.append(objects)
    assert len(set(counts)) >= 2 and len(counts) < 6  # different counts occur, and other kinds too
    ids = grounding_token_ids(processor.tokenizer)
    answers = answer_query_rows(labels)
    with torch.no_grad(), LayerInputCapture(model, 1) as capture:
        out, kept, columns = eager_forward(model, batch, samples, drop)
        marks = question_rows(input_ids, question_tokens(input_ids, answers, ids["user"], ids["end"]), ids["mark"])
        loss = attention_share_loss(capture, mask, mask, marks, targets, kept, sink)
    rows = sum(int(targets[b, int(marks[b, t])].any()) for b, t in (marks >= 0).nonzero().tolist())
    expected = (
        reference(out.attentions[1], marks, mask, targets, columns)
        + spread_reference(out.attentions[1], marks, sink, columns) / rows
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    recipe = PretrainRecipe(count_sink=True, count_spread=True)
    with pytest.raises(CovipalError, match="count_sink and pretrain.count_spread are both true"):
        pretrain(model, processor, recipe, progress=False)


def test_unevenness_is_zero_when_even_and_cannot_be_lowered_by_looking_away():
    among = torch.tensor([[True, True, True, False], [True, False, False, False]])
    even = torch.tensor([[0.2, 0.2, 0.2, 0.4], [0.1, 0.2, 0.3, 0.4]])
    assert unevenness(even, among).tolist() == pytest.approx([0.0, 0.0], abs=1e-4)  # one column: nothing to spread
    uneven = torch.tensor([[0.5, 0.1, 0.1, 0.3], [0.1, 0.2, 0.3, 0.4]])
    expected = sum(math.log((1 / 3) / (p / 0.7)) for p in (0.5, 0.1, 0.1)) / 3
    assert unevenness(uneven, among)[0].item() == pytest.approx(expected, rel=1e-4) and expected > 0.1
    away = torch.tensor([[1e-9, 1e-9, 1e-9, 1.0], [0.1, 0.2, 0.3, 0.4]])
    assert unevenness(away, among)[0].item() == pytest.approx(0.0, abs=1e-4)  # no reward for looking away
