"""Write the tiny world to disk: training conversations (LLaVA-NeXT-Data and LLaVA-Video-178K layouts) and the
held-out benchmarks as VLMEvalKit TSVs.

    python scripts/make_tiny_world.py data/tiny_world --train-images 20000 --train-videos 4000 --benchmark-size 2000
"""

from __future__ import annotations

import argparse

from covipal.tiny_world.export import write_tiny_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument("--train-videos", type=int, default=4_000)
    parser.add_argument("--benchmark-size", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = write_tiny_world(args.root, args.train_images, args.train_videos, args.benchmark_size, args.seed)
    print(f"tiny world written to {root}")


if __name__ == "__main__":
    main()
