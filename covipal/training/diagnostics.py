"""Stage-2 diagnostics: the distribution of the retention probabilities P (the paper's Figures 6–7) as a wandb
histogram every `every` steps and a PNG in the run directory at the end, with the share of P near 0 or 1."""

from __future__ import annotations

from pathlib import Path

import torch


class RetentionDiagnostics:
    def __init__(self, task, output_dir: str | Path, log, every: int = 10, window: int = 20):
        self.task, self.output_dir, self.log = task, Path(output_dir), log
        self.every, self.window = every, window
        self.recent: list[torch.Tensor] = []
        self.step = 0

    def __call__(self, step: int, metrics: dict) -> None:
        self.step = step
        if self.task.last_probabilities is not None:
            self.recent = [*self.recent[-(self.window - 1) :], self.task.last_probabilities]
        if step % self.every == 0 and self.recent:
            self.log.histogram(step, "retention_probability", torch.cat(self.recent).numpy())

    def finish(self) -> Path | None:
        if not self.recent:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values = torch.cat(self.recent).numpy()
        near = float(((values < 0.1) | (values > 0.9)).mean())
        figure, axis = plt.subplots(figsize=(5, 3.2))
        axis.hist(values, bins=50, range=(0, 1), color="#4a7ab5")
        axis.set_xlabel("retention probability P = σ(S)")
        axis.set_ylabel("visual tokens")
        axis.set_title(f"step {self.step}: {near:.0%} within 0.1 of 0 or 1", fontsize=10)
        figure.tight_layout()
        path = self.output_dir / "retention_probabilities.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        self.log.image(self.step, "retention_probabilities", path)
        return path
