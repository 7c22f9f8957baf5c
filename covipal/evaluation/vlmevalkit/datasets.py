"""Benchmarks as VLMEvalKit dataset objects, built offline from the data root (`$LMUData`).

VLMEvalKit reads a local `<NAME>.tsv` with option columns as a multiple-choice set by itself; the rest needs help:
a yes/no set is registered with an empty download URL, short-answer sets get an exact-match scorer (VLMEvalKit's
custom VQA set has none), and a local video multiple-choice set is a small `VideoBaseDataset` subclass (VLMEvalKit
has no generic one). Official benchmarks are built by VLMEvalKit's `build_dataset` once their files are present.
"""

from __future__ import annotations

import os.path as osp
from pathlib import Path

import pandas as pd
from vlmeval.dataset import DATASET_CLASSES, build_dataset, supported_video_datasets
from vlmeval.dataset.image_mcq import CustomMCQDataset
from vlmeval.dataset.image_vqa import CustomVQADataset
from vlmeval.dataset.image_yorn import ImageYORNDataset
from vlmeval.dataset.utils.multiple_choice import report_acc
from vlmeval.dataset.video_base import VideoBaseDataset
from vlmeval.smp import LMUDataRoot, dump, get_intermediate_file_path, load
from vlmeval.utils.matching_util import can_infer

from covipal.errors import CovipalError
from covipal.evaluation.scoring import normalise
from covipal.evaluation.vlmevalkit.prompts import question_text


def _score(data: pd.DataFrame, eval_file: str) -> pd.DataFrame:
    """Accuracy (fraction) overall and per category from a `hit` column; written next to the predictions."""
    accuracy = report_acc(data)
    dump(data, get_intermediate_file_path(eval_file, "_exact_matching_result"))
    dump(accuracy, get_intermediate_file_path(eval_file, "_acc", "csv"))
    return accuracy


class ExactMatchVQA(CustomVQADataset):
    """A local short-answer set scored by exact match of the normalised answer (lower case, no punctuation)."""

    def evaluate(self, eval_file, **judge_kwargs):
        data = load(eval_file)
        data["hit"] = [normalise(str(p)) == normalise(str(a)) for p, a in zip(data["prediction"], data["answer"])]
        return _score(data, eval_file)


class LocalVideoMCQ(VideoBaseDataset):
    """A local video multiple-choice set: `<root>/<NAME>.tsv` (index, video, question, A.., answer, category)
    with the videos at `<root>/videos/<NAME>/<video>.mp4`; scored by the option letter in the answer."""

    TYPE = "Video-MCQ"
    NAMES: list[str] = []

    @classmethod
    def supported_datasets(cls):
        return list(cls.NAMES)

    def prepare_dataset(self, dataset):
        root = LMUDataRoot()
        return {"root": osp.join(root, "videos", dataset), "data_file": osp.join(root, f"{dataset}.tsv")}

    INSTRUCTION = "Answer with the option's letter from the given choices directly."

    def build_prompt(self, line, video_llm=True):
        """For models without their own prompt (covipal's `PrunedVLM` builds its own): the video file, or its
        `nframe` frames as images, then the question, its options and a generic instruction."""
        if isinstance(line, int):
            line = self.data.iloc[line]
        video = str(line["video"])
        if video_llm:
            media = [{"type": "video", "value": osp.join(self.data_root, f"{video}.mp4")}]
        else:
            media = [{"type": "image", "value": path} for path in self.save_video_frames(video)]
        return [*media, {"type": "text", "value": question_text(line, self.TYPE, {"mcq": self.INSTRUCTION})}]

    def evaluate(self, eval_file, **judge_kwargs):
        data = load(eval_file)
        letters = [c for c in "ABCDEFGHIJ" if c in data]
        hits = []
        for _, row in data.iterrows():
            choices = {c: row[c] for c in letters if not pd.isna(row[c]) and str(row[c]) != ""}
            hits.append(can_infer(str(row["prediction"]), choices) == row["answer"])
        data["hit"] = hits
        return _score(data, eval_file)


def register_local_sets(yes_no: list[str], video_mcq: list[str]) -> None:
    """Make VLMEvalKit treat these local names as yes/no and as video multiple-choice sets."""
    for name in yes_no:
        ImageYORNDataset.DATASET_URL.setdefault(name, "")  # no URL and no MD5: the local TSV is used as is
    for name in video_mcq:
        if name not in LocalVideoMCQ.NAMES:
            LocalVideoMCQ.NAMES.append(name)
    if LocalVideoMCQ not in DATASET_CLASSES:
        DATASET_CLASSES.append(LocalVideoMCQ)


def check_available(name: str, kind: str) -> None:
    """Stop in one line when an image benchmark's TSV is not in the data root (VLMEvalKit would download it)."""
    root = Path(LMUDataRoot())
    if kind == "video_mcq" or (kind == "official" and name in supported_video_datasets):
        return
    tsv = root / f"{name}.tsv"
    if not tsv.is_file():
        raise CovipalError(
            f"benchmark {name}: {tsv} is missing (data root {root}); put the VLMEvalKit TSV there or set "
            f"data_root=/path/with/{name}.tsv"
        )


def open_benchmark(name: str, kind: str, nframe: int = 8):
    """The VLMEvalKit dataset object for `name` under the current `$LMUData`. `kind`: `mcq`, `yes_no`, `vqa` and
    `video_mcq` are local sets built here; `official` is any benchmark VLMEvalKit knows by name."""
    check_available(name, kind)
    if kind == "video_mcq":
        return LocalVideoMCQ(dataset=name, nframe=nframe)
    if kind == "official" and name in supported_video_datasets:
        try:
            return supported_video_datasets[name]()
        except Exception as error:  # VLMEvalKit fetches a missing video set from the hub
            raise CovipalError(
                f"benchmark {name}: its videos are not available offline (VLMEvalKit tried to fetch them: "
                f"{type(error).__name__}); put them where VLMEvalKit keeps them for data root {LMUDataRoot()}"
            ) from None
    if kind == "vqa":
        return ExactMatchVQA(dataset=name)
    if kind == "mcq":
        return CustomMCQDataset(dataset=name)
    if kind == "yes_no":
        return ImageYORNDataset(dataset=name)
    dataset = build_dataset(name)
    if dataset is None:
        raise CovipalError(f"benchmark {name}: VLMEvalKit could not read it from {LMUDataRoot()}")
    return dataset
