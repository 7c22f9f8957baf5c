"""One benchmark through VLMEvalKit: its inference job (which shards over ranks and resumes from its own files),
its scorer, and our statistics of what the pruner did."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
from vlmeval.inference import infer_data_job
from vlmeval.inference_video import infer_data_job_video
from vlmeval.smp import LMUDataRoot, get_pred_file_path, get_rank_and_world_size, load

from covipal.errors import CovipalError
from covipal.evaluation.vlmevalkit.datasets import open_benchmark


def vlmeval_environment(data_root: str | Path) -> Path:
    """Point VLMEvalKit at `data_root` and keep it offline and writing plain files; returns the root."""
    root = Path(data_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["LMUData"] = str(root)
    os.environ.setdefault("PRED_FORMAT", "tsv")  # predictions other tools read without an Excel reader
    os.environ.setdefault("EVAL_FORMAT", "csv")
    return root


def _remove_scores(prediction_file: Path) -> None:
    """VLMEvalKit's scorers reuse their intermediate files whatever the predictions now say: start clean."""
    stem = prediction_file.with_suffix("")
    for suffix in ("_exact_matching_result", "_acc", "_auxmatch", "_score", "_rating"):
        for path in glob.glob(f"{glob.escape(str(stem))}{suffix}.*"):
            os.remove(path)


def _overall(table) -> float | None:
    """The Overall accuracy of a VLMEvalKit score table (a DataFrame or dict), or None."""
    if table is None:
        return None
    if hasattr(table, "to_dict"):
        table = table.to_dict(orient="list")
    value = table.get("Overall")
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else float(value)


def _latest_records(stats_dir: Path, name: str) -> list[dict]:
    """This benchmark's statistics rows of every rank, each question counted once (its latest record)."""
    rows = {}
    for path in sorted(stats_dir.glob(f"{name}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                rows[record["key"]] = record
    return list(rows.values())


def pruning_statistics(records: list[dict]) -> dict:
    """Means over the answered questions of what the pruner did; on the tiny world also the share of each
    question's relevant visual tokens kept, at the last LLM layer and averaged over layers."""
    if not records:
        return {}
    layers = np.array([r["layer_visual_tokens"] for r in records], dtype=np.float64)
    mean = lambda key: float(np.mean([r[key] for r in records]))  # noqa: E731
    statistics = {
        "questions_timed": len(records),
        "visual_tokens_input": mean("n_visual"),
        "visual_tokens_per_layer": layers.mean(0).tolist(),
        "reserve_ratio_achieved": mean("reserve_ratio"),
        "prefill_seconds_per_sample": mean("prefill_seconds"),
        "pruner_seconds_per_sample": mean("pruner_seconds"),
        "generate_seconds_per_sample": mean("generate_seconds"),
    }
    kept = [r["relevant_kept"] for r in records if r.get("relevant_kept")]
    if kept:
        statistics["relevant_kept_last_layer"] = float(np.mean([k[-1] for k in kept]))
        statistics["relevant_kept_mean_over_layers"] = float(np.mean([np.mean(k) for k in kept]))
    return statistics


SCORED_FILES = (("_exact_matching_result", "hit"), ("_auxmatch", "score"))  # VLMEvalKit's per-question verdicts


def _truth(value) -> float:
    return float(str(value).strip().lower() in ("1", "1.0", "true"))


def question_records(prediction: Path, records: list[dict]) -> list[dict]:
    """Per question: index, category, prediction, hit (VLMEvalKit's own verdict, where its scorer writes one per
    question) and the relevant tokens kept per layer — what `covipal.report` pairs across methods."""
    table = load(str(prediction))
    verdicts = {}
    stem = prediction.with_suffix("")
    for suffix, column in SCORED_FILES:
        for path in sorted(glob.glob(f"{glob.escape(str(stem))}{suffix}.*")):
            scored = load(path)
            if "index" in scored and column in scored:
                verdicts = {str(i): _truth(v) for i, v in zip(scored["index"], scored[column])}
    by_index = {str(r["index"]): r for r in records if r.get("index") is not None}
    rows = []
    for _, line in table.iterrows():
        index = str(line["index"])
        record = by_index.get(index, {})
        rows.append(
            {
                "index": index,
                "category": None if "category" not in line else str(line["category"]),
                "prediction": str(line.get("prediction", "")),
                "hit": verdicts.get(index),
                "unreadable": record.get("unreadable"),
                "relevant_kept": record.get("relevant_kept"),
            }
        )
    return rows


def run_benchmark(vlm, name: str, kind: str, work_dir: Path, model_name: str, rows: int | None, judge: str):
    """Answer and score benchmark `name` (a `kind` of `open_benchmark`) with `vlm` (a `PrunedVLM`) into
    `work_dir`; returns the result row for metrics.json (on rank 0; other ranks return None)."""
    if "{" in str(work_dir) or "}" in str(work_dir):  # VLMEvalKit formats file names with str.format
        raise CovipalError(f"VLMEvalKit cannot write under {work_dir}: pick an output directory without braces")
    dataset = open_benchmark(name, kind, vlm.nframe)
    if rows:
        dataset.data = dataset.data.iloc[:rows].reset_index(drop=True)
        if hasattr(dataset, "videos"):
            dataset.videos = sorted(set(dataset.data["video"]))
    vlm.dataset_types[name] = dataset.TYPE
    if hasattr(dataset, "dump_image"):  # image sets: a row whose embedded image is broken must not stop the run
        dataset.dump_image = vlm.guard_media(dataset.dump_image, Path(LMUDataRoot()) / f"{name}.tsv")
    rank, _ = get_rank_and_world_size()  # VLMEvalKit's own reading of torchrun's environment
    vlm.stats_file = work_dir / "stats" / f"{name}.rank{rank}.jsonl"
    prediction = Path(get_pred_file_path(str(work_dir), model_name, name))
    if getattr(dataset, "MODALITY", "IMAGE") == "VIDEO":
        infer_data_job_video(vlm, str(work_dir), model_name, dataset, result_file=str(prediction))
    else:
        infer_data_job(vlm, str(work_dir), model_name, dataset)
    if rank != 0:
        return None
    if not prediction.is_file():
        raise CovipalError(f"benchmark {name}: VLMEvalKit wrote no predictions to {prediction}")
    _remove_scores(prediction)
    table = dataset.evaluate(str(prediction), model=judge, nproc=1)
    overall = _overall(table)
    if overall is not None and kind in ("mcq", "vqa", "video_mcq"):
        overall *= 100  # these report a fraction; yes/no sets report percent
    result = {
        "score": overall,
        "questions": len(dataset.data),
        "predictions": str(prediction),
        "scores": table.to_dict(orient="list") if hasattr(table, "to_dict") else table,
    }
    records = _latest_records(work_dir / "stats", name)
    failed = [record for record in records if record.get("unreadable")]
    result["failed_rows"] = len(failed)  # answered with nothing (their media could not be read): scored as wrong
    result["failed_row_indices"] = sorted(str(record.get("index")) for record in failed)
    result.update(pruning_statistics([record for record in records if not record.get("unreadable")]))
    questions = work_dir / "questions" / f"{name}.jsonl"
    questions.parent.mkdir(parents=True, exist_ok=True)
    questions.write_text("".join(json.dumps(row) + "\n" for row in question_records(prediction, records)))
    result["questions_file"] = str(questions.relative_to(work_dir))
    return result
