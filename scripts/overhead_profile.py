"""Where CoViPAL's pruned forward spends time that the bare reference does not: the torch profiler over one
framework prefill and one bare reference (the PPM, top-k and one plain LLM call on the same kept tokens), ops
grouped by name and input shapes, printed where the two sides differ in count or by more than 3 ms.

    python scripts/overhead_profile.py                 # the 768x768 anyres image
    python scripts/overhead_profile.py --frames 32     # a 32-frame video
Model: LLaVA-OV-0.5B shapes with random weights, in the dtype the bench would choose (or --dtype)."""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from covipal.api import build_model, compose
from covipal.efficiency.build import make_pruner
from covipal.efficiency.inputs import build_input
from covipal.efficiency.measure import bare_reference, encode, measure
from covipal.models.loading import dtype_choice


def op_times(run) -> Counter:
    run()  # warm
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    times = Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        times[event.key, str(event.input_shapes)[:100]] = (event.count, event.self_cpu_time_total / 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=0, help="a video of this many frames (0: the image)")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16 or float32")
    parser.add_argument("--ratio", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = compose("bench", ["model=ov_0.5b_shapes", f"model.dtype={args.dtype}"])
    print("dtype:", dtype_choice(cfg.model.dtype, torch.device("cpu")), flush=True)
    loaded = build_model(cfg)
    spec = {"kind": "video", "frames": args.frames} if args.frames else {"kind": "image", "size": [768, 768]}
    if not args.frames:
        spec["aspect"] = "anyres_max_2"
    encoded = encode(loaded.model, build_input(loaded, spec))
    pruner = make_pruner(cfg, "covipal", args.ratio)
    pruner.setup(loaded.model)
    record = measure(loaded.model, pruner, encoded, 0).record
    framework = op_times(lambda: measure(loaded.model, pruner, encoded, 0))
    bare = op_times(lambda: bare_reference(loaded.model, pruner, encoded, record))
    rows = []
    for key in set(framework) | set(bare):
        (n_fw, ms_fw), (n_bare, ms_bare) = framework.get(key, (0, 0.0)), bare.get(key, (0, 0.0))
        if n_fw != n_bare or abs(ms_fw - ms_bare) > 3:
            rows.append((ms_fw - ms_bare, key, n_fw, ms_fw, n_bare, ms_bare))
    total_fw = sum(ms for _, ms in framework.values())
    total_bare = sum(ms for _, ms in bare.values())
    print(f"self CPU time of all ops: framework {total_fw:.1f} ms, bare {total_bare:.1f} ms")
    print("Δ ms | op | input shapes | framework calls, ms | bare calls, ms")
    for delta, (name, shapes), n_fw, ms_fw, n_bare, ms_bare in sorted(rows, key=lambda r: -abs(r[0]))[:30]:
        print(f"{delta:+8.1f} | {name} | {shapes} | {n_fw}, {ms_fw:.1f} | {n_bare}, {ms_bare:.1f}")


if __name__ == "__main__":
    main()
