"""Peak memory of one measurement. On CUDA: max allocated. On CPU: the peak resident memory above the level before
the prefill, sampled by a thread while prefill and decode run, in a fresh process per measurement (so one
method's freed buffers do not hide another's). The processes fork from a forkserver that has only imported the
harness, so each starts with an empty heap and no import time."""

from __future__ import annotations

import multiprocessing
import os
import threading

import torch

from covipal.efficiency.build import build_everything
from covipal.efficiency.measure import Encoded, measure

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakSampler:
    """Samples resident memory every `interval` seconds inside a `with` block; `.peak` above `.start`."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = resident_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def above_start(self) -> int:
        return self.peak - self.start


def one_memory_measurement(loaded, encoded: Encoded, pruner, new_tokens: int) -> dict:
    model = loaded.model
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        measure(model, pruner, encoded, new_tokens)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "kind": "cuda max allocated"}
    with PeakSampler() as sampler:
        measure(model, pruner, encoded, new_tokens)
    return {"peak_bytes": sampler.above_start, "kind": "cpu peak resident (fresh process)"}


def _job(request: dict) -> dict:
    torch.set_num_threads(int(request.get("threads") or torch.get_num_threads()))
    try:
        loaded, encoded, pruner = build_everything(request)
        return one_memory_measurement(loaded, encoded, pruner, request["new_tokens"])
    except Exception as error:  # reported in the results, not fatal to the run
        return {"error": f"{type(error).__name__}: {error}"}


def measure_in_fresh_processes(requests: list[dict]) -> list[dict]:
    """One new process per request (a pool that retires each worker after one task)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["covipal.efficiency.memory"])  # and what it imports
    with context.Pool(processes=1, maxtasksperchild=1) as pool:
        return pool.map(_job, requests, chunksize=1)
