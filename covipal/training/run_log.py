"""Where a training run's metrics go: `metrics.jsonl` and `metrics.csv` in the run directory (appended step by
step, so a crash loses nothing), and wandb (offline by default; `disabled` in tests)."""

from __future__ import annotations

import csv
import json
from pathlib import Path


class RunLog:
    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool = True,
        wandb_mode: str = "disabled",
        project: str = "covipal",
        run_name: str | None = None,
        config: dict | None = None,
    ):
        self.directory = Path(output_dir)
        self.enabled = enabled
        self._csv_columns: list[str] | None = None
        self._wandb = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=project, name=run_name, mode=wandb_mode, dir=str(self.directory), config=config or {}
            )

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        with open(self.directory / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        path = self.directory / "metrics.csv"
        if self._csv_columns is None:
            self._csv_columns = _existing_header(path) or list(row)
        new_file = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._csv_columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def histogram(self, step: int, name: str, values) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Histogram(values)}, step=step)

    def image(self, step: int, name: str, path: str | Path) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _existing_header(path: Path) -> list[str] | None:
    """A resumed run appends to the CSV it had, with the same columns."""
    if not path.exists():
        return None
    with open(path, newline="") as handle:
        return next(csv.reader(handle), None)
