"""Cached build products (pretrained tiny checkpoints, generated data) under $COVIPAL_CACHE (~/.cache/covipal)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("COVIPAL_CACHE", Path.home() / ".cache" / "covipal"))


def cached_directory(
    prefix: str, key: object, build, cache_dir: str | Path | None = None, rebuild: bool = False
) -> Path:
    """`<cache>/<prefix>-<hash of key>`, made by `build(directory)` when absent (or when `rebuild`). Building
    happens in a staging directory that is renamed into place, so a crash never leaves a half-written checkpoint."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    directory = Path(cache_dir or default_cache_dir()) / f"{prefix}-{digest}"
    if directory.is_dir():  # only ever renamed into place once complete
        if not rebuild:
            return directory
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=directory.parent))
    try:
        build(staging)
        try:
            staging.rename(directory)
        except OSError:  # another process finished first
            if not directory.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
