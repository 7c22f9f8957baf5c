"""`python -m covipal.bench`: prefill, decode, memory, KV cache and FLOPs of every method side by side, with
ratios against `none` from the same run (the paper's Tables 3–4). Default: the tiny model on CPU in seconds;
`model=ov_0.5b_shapes` / `ov_7b_shapes` time the real shapes with random weights. Writes bench.json, bench.md
and bench.png into the run directory."""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from covipal.cli import CONFIG_DIR, run_hydra_entry, user_errors
from covipal.errors import CovipalError
from covipal.models.loading import dtype_choice, resolve_device


def bench(cfg: DictConfig) -> list[dict]:
    from covipal.efficiency.report import write_all
    from covipal.efficiency.run import output_dir, run_bench

    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.new_tokens < 1:
        raise CovipalError(
            f"repeats={cfg.repeats}, warmup={cfg.warmup}, new_tokens={cfg.new_tokens}: use repeats>=1, "
            "warmup>=0 and new_tokens>=1"
        )
    overrides = [arg for arg in sys.argv[1:] if not arg.startswith(("hydra.", "-"))]
    print(f"dtype: {dtype_choice(cfg.model.dtype, resolve_device(cfg.model.device))}", flush=True)
    directory = output_dir(cfg)

    written: list = []

    def write(rows: list[dict], loaded) -> None:
        parameter = next(loaded.model.parameters())
        meta = {
            "model": loaded.name,
            "dtype": str(parameter.dtype).replace("torch.", ""),
            "device": str(parameter.device),
            "threads": torch.get_num_threads(),
            "repeats": cfg.repeats,
            "warmup": cfg.warmup,
            "new_tokens": cfg.new_tokens,
        }
        written[:] = write_all(rows, directory, meta)

    rows, loaded = run_bench(cfg, overrides, on_input=write)
    if not written:  # no input ran: still write the (empty) files
        write(rows, loaded)
    for path in written:  # the files of the last input hold every row
        print(f"written: {path}")
    print((directory / "bench.md").read_text())
    return rows


@hydra.main(config_path=str(CONFIG_DIR), config_name="bench", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        bench(cfg)


def main() -> None:
    run_hydra_entry(_main)


if __name__ == "__main__":
    main()
