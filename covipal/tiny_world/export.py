"""Writing the tiny world to disk in the layouts real data comes in.

    <root>/llava_next/tiny_world.json + images/      training conversations, LLaVA-NeXT-Data layout
    <root>/llava_video/tiny_world.json + videos/     training conversations, LLaVA-Video-178K layout (mp4)
    <root>/LMUData/TinyWorld_MCQ.tsv                 image multiple choice (VLMEvalKit MCQ columns)
    <root>/LMUData/TinyWorld_YN.tsv                  image yes/no
    <root>/LMUData/TinyWorld_VQA.tsv                 image short answer
    <root>/LMUData/TinyWorld_Video_MCQ.tsv + videos/TinyWorld_Video_MCQ/<index>.mp4   video multiple choice
    <root>/LMUData/<NAME>_oracle.jsonl               per row: the visual token positions the question is about
                                                     (in the tiny LLaVA-OneVision's layout; another model's
                                                     layout in <NAME>_oracle_<layout key>.jsonl)
    <root>/LMUData/TinyWorld.json                    what was written (generator version, rows per benchmark)

Benchmarks use seeds disjoint from the training split's, so they are held out.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
from pathlib import Path

import av
import numpy as np
from tqdm.auto import tqdm

from covipal.data.sample import Sample
from covipal.tiny_world.samples import image_sample, video_sample
from covipal.tiny_world.synthetic import CHOICE_TYPES, GENERATOR_VERSION, ONEVISION, YES_NO_TYPES, TokenLayout

BENCHMARK_SEED = 10_000_000
MCQ_COLUMNS = ["index", "question", "A", "B", "C", "D", "answer", "category", "image"]


def write_video(frames: np.ndarray, path: Path, fps: int = 8) -> None:
    """Lossless H.264 in RGB (crf 0), so decoded frames equal the generated ones."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24"
        stream.options = {"crf": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video(path: str | Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _conversation(sample: Sample) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{sample.question}"}, {"from": "gpt", "value": sample.answer}]


def write_training_split(root: Path, images: int, videos: int, seed: int = 0, progress: bool = True) -> None:
    rng = np.random.default_rng(seed)
    image_dir = root / "llava_next" / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(images), desc="training images", disable=not progress):
        sample = image_sample(rng, "mcq" if rng.random() < 0.5 else "short")
        name = f"tw_{index:07d}"
        sample.images[0].save(image_dir / f"{name}.png")
        records.append({"id": name, "image": f"images/{name}.png", "conversations": _conversation(sample)})
    (root / "llava_next" / "tiny_world.json").write_text(json.dumps(records))
    video_dir = root / "llava_video" / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(videos), desc="training videos", disable=not progress):
        sample = video_sample(rng, "mcq" if rng.random() < 0.5 else "short")
        name = f"twv_{index:07d}"
        write_video(sample.video, video_dir / f"{name}.mp4")
        records.append(
            {
                "id": name,
                "video": f"videos/{name}.mp4",
                "conversations": _conversation(sample),
                "data_source": "tiny_world",
            }
        )
    (root / "llava_video" / "tiny_world.json").write_text(json.dumps(records))


def benchmark_samples(
    name: str, count: int, seed: int = BENCHMARK_SEED, layout: TokenLayout = ONEVISION
) -> list[Sample]:
    """The held-out samples of one benchmark, regenerated from its seed (no files needed), their ground truth
    over `layout`'s visual tokens (the questions and pictures do not depend on it)."""
    offsets = {"TinyWorld_MCQ": 0, "TinyWorld_YN": 1, "TinyWorld_VQA": 2, "TinyWorld_Video_MCQ": 3}
    rng = np.random.default_rng(seed + offsets[name])
    if name == "TinyWorld_MCQ":
        return [image_sample(rng, "mcq", kinds=CHOICE_TYPES, layout=layout) for _ in range(count)]
    if name == "TinyWorld_YN":
        return [image_sample(rng, "short", kinds=YES_NO_TYPES, layout=layout) for _ in range(count)]
    if name == "TinyWorld_VQA":
        return [image_sample(rng, "short", kinds=CHOICE_TYPES, layout=layout) for _ in range(count)]
    if name == "TinyWorld_Video_MCQ":
        return [video_sample(rng, "mcq", layout=layout) for _ in range(count)]
    raise ValueError(f"unknown tiny-world benchmark {name}; choose one of {', '.join(offsets)}")


BENCHMARKS = ("TinyWorld_MCQ", "TinyWorld_YN", "TinyWorld_VQA", "TinyWorld_Video_MCQ")


def write_benchmark(root: Path, name: str, count: int, progress: bool = True, directory: Path | None = None) -> Path:
    """`<root>/LMUData/<name>.tsv` (or `<directory>/<name>.tsv`) with its oracle file (and videos)."""
    directory = Path(directory) if directory is not None else root / "LMUData"
    directory.mkdir(parents=True, exist_ok=True)
    samples = benchmark_samples(name, count)
    video = name.startswith("TinyWorld_Video")
    if video:
        (directory / "videos" / name).mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.tsv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        mcq = name.endswith("MCQ")
        columns = MCQ_COLUMNS if mcq else ["index", "question", "answer", "category", "image"]
        if video:
            columns = [c if c != "image" else "video" for c in columns]
        writer.writerow(columns)
        for index, sample in enumerate(tqdm(samples, desc=name, disable=not progress)):
            row = {"index": index, "question": sample.question.split("\n")[0], "category": sample.meta["type"]}
            if mcq:
                options = sample.meta["options"] + [""] * (4 - len(sample.meta["options"]))
                row.update(zip("ABCD", options))
                row["answer"] = sample.answer
            else:
                row["answer"] = sample.answer.capitalize() if name == "TinyWorld_YN" else sample.answer
            if video:  # VLMEvalKit's video sets name a video by its file stem under their video folder
                write_video(sample.video, directory / "videos" / name / f"{index}.mp4")
                row["video"] = str(index)
            else:
                row["image"] = _png_base64(sample.images[0])
            writer.writerow([row[c] for c in columns])
    write_oracle(directory, name, samples, ONEVISION)
    return path


def layout_key(layout: TokenLayout) -> str:
    """A file-name key for a layout: its family and a digest of its geometry."""
    return f"{layout.name}_{hashlib.sha1(repr(layout).encode()).hexdigest()[:8]}"


def oracle_path(directory: Path, name: str, layout: TokenLayout = ONEVISION) -> Path:
    """Benchmark `name`'s ground truth in `layout` (the tiny LLaVA-OneVision's keeps its historical name)."""
    suffix = "" if layout == ONEVISION else f"_{layout_key(layout)}"
    return Path(directory) / f"{name}_oracle{suffix}.jsonl"


def write_oracle(directory: Path, name: str, samples: list[Sample], layout: TokenLayout) -> Path:
    """One line per row: its index, its visual token count in `layout` and the positions it is about."""
    path = oracle_path(directory, name, layout)
    with open(path, "w") as oracle:
        for index, sample in enumerate(samples):
            relevant = np.flatnonzero(sample.relevance).tolist()
            oracle.write(
                json.dumps({"index": index, "visual_tokens": len(sample.relevance), "relevant": relevant}) + "\n"
            )
    return path


def ensure_benchmarks(
    lmu_data: str | Path, names, rows: int, progress: bool = True, layout: TokenLayout = ONEVISION
) -> None:
    """Write the tiny world's benchmarks `names` (`rows` questions each) into the VLMEvalKit data root
    `lmu_data` unless they are there already from this generator version with at least `rows` rows, with their
    ground truth in `layout` (another model's layout is added beside the tiny LLaVA-OneVision's). Stale image and
    frame dumps VLMEvalKit keeps under `images/<NAME>` are removed with them."""
    import shutil

    root = Path(lmu_data)
    marker = root / "TinyWorld.json"
    written = json.loads(marker.read_text()) if marker.is_file() else {}
    if written.get("generator_version") != GENERATOR_VERSION:
        written = {"generator_version": GENERATOR_VERSION, "rows": {}}
    oracles = written.setdefault("oracles", {})
    for name in names:
        key = f"{name}:{layout_key(layout)}"
        if written["rows"].get(name, 0) < rows or not (root / f"{name}.tsv").is_file():
            written["rows"].pop(name, None)
            for stale in [k for k in oracles if k.startswith(f"{name}:")]:
                oracles.pop(stale)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(written))  # a crash from here on leaves the set marked absent
            shutil.rmtree(root / "images" / name, ignore_errors=True)
            shutil.rmtree(root / "videos" / name, ignore_errors=True)
            write_benchmark(root.parent, name, rows, progress, directory=root)
            written["rows"][name] = rows
            marker.write_text(json.dumps(written))
        if layout != ONEVISION and (
            oracles.get(key) != written["rows"][name] or not oracle_path(root, name, layout).is_file()
        ):
            oracles.pop(key, None)
            marker.write_text(json.dumps(written))
            write_oracle(root, name, benchmark_samples(name, written["rows"][name], layout=layout), layout)
            oracles[key] = written["rows"][name]
            marker.write_text(json.dumps(written))


def write_tiny_world(
    root: str | Path,
    train_images: int = 20_000,
    train_videos: int = 4_000,
    benchmark_size: int = 2_000,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    root = Path(root)
    write_training_split(root, train_images, train_videos, seed, progress)
    for name in BENCHMARKS:
        write_benchmark(root, name, benchmark_size, progress)
    return root


def benchmark_relevance(root: Path, name: str, layout: TokenLayout = ONEVISION):
    """message -> relevance mask in `layout`, for the tiny world's benchmarks: their media files are named by row
    index (`images/<NAME>/<index>.png`, `videos/<NAME>/<index>.mp4`), and `oracle_path` holds each row's."""
    rows = {}
    for line in oracle_path(root, name, layout).read_text().splitlines():
        record = json.loads(line)
        mask = np.zeros(record["visual_tokens"], dtype=bool)
        mask[record["relevant"]] = True
        rows[int(record["index"])] = mask

    def lookup(message: list[dict]):
        media = [item["value"] for item in message if item["type"] in ("image", "video")]
        return rows[int(Path(media[0]).stem)] if media else None

    return lookup
