"""What every entry point shares: config location, up-front checks of group choices, one-line user errors."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from covipal.errors import CovipalError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


def check_group_choices(overrides: Sequence[str]) -> None:
    """Reject unknown config-group choices (also inside comma sweeps) with one line listing the valid ones."""
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if not sep or "." in key or key.startswith("hydra") or "(" in value or not (CONFIG_DIR / key).is_dir():
            continue
        options = group_options(key)
        for choice in value.split(","):
            if choice not in options:
                raise CovipalError(f"unknown {key} '{choice}'; choose one of: {', '.join(options)}")


def find_user_error(error: BaseException) -> CovipalError | None:
    """The CovipalError behind `error`, if any (Hydra's instantiate wraps what the target raises)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, CovipalError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def close_progress_bars() -> None:
    """End every live tqdm bar (a closed bar ends its line), so what is printed next starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a CovipalError (however wrapped) into a one-line message, on its own line, and exit status 2."""
    try:
        yield
    except Exception as error:
        found = find_user_error(error)
        if found is None:
            raise
        close_progress_bars()
        print(f"error: {found}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run_hydra_entry(hydra_main, argv: Sequence[str] | None = None) -> None:
    """Check the command line, then hand over to a `@hydra.main` function."""
    with user_errors():
        check_group_choices(sys.argv[1:] if argv is None else argv)
    hydra_main()
