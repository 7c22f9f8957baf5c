"""Peak memory and time of one stage-2 training step, eager vs SDPA vs FlexAttention, side by side.

    python scripts/bench_stage2.py                     # CPU: 2 LLM layers of Qwen2-0.5B size, ~1.7k and ~3.9k tokens
    python scripts/bench_stage2.py --layers 24 --device cuda --dtype bfloat16   # the full 0.5B LLM on a GPU

The model has the real Qwen2-0.5B LLM dimensions (width 896, 14 heads, 2 KV heads, MLP 4864) and a SigLIP of
the real shape (384 px, patch 14; one layer, since the frozen tower is not what is compared), random weights
built from config. Each (backend, length) runs in a fresh process: peak memory is CUDA max-allocated on GPU and
the process's peak resident memory on CPU. Ratios are against eager from the same run. FlexAttention has no
backward on CPU, so it is reported as n/a there."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LENGTHS = {"1.7k": 384, "3.9k": 768}  # image side → tokens with 200 text tokens (anyres: base + crops)


def build(attn: str, layers: int, device: str, dtype):
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    text = Qwen2Config(
        vocab_size=1000,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    )
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=1,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=999,
        video_token_index=998,
        image_grid_pinpoints=[[384, 384], [384, 768], [768, 384], [768, 768]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    return model.to(device)


def inputs(model, side: int, device: str, dtype):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import LlavaOnevisionImageProcessor

    processor = LlavaOnevisionImageProcessor(
        size={"height": 384, "width": 384}, image_grid_pinpoints=[[384, 384], [384, 768], [768, 384], [768, 768]]
    )
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (side, side, 3), dtype=np.uint8))
    pixels = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=pixels["pixel_values"].to(device, dtype),
            image_sizes=pixels["image_sizes"].to(device),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    n_visual = sum(f.shape[0] for f in features)
    ids = torch.cat([torch.full((n_visual,), 999), torch.randint(0, 900, (200,))])[None].to(device)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels["pixel_values"].to(device, dtype),
        "image_sizes": pixels["image_sizes"].to(device),
    }, n_visual


def child(attn: str, side: int, layers: int, device: str, dtype_name: str) -> dict:
    import torch

    from covipal.models.ppm import PPMClassifier, PPMConfig
    from covipal.training.soft_mask import SoftMaskSession

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    dtype = getattr(torch, dtype_name)
    model = build(attn, layers, device, dtype).requires_grad_(False)
    ppm = PPMClassifier(
        PPMConfig(input_size=896, hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4, num_kv_heads=2)
    ).to(device)
    batch, n_visual = inputs(model, side, device, dtype)
    labels = batch["input_ids"].clone()

    def step():
        with SoftMaskSession(model, lambda e, m: ppm(e, attention_mask=m)):
            logits = model(**batch, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:])
        loss.backward()
        ppm.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (and compilation for flex)
    times = []
    for _ in range(int(os.environ.get("BENCH_REPEATS", "3"))):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "tokens": int(batch["input_ids"].shape[1]),
        "visual": n_visual,
        "seconds": sorted(times)[len(times) // 2],
        "peak_bytes": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", type=Path, default=Path("outputs/bench_stage2.json"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.layers, args.device, args.dtype)))
        return
    backends = ["eager", "sdpa", "flex_attention"]
    results: dict = {}
    for name, side in LENGTHS.items():
        for attn in backends:
            if attn == "flex_attention" and args.device == "cpu":
                results[f"{name}/{attn}"] = None
                continue
            command = [
                sys.executable,
                __file__,
                "--layers",
                str(args.layers),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--child",
                attn,
                str(side),
            ]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode:
                print(f"{name}/{attn} failed: {run.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                results[f"{name}/{attn}"] = None
                continue
            results[f"{name}/{attn}"] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{'length':6} {'backend':15} {'tokens':>6} {'step s':>8} {'peak MB':>9} {'time/eager':>10} {'mem/eager':>9}")
    for name in LENGTHS:
        base = results[f"{name}/eager"]
        for attn in backends:
            r = results[f"{name}/{attn}"]
            if r is None:
                print(f"{name:6} {attn:15} {'n/a':>6}")
                continue
            print(
                f"{name:6} {attn:15} {r['tokens']:6d} {r['seconds']:8.2f} {r['peak_bytes'] / 2**20:9.0f} "
                f"{r['seconds'] / base['seconds']:10.2f} {r['peak_bytes'] / base['peak_bytes']:9.2f}"
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"layers": args.layers, "device": args.device, "results": results}, indent=1))


if __name__ == "__main__":
    main()
