"""Pruned generation for a list of samples: the function the eval entry point and the Python API share."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from covipal.data.chat import processor_inputs, user_message
from covipal.data.sample import Sample
from covipal.models.loading import LoadedModel
from covipal.pruning.context import Pruner
from covipal.pruning.session import PruningSession


@dataclass
class Answer:
    text: str
    n_visual: int
    layer_visual_tokens: list[int]
    reserve_ratio: float
    prefill_seconds: float  # the prefill forward (vision, pruner, LLM), shared equally by the batch's samples
    pruner_seconds: float = 0.0  # of which in the pruner's selection (the PPM for CoViPAL), shared likewise
    generate_seconds: float = 0.0  # the whole generate() call, shared likewise
    relevant_kept: list[float] | None = None  # per LLM layer, the share of the question's relevant visual tokens
    #                                          it takes in (tiny world: from `Sample.relevance`; else None)


def build_prompt(processor, sample: Sample) -> str:
    return processor.apply_chat_template([user_message(sample)], add_generation_prompt=True)


def encode(processor, samples: list[Sample], device: torch.device, dtype: torch.dtype):
    """Processor outputs for a batch of samples of one kind, left-padded, on `device`."""
    batch = processor_inputs(processor, [build_prompt(processor, s) for s in samples], samples)
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


def answer_batch(
    loaded: LoadedModel, session: PruningSession, batch: list[Sample], max_new_tokens: int
) -> list[Answer]:
    """Greedy answers for one batch of samples of one kind, through an open pruning session."""
    model, processor = loaded.model, loaded.processor
    inputs = encode(processor, batch, loaded.device, next(model.parameters()).dtype)
    session.extras = {"relevance": [s.relevance for s in batch]}
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    record = session.record
    layers = record.layer_visual_tokens
    return [
        Answer(
            text=texts[row].strip(),
            n_visual=int(record.n_visual[row]),
            layer_visual_tokens=layers[:, row].tolist(),
            reserve_ratio=float(record.reserve_ratio[row]),
            prefill_seconds=record.prefill_seconds / len(batch),
            generate_seconds=seconds / len(batch),
            pruner_seconds=record.select_seconds / len(batch),
            relevant_kept=record.relevant_kept(row, batch[row].relevance),
        )
        for row in range(len(batch))
    ]


def generate_answers(
    loaded: LoadedModel,
    pruner: Pruner,
    samples: list[Sample],
    max_new_tokens: int = 16,
    batch_size: int = 1,
    progress: bool = True,
) -> list[Answer]:
    """Greedy answers with `pruner` installed; batches group samples of the same kind (image, video, text)."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].kind)
    batches, current = [], []
    for index in order:
        if current and (len(current) == batch_size or samples[current[0]].kind != samples[index].kind):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    answers: dict[int, Answer] = {}
    with PruningSession(loaded.model, pruner) as session:
        for indices in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
            for index, answer in zip(
                indices, answer_batch(loaded, session, [samples[i] for i in indices], max_new_tokens)
            ):
                answers[index] = answer
    return [answers[i] for i in range(len(samples))]
