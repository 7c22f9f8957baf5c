"""Benchmark rows as text: the question, for multiple choice its lettered options, then an instruction."""

from __future__ import annotations

import pandas as pd

# VLMEvalKit's dataset types that get our prompt (the question, lettered options, the model's instruction)
PROMPT_TYPES = ("MCQ", "Y/N", "VQA", "Video-MCQ")


def option_letters(line) -> list[str]:
    """The option columns (A, B, …) a benchmark row fills, in order."""
    letters = []
    for letter in "ABCDEFGHIJ":
        value = line.get(letter) if hasattr(line, "get") else None
        if value is None or (isinstance(value, float) and pd.isna(value)) or str(value) == "":
            break
        letters.append(letter)
    return letters


def question_text(line, kind: str, prompts: dict) -> str:
    """The text of one benchmark row as the model was trained to read it: the question, for multiple choice its
    lettered options, then the model's instruction for that answer format (`prompts`: mcq, yes_no, short)."""
    question = str(line["question"])
    hint = line.get("hint")
    if hint is not None and not (isinstance(hint, float) and pd.isna(hint)) and str(hint):
        question = f"Hint: {hint}\n{question}"
    if kind in ("MCQ", "Video-MCQ"):
        options = [f"{letter}. {line[letter]}" for letter in option_letters(line)]
        return "\n".join([question, *options, prompts["mcq"]])
    return f"{question}\n{prompts['yes_no' if kind == 'Y/N' else 'short']}"
