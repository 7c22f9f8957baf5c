"""Training conversations: what every data source yields and what the trainers' collator batches.

Truncation rule (max length, 3000 in the paper's setting): a conversation keeps its first `max_length` tokens.
Only text is ever cut — the tokens after the last visual token; images and videos are never cut. A sample whose
visual tokens alone end beyond `max_length` is an error that names it, because cutting into an image would
change what the PPM is trained on (lower the anyres maximum or the frame count, or raise the length).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from covipal.data.sample import Sample
from covipal.errors import CovipalError


@dataclass
class Conversation:
    """Question/answer turns about the visual input, which goes with the first question."""

    turns: list[tuple[str, str]]
    images: list = field(default_factory=list)
    video: np.ndarray | None = None  # [F, H, W, 3] uint8
    id: str = ""
    skipped: list[str] = field(default_factory=list)  # unreadable samples this one stands in for

    def messages(self) -> list[dict]:
        """Chat messages in transformers' format."""
        visual = [{"type": "image"}] * len(self.images) + ([{"type": "video"}] if self.video is not None else [])
        messages = []
        for index, (question, answer) in enumerate(self.turns):
            content = (visual if index == 0 else []) + [{"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages


def from_sample(sample: Sample) -> Conversation:
    """A tiny-world sample (its question, then any further turns in `meta["turns"]`) as a conversation."""
    turns = [(sample.question, sample.answer or ""), *sample.meta.get("turns", [])]
    return Conversation(turns=turns, images=list(sample.images), video=sample.video, id=str(sample.meta.get("id", "")))


def answer_labels(input_ids: torch.Tensor, start_id: int, assistant_id: int, end_id: int) -> torch.Tensor:
    """Labels that keep only the assistant turns' tokens (answer and its end token); -100 elsewhere."""
    labels = torch.full_like(input_ids, -100)
    for row, ids in enumerate(input_ids.tolist()):
        inside = False
        for position, token in enumerate(ids):
            if inside:
                labels[row, position] = token
                inside = token != end_id
            elif token == assistant_id and position > 0 and ids[position - 1] == start_id:
                inside = True
    return labels


SKIPPED = "skipped_samples"  # batch key: unreadable samples replaced in this batch (not a model input)
PROMPT_MASK = "prompt_mask"  # batch key: [B, T] bool, the tokens the PPM may read (not a model input)


def turn_token_ids(tokenizer) -> tuple[int, int]:
    """The chat template's turn start and end tokens (`<|im_start|>`, `<|im_end|>` in the ChatML templates of
    LLaVA-OneVision, Qwen2.5-VL and the tiny models)."""
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", tokenizer.eos_token])
    return start, end


def generation_prompt_ids(processor) -> list[int]:
    """Token ids of the chat template's generation prompt (`<|im_start|>assistant` + its separator): the text
    that inference appends to a question and after which the first answer begins."""
    message = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    closed = processor.apply_chat_template(message, tokenize=False)
    opened = processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    if not opened.startswith(closed) or opened == closed:
        raise CovipalError("the chat template's generation prompt is not a suffix of a closed user turn")
    return processor.tokenizer(opened[len(closed) :], add_special_tokens=False)["input_ids"]


def prompt_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, header: list[int]) -> torch.Tensor:
    """[B, T] bool: each row's real tokens up to and including its first generation prompt `header` — the first
    question's prompt exactly as inference gives it, before any answer. A row without the header (no answer)
    is all prompt."""
    real = attention_mask.bool()
    length, width = input_ids.shape[1], len(header)
    if length < width:
        return real
    windows = input_ids.unfold(1, width, 1)  # [B, T - width + 1, width]
    found = (windows == torch.tensor(header, device=input_ids.device)).all(-1)
    end = torch.where(
        found.any(1), found.long().argmax(1) + width, torch.full_like(found[:, 0], length, dtype=torch.long)
    )
    return real & (torch.arange(length, device=input_ids.device)[None, :] < end[:, None])


class TrainingCollator:
    """Conversations → one left-padded processor batch with answer-only `labels`, truncated to `max_length`.

    What the PPM may read is the prompt of the first question, as inference gives it (DESIGN.md): with
    `prompt_only` each row *is* that prompt (`<|im_start|>user <image> question <|im_end|> <|im_start|>assistant`,
    no answer anywhere in the batch: stage 1); with `mark_prompt` rows hold the whole conversation and
    `batch[PROMPT_MASK]` marks the prompt's tokens (stage 2: the LLM reads the answers, the PPM only the prompt).
    Every visual input goes with the first question, so all visual tokens are inside the prompt."""

    def __init__(
        self,
        processor,
        max_length: int | None = 3000,
        labels: bool = True,
        prompt_only: bool = False,
        mark_prompt: bool = False,
    ):
        if prompt_only and (labels or mark_prompt):
            raise ValueError("a prompt-only batch has no answers to label or mark")
        self.processor = processor
        self.max_length = max_length
        self.labels = labels
        self.prompt_only = prompt_only
        self.mark_prompt = mark_prompt
        tokenizer = processor.tokenizer
        start, end = turn_token_ids(tokenizer)
        self._label_ids = (start, tokenizer.convert_tokens_to_ids("assistant"), end)
        self._header = generation_prompt_ids(processor) if mark_prompt else None
        self._visual_ids = [
            tokenizer.convert_tokens_to_ids(getattr(processor, name))
            for name in ("image_token", "video_token")
            if getattr(processor, name, None)
        ]

    def __call__(self, conversations: list[Conversation]) -> dict:
        if self.prompt_only:
            texts = [
                self.processor.apply_chat_template(c.messages()[:1], tokenize=False, add_generation_prompt=True)
                for c in conversations
            ]
        else:
            texts = [self.processor.apply_chat_template(c.messages(), tokenize=False) for c in conversations]
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
        images = [image for c in conversations for image in c.images]
        videos = [c.video for c in conversations if c.video is not None]
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
        batch = dict(self.processor(**kwargs))
        batch[SKIPPED] = sum(len(c.skipped) for c in conversations)
        if self.labels:
            batch["labels"] = answer_labels(batch["input_ids"], *self._label_ids)
        if self.max_length is not None and batch["attention_mask"].sum(1).max() > self.max_length:
            batch = self._truncate(batch, conversations)
        if self.mark_prompt:
            batch[PROMPT_MASK] = prompt_mask(batch["input_ids"], batch["attention_mask"], self._header)
            visual = torch.isin(batch["input_ids"], torch.tensor(self._visual_ids)) & batch["attention_mask"].bool()
            outside = (visual & ~batch[PROMPT_MASK]).any(1)
            if bool(outside.any()):
                row = int(outside.nonzero()[0])
                raise CovipalError(
                    f"sample {conversations[row].id or row}: visual tokens after its first answer; every image or "
                    "video must go with the first question"
                )
        return batch

    def _truncate(self, batch: dict, conversations: list[Conversation]) -> dict:
        """Keep each row's first `max_length` real tokens (left padding kept); text only is cut."""
        mask = batch["attention_mask"].bool()
        visual = torch.isin(batch["input_ids"], torch.tensor(self._visual_ids))
        sequences = {key: batch[key] for key in ("input_ids", "attention_mask", "labels") if key in batch}
        rows = {key: [] for key in sequences}
        for row in range(mask.shape[0]):
            real = mask[row].nonzero().squeeze(1)
            keep = real[: self.max_length]
            visual_positions = (visual[row] & mask[row]).nonzero().squeeze(1)
            if len(visual_positions) and visual_positions[-1] > keep[-1]:
                raise CovipalError(
                    f"sample {conversations[row].id or row}: its visual tokens end at token "
                    f"{int((real <= visual_positions[-1]).sum())}, beyond max_length={self.max_length}; raise "
                    "data.max_length or lower the anyres maximum / frame count"
                )
            for key, tensor in sequences.items():
                rows[key].append(tensor[row, keep])
        width = max(len(r) for r in rows["input_ids"])
        pads = {"input_ids": self.processor.tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
        for key, values in rows.items():
            batch[key] = torch.stack(
                [torch.cat([torch.full((width - len(v),), pads[key], dtype=v.dtype), v]) for v in values]
            )
        return batch
