"""Our model, processor and pruner as a VLMEvalKit model, so VLMEvalKit's own inference and scoring run it.

VLMEvalKit calls `generate(message, dataset)` one question at a time; each call runs `generate_answers` (the
function the rest of covipal uses) on one sample, on whatever device and dtype the model was loaded with, and
appends what the pruner did (visual tokens per LLM layer, achieved reserve ratio, prefill and pruner time) to a
JSON-lines file per benchmark and rank, so a resumed run still has the statistics of the questions it skips.
"""

from __future__ import annotations

import hashlib
import json
import os.path as osp
from functools import partial
from pathlib import Path

from PIL import Image
from vlmeval.vlm.base import BaseModel

from covipal.data.sample import Sample
from covipal.data.sources import sample_frames
from covipal.evaluation.heatmap import save_heatmap
from covipal.evaluation.vlmevalkit.prompts import PROMPT_TYPES, question_text
from covipal.evaluation.vlmevalkit.unreadable import (
    DECODE_ERRORS,
    UnreadableMedia,
    read_or_raise,
    report,
)
from covipal.inference import answer_batch
from covipal.models.loading import LoadedModel
from covipal.pruning.context import Pruner
from covipal.pruning.session import PruningSession


class PrunedVLM(BaseModel):
    """A model of a supported family with a pruner installed, as a VLMEvalKit model (images and video)."""

    INTERLEAVE = True
    VIDEO_LLM = True  # videos arrive as files; frames are sampled here (`nframe` uniformly over the video)

    def __init__(
        self,
        loaded: LoadedModel,
        pruner: Pruner,
        prompts: dict,
        max_new_tokens: int = 16,
        nframe: int = 8,
    ):
        super().__init__()
        self.loaded, self.pruner, self.prompts = loaded, pruner, dict(prompts)
        self.max_new_tokens, self.nframe = max_new_tokens, nframe
        self.fps = None
        self.stats_file: Path | None = None  # where each answer's statistics are appended (set per benchmark)
        self.dataset_types: dict[str, str] = {}  # benchmark name -> VLMEvalKit dataset type, set by the runner
        self.relevance = None  # optional: message -> relevance mask (the oracle pruner on the tiny world)
        self.session: PruningSession | None = None
        self.heatmaps = 0  # kept-token heat maps to draw per benchmark (single-image questions), into heatmap_dir
        self.heatmap_dir: Path | None = None
        self._drawn: dict[str, int] = {}
        self._row_index = None  # the benchmark row being answered (set by build_prompt)
        self._unreadable: UnreadableMedia | None = None  # why the row being answered has no image, if it has none

    @classmethod
    def for_run(cls, loaded: LoadedModel, pruner: Pruner, max_new_tokens: int | None = None) -> PrunedVLM:
        """With the model's own evaluation settings (`model.evaluation`: prompts, frames, answer length)."""
        settings = loaded.evaluation or {}
        return cls(
            loaded,
            pruner,
            settings.get("prompts", {}),
            max_new_tokens=max_new_tokens or settings.get("max_new_tokens", 16),
            nframe=settings.get("video_frames", 8),
        )

    # -- prompts ------------------------------------------------------------------------------------------------
    def use_custom_prompt(self, dataset) -> bool:
        return self.dataset_types.get(dataset) in PROMPT_TYPES

    def build_prompt(self, line, dataset=None, video_llm: bool = True) -> list[dict]:
        # VLMEvalKit builds each row's prompt just before it asks for the answer: the row's index goes with it
        self._row_index = line.get("index")
        if isinstance(dataset, str):  # image benchmarks pass the name
            kind = self.dataset_types[dataset]
            media = [{"type": "image", "value": path} for path in self.dump_image(line, dataset)]
        else:  # video benchmarks pass the dataset object
            kind = self.dataset_types[dataset.dataset_name]
            media = [{"type": "video", "value": osp.join(dataset.data_root, f"{line['video']}.mp4")}]
        return [*media, {"type": "text", "value": question_text(line, kind, self.prompts)}]

    def guard_media(self, dump_image, data_file):
        """The benchmark's `dump_image(line)` (decodes a row's embedded images to files) made to note a row whose
        image cannot be decoded, naming `data_file`, and give it no image: that row is then answered with nothing
        and counted, instead of stopping the run."""

        def guarded(line):
            self._row_index, self._unreadable = line.get("index"), None
            try:
                return dump_image(line)
            except DECODE_ERRORS as error:
                self._unreadable = UnreadableMedia(data_file, error)
                return []

        return guarded

    # -- answering ----------------------------------------------------------------------------------------------
    def sample(self, message: list[dict]) -> Sample:
        """The question as a `Sample`; `UnreadableMedia` when one of its image or video files cannot be read."""
        rgb = lambda path: Image.open(path).convert("RGB")  # noqa: E731
        images = [read_or_raise(rgb, item["value"]) for item in message if item["type"] == "image"]
        videos = [item["value"] for item in message if item["type"] == "video"]
        text = "\n".join(item["value"] for item in message if item["type"] == "text")
        video = read_or_raise(lambda path: sample_frames(path, self.nframe), videos[0]) if videos else None
        sample = Sample(text, images=images, video=video)
        if self.relevance is not None:
            sample.relevance = self.relevance(message)
        return sample

    def __enter__(self) -> PrunedVLM:
        """Install the pruner for the whole evaluation: one session, so a seeded pruner's draws run on across
        questions (a session per question would replay the same draws for every question)."""
        self.session = PruningSession(self.loaded.model, self.pruner).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.session.__exit__(*exc)
        self.session = None

    def draw_heatmap(self, message, sample: Sample, answer, dataset) -> None:
        drawn = self._drawn.get(dataset, 0)
        if drawn >= self.heatmaps:
            return
        self._drawn[dataset] = drawn + 1
        stem = Path(next(item["value"] for item in message if item["type"] == "image")).stem
        title = f"{sample.question.splitlines()[0]} -> {answer.text}   r={answer.reserve_ratio:.3f}"
        kept = self.session.record.visual_kept(0).cpu().numpy()
        save_heatmap(
            self.loaded.model,
            self.loaded.processor,
            sample.images[0],
            kept,
            self.heatmap_dir / str(dataset) / f"{stem}.png",
            title,
        )

    def generate_inner(self, message, dataset=None) -> str:
        if self.session is None:  # built by VLMEvalKit's registry: the session stays installed from here on
            self.__enter__()
        index, self._row_index = self._row_index, None
        index = index.item() if hasattr(index, "item") else index  # numpy scalars as plain JSON numbers
        failure, self._unreadable = self._unreadable, None
        try:
            if failure is not None:
                raise failure
            sample = self.sample(message)
        except UnreadableMedia as unreadable:
            report(dataset, index, unreadable)
            self.record(message, {"index": index, "prediction": "", "unreadable": str(unreadable)})
            return ""
        answer = answer_batch(self.loaded, self.session, [sample], self.max_new_tokens)[0]
        if self.heatmaps and self.heatmap_dir is not None and len(sample.images) == 1:
            self.draw_heatmap(message, sample, answer, dataset)
        row = {"index": index, "prediction": answer.text}
        row.update({k: v for k, v in vars(answer).items() if k != "text"})
        self.record(message, row)
        return answer.text

    def record(self, message, row: dict) -> None:
        """Append one answer's statistics to the benchmark's file, keyed by the question's message."""
        if self.stats_file is None:
            return
        key = hashlib.sha1(json.dumps(message, sort_keys=True, default=str).encode()).hexdigest()
        self.stats_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.stats_file, "a") as handle:
            handle.write(json.dumps({"key": key, **row}) + "\n")


def from_config(*overrides: str) -> PrunedVLM:
    """A `PrunedVLM` built from covipal's configs, e.g. `from_config("pruner=fastv", "pruner.reserve_ratio=0.25")`
    (what the registry entry builds)."""
    from covipal.api import build_model, build_pruner, compose

    cfg = compose("eval", list(overrides))
    pruner = build_pruner(cfg)
    return PrunedVLM.for_run(build_model(cfg), pruner, cfg.max_new_tokens)


def register(name: str = "covipal", *overrides: str) -> None:
    """Add a covipal model to VLMEvalKit's registry (`vlmeval.config.supported_VLM`), so its own tools can build
    it by name: `register("covipal_fastv", "pruner=fastv")`."""
    from vlmeval.config import supported_VLM

    supported_VLM[name] = partial(from_config, *overrides)


register()  # "covipal": the default tiny model without pruning; register() more with your settings
