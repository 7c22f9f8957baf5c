"""Attention supervision for pretraining the tiny model from scratch: three attention targets that lay out the path
from a question to the visual tokens it is about, so grounding is learned in CPU-minutes.

Without them a model trained from scratch barely learns to ground: among hundreds of visual tokens the gradient
reaching the few that matter is too diluted, and at deeper layers the visual tokens have already mixed with each
other. So, for every question of a training conversation (its *question row* is its last "?", or for the kinds
chosen, its last key word: "red" in "where is the red object?"):
  1. at layer l-1 the question row attends to its question's key words (colours, shapes, places, …);
  2. at layer l it attends to the visual tokens of the objects the question is about (a share of all its
     attention, not only of its attention to the image, so what it reads there reaches it);
  3. at layer l+1 the row that predicts the answer attends to its question row.
Each term is −log(the share of the row's attention, averaged over heads, that falls on its targets among the
allowed columns). Optionally (`answer_probe`) a fourth: the question row's output of layer l, read by the LM
head, predicts the first token of its short answer. The answer rows learn from the answer cross-entropy only;
the model's last token (what FastV reads) is not told where to look in the image. Attention rows are recomputed
from each layer's input (`pruning.scoring.attention_rows`), so this works on sdpa.
"""

from __future__ import annotations

import torch

from covipal.pruning.scoring import attention_rows
from covipal.pruning.sequence import Compaction
from covipal.tiny_world.oracle import relevance_positions
from covipal.training.layer_input import LayerInputCapture


def answer_query_rows(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] long: for the row that predicts the first token of a supervised answer, that answer's turn number
    (0, 1, …); -1 elsewhere."""
    supervised = labels != -100
    starts = supervised[:, 1:] & ~supervised[:, :-1]  # label position p starts an answer -> row p-1 predicts it
    rows = torch.zeros_like(supervised)
    rows[:, :-1] = starts
    turn = rows.long().cumsum(1) - 1
    return torch.where(rows, turn, torch.full_like(turn, -1))


def turn_relevance(visual: torch.Tensor, masks: list[list]) -> torch.Tensor:
    """[B, turns, T] bool: sequence positions of each turn's relevant visual tokens, from per-sample lists of
    masks over the sample's visual tokens (in order)."""
    turns = max(max((len(m) for m in masks), default=0), 1)
    per_turn = [[m[turn] if turn < len(m) else None for m in masks] for turn in range(turns)]
    return torch.stack([relevance_positions(visual, rows) for rows in per_turn], dim=1)


def question_tokens(input_ids: torch.Tensor, query_turn: torch.Tensor, user_id: int, end_id: int) -> torch.Tensor:
    """[B, turns, T] bool: for each answer row's turn, the tokens of the user message it answers (after the "user"
    role token, up to the message's end token; visual placeholders included — mask them as needed)."""
    turns = max(int(query_turn.max()) + 1, 1)
    out = torch.zeros(input_ids.shape[0], turns, input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
    for row, ids in enumerate(input_ids.tolist()):
        spans, start = [], None
        for position, token in enumerate(ids):
            if token == user_id:
                start = position + 1
            elif token == end_id and start is not None:
                spans.append((start, position))
                start = None
        for query in (query_turn[row] >= 0).nonzero().squeeze(1).tolist():
            before = [span for span in spans if span[1] < query]
            if before:
                out[row, int(query_turn[row, query]), before[-1][0] : before[-1][1]] = True
    return out


def attention_share_loss(
    capture: LayerInputCapture,
    key_mask: torch.Tensor,
    allowed: torch.Tensor,
    query_turn: torch.Tensor,
    targets: torch.Tensor,
    kept: Compaction | None = None,
    spread: torch.Tensor | None = None,
    heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over query rows (`query_turn` >= 0) of −log(share of the row's attention on the `allowed` columns,
    averaged over heads, that falls on its turn's `targets` columns). All [B, T] / [B, turns, T] arguments are in
    original sequence positions; `kept` maps them to the rows the LLM ran on when tokens were dropped.

    `spread` ([B, turns, T], e.g. one token per counted object) adds, for the turns that have two or more such
    tokens, KL(uniform ‖ the row's attention renormalised over them): the row attends to each counted object
    alike, so what it reads there depends on how many there are, not on which one it happened to find.

    `heads` ([B, turns, H] bool) averages each turn's row over those heads only (None: all heads)."""
    if kept is not None:
        key_mask, allowed = kept.gather_mask(key_mask), kept.gather_mask(allowed)
        query_turn = torch.where(kept.valid, kept.gather(query_turn), torch.full_like(kept.index, -1))
        index = kept.index[:, None, :].expand(-1, targets.shape[1], -1)
        targets = targets.gather(2, index) & kept.valid[:, None, :]
        if spread is not None:
            spread = spread.gather(2, index) & kept.valid[:, None, :]
    width = int((query_turn >= 0).sum(1).max())
    if width == 0:
        return capture.hidden.new_zeros(())
    order = torch.sort((query_turn < 0).to(torch.int8), dim=1, stable=True).indices[:, :width]
    turns = query_turn.gather(1, order)  # [B, Q], -1 = padding
    per_row = turns.clamp(min=0)[..., None].expand(-1, -1, targets.shape[2])
    wanted = targets.gather(1, per_row)  # [B, Q, T]
    valid = (turns >= 0) & wanted.any(-1)
    probabilities = attention_rows(capture.layer, capture.hidden, capture.position_embeddings, key_mask, order)
    if heads is None:
        mean = probabilities.mean(1)  # [B, Q, T]
    else:
        chosen = heads.gather(1, turns.clamp(min=0)[..., None].expand(-1, -1, heads.shape[2])).to(probabilities.dtype)
        mean = torch.einsum("bhqt,bqh->bqt", probabilities, chosen) / chosen.sum(-1, keepdim=True).clamp(min=1)
    on_allowed = (mean * allowed[:, None, :]).sum(-1)
    on_targets = (mean * (wanted & allowed[:, None, :])).sum(-1)
    losses = -torch.log(on_targets / on_allowed.clamp(min=1e-12) + 1e-6)
    if spread is not None:
        losses = losses + unevenness(mean, spread.gather(1, per_row))
    return (losses * valid).sum() / valid.sum().clamp(min=1)


def unevenness(attention: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """[...]: KL(uniform ‖ `attention` renormalised over the `among` columns) per row ([..., T] each), 0 where
    fewer than two columns are marked. Renormalised before the log, so it stays >= 0 however little attention
    reaches those columns (it cannot be lowered by looking away from them)."""
    number = among.sum(-1).clamp(min=1).to(attention.dtype)
    renormalised = attention / (attention * among).sum(-1, keepdim=True).clamp(min=1e-12)
    uneven = -((renormalised + 1e-6).log() * among).sum(-1) / number - number.log()
    return torch.where(number > 1, uneven, torch.zeros_like(uneven))


def question_rows(input_ids: torch.Tensor, questions: torch.Tensor, mark_id: int) -> torch.Tensor:
    """[B, T] long: at each turn's last `mark_id` ("?") inside its question, that turn's number; -1 elsewhere."""
    rows = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
    marks = questions & (input_ids == mark_id)[:, None, :]
    for row, turn in marks.any(-1).nonzero().tolist():
        rows[row, int(marks[row, turn].nonzero()[-1])] = turn
    return rows


def key_word_rows(
    input_ids: torch.Tensor, questions: torch.Tensor, marks: torch.Tensor, keywords: torch.Tensor
) -> torch.Tensor:
    """[B, T] long: at each turn's last key word before its question's last "?" (`marks`, from `question_rows`),
    that turn's number; -1 elsewhere (and for a turn whose question names no key word). A colour word's row then
    finds objects by colour and a place word's row by place, whatever the question asks of them, so different
    lookups happen at different rows instead of all at the "?"."""
    keys = questions & torch.isin(input_ids, keywords.to(input_ids.device))[:, None, :]
    rows = torch.full_like(marks, -1)
    for row, position in (marks >= 0).nonzero().tolist():
        turn = int(marks[row, position])
        before = keys[row, turn, :position].nonzero()
        if len(before):
            rows[row, int(before[-1])] = turn
    return rows


def rows_as_targets(rows: torch.Tensor, turns: int) -> torch.Tensor:
    """[B, turns, T] bool: each turn's row of `rows` ([B, T] turn numbers) as that turn's only target."""
    positions = torch.arange(turns, device=rows.device)[None, :, None]
    return rows[:, None, :] == positions


def grounding_losses(
    captures: tuple[LayerInputCapture, LayerInputCapture, LayerInputCapture],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_rows: torch.Tensor,
    relevance: torch.Tensor,
    ids: dict[str, object],
    kept: Compaction | None = None,
    probe=None,
    spread: torch.Tensor | None = None,
    keyed: torch.Tensor | None = None,
    heads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The three terms (key words, image, question row) for captures at layers l-1, l, l+1. `ids` holds the
    token ids of "user", the message end, "?" and a tensor of key-word ids. With `probe` = (LM head on hidden
    states, [B, turns] answer token ids, -1 = none), a fourth: the cross-entropy of each question row's output of
    layer l (the input captured at l+1), read by the head, against its turn's answer token. `spread`: tokens over which
    the image term also asks each turn's row to spread its attention evenly (see `attention_share_loss`). `keyed`
    ([B, turns] bool): the turns whose question row is their last key word (`key_word_rows`) instead of their last
    "?"; the probe skips them. `heads` ([B, turns, H] bool): the heads whose attention the image term reads for
    each turn (None: all)."""
    questions = question_tokens(input_ids, answer_rows, ids["user"], ids["end"])
    marks = question_rows(input_ids, questions, ids["mark"])
    if keyed is not None and bool(keyed.any()):
        keys = key_word_rows(input_ids, questions, marks, ids["keywords"])
        on_key = (keys >= 0) & keyed.gather(1, keys.clamp(min=0))
        on_mark = (marks >= 0) & ~keyed.gather(1, marks.clamp(min=0))
        marks = torch.where(on_key, keys, torch.where(on_mark, marks, torch.full_like(marks, -1)))
        if probe is not None:
            probe = (probe[0], torch.where(keyed[:, : probe[1].shape[1]], -1, probe[1]))
    keywords = questions & torch.isin(input_ids, ids["keywords"])[:, None, :]
    read = attention_share_loss(captures[0], attention_mask, attention_mask, marks, keywords, kept)
    look = attention_share_loss(captures[1], attention_mask, attention_mask, marks, relevance, kept, spread, heads)
    targets = rows_as_targets(marks, questions.shape[1])
    recall = attention_share_loss(captures[2], attention_mask, attention_mask, answer_rows, targets, kept)
    if probe is None:
        return read, look, recall
    head, answers = probe  # (hidden -> logits, [B, turns] first token id of each turn's short answer, -1 = none)
    rows = marks
    if kept is not None:
        rows = torch.where(kept.valid, kept.gather(marks), torch.full_like(kept.index, -1))
    batch, position = (rows >= 0).nonzero(as_tuple=True)
    turn = rows[batch, position]
    target = answers[batch, turn.clamp(max=answers.shape[1] - 1)]
    target = torch.where(turn < answers.shape[1], target, torch.full_like(target, -1))
    batch, position, target = batch[target >= 0], position[target >= 0], target[target >= 0]
    if len(target) == 0:
        return read, look, recall
    logits = head(captures[2].hidden[batch, position])
    answer = torch.nn.functional.cross_entropy(logits.float(), target)
    return read, look, recall, answer
