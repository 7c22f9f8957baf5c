"""The PPM never sees an answer: in stage 1 and stage 2, for single- and multi-turn conversations, changing every
answer leaves what the PPM reads and scores bit-identical, and what it reads is what inference gives it."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny, random_image
from pruning_helpers import small_ppm

from covipal.data.conversation import PROMPT_MASK, Conversation, TrainingCollator, turn_token_ids
from covipal.data.sample import Sample
from covipal.inference import encode
from covipal.models.ppm import PPMClassifier
from covipal.pruning.covipal import CoViPALPruner
from covipal.pruning.session import PruningSession
from covipal.training.stage1 import Stage1Settings, Stage1Task
from covipal.training.stage2 import Stage2Settings, Stage2Task

QUESTIONS = [["what colour is it?"], ["how many are there?", "where is it?"]]
ANSWERS = (["red", "two"], ["a blue square at the top", "no"])  # every answer differs, also in length


def conversations(turns: int, answers: list[str]) -> list[Conversation]:
    return [
        Conversation(list(zip(QUESTIONS[turns - 1], answers)), images=[random_image(seed, 40 + 24 * seed, 56)])
        for seed in range(2)
    ]


class Seen:
    """What a PPM receives and returns on each call."""

    def __init__(self, ppm: PPMClassifier):
        self.inputs, self.outputs = [], []
        self.handle = ppm.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        self.inputs.append(args[0].detach().clone())
        self.outputs.append(output.detach().clone())


@pytest.mark.parametrize("turns", [1, 2])
def test_stage2_answers_never_reach_the_ppm(tiny_dir, processor, turns):
    model = load_tiny(tiny_dir)
    ppm = small_ppm(model)
    task = Stage2Task(model, ppm, Stage2Settings())
    seen = Seen(ppm)
    collate = TrainingCollator(processor, mark_prompt=True)
    for answers in ANSWERS:
        batch = collate(conversations(turns, answers))
        batch.pop("skipped_samples")
        task.loss(ppm, batch)
    assert not torch.equal(*[collate(conversations(turns, a))["input_ids"][:, -4:] for a in ANSWERS])
    assert torch.equal(seen.inputs[0], seen.inputs[1]) and torch.equal(seen.outputs[0], seen.outputs[1])


@pytest.mark.parametrize("turns", [1, 2])
def test_stage1_batches_hold_no_answer(tiny_dir, processor, turns):
    model = load_tiny(tiny_dir)
    ppm = small_ppm(model)
    settings = Stage1Settings(guidance_layer=2, query_rows="question", reduce="max")
    task = Stage1Task(model, ppm, settings, free_unused=False, turn_ids=turn_token_ids(processor.tokenizer))
    seen = Seen(ppm)
    collate = TrainingCollator(processor, labels=False, prompt_only=True)
    batches = [collate(conversations(turns, answers)) for answers in ANSWERS]
    for batch in batches:
        batch.pop("skipped_samples")
        task.loss(ppm, batch)
    assert all(torch.equal(batches[0][key], batches[1][key]) for key in batches[0])
    assert torch.equal(seen.outputs[0], seen.outputs[1])


def test_the_ppm_reads_in_training_what_it_reads_at_inference(tiny_dir, processor):
    """One single-turn sample: stage 1's row, stage 2's marked prompt and inference's prompt are the same tokens,
    and stage 2's PPM input is the pruner's at inference."""
    image = random_image(3, 64, 96)
    conversation = Conversation([("what colour is it?", "red")], images=[image])
    inference = encode(processor, [Sample("what colour is it?", images=[image])], torch.device("cpu"), torch.float32)
    only = TrainingCollator(processor, labels=False, prompt_only=True)([conversation])
    marked = TrainingCollator(processor, mark_prompt=True)([conversation])
    assert torch.equal(only["input_ids"], inference["input_ids"])
    assert torch.equal(only["pixel_values"], inference["pixel_values"])
    assert torch.equal(marked["input_ids"][marked[PROMPT_MASK]], inference["input_ids"][0])
    answer = marked["labels"] != -100
    assert answer.any() and not (answer & marked[PROMPT_MASK]).any()

    model = load_tiny(tiny_dir)
    ppm = small_ppm(model)
    seen = Seen(ppm)
    marked.pop("skipped_samples")
    Stage2Task(model, ppm, Stage2Settings()).loss(ppm, marked)
    pruner = CoViPALPruner(0.25, classifier="random")
    pruner.ppm = ppm
    with torch.no_grad(), PruningSession(model, pruner):
        model(**inference)
    assert torch.equal(seen.inputs[0], seen.inputs[1]) and torch.equal(seen.outputs[0], seen.outputs[1])


def test_the_prompt_mask_ends_at_the_first_generation_prompt(processor):
    conversation = Conversation([("how many?", "two"), ("where?", "left")], images=[random_image(0, 32, 32)])
    batch = TrainingCollator(processor, max_length=None, mark_prompt=True)([conversation])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][batch[PROMPT_MASK]])
    assert tokens[:2] == ["<|im_start|>", "user"] and set(tokens[2:-6]) == {"<image>"}
    assert tokens[-6:] == ["how", "many", "?", "<|im_end|>", "<|im_start|>", "assistant"]
