"""Benchmark rows whose image or video cannot be read: each is reported in one line (benchmark, row, file),
answered with nothing so VLMEvalKit scores it as wrong, and counted; the rest of the benchmark goes on."""

from __future__ import annotations

import sys
from collections.abc import Callable

import av
from tqdm import tqdm

# what decoding a bad PNG or base64 string (binascii.Error is a ValueError) or a broken video raises
DECODE_ERRORS = (OSError, ValueError, av.error.FFmpegError)


class UnreadableMedia(Exception):
    """A row's image or video file could not be read."""

    def __init__(self, file: str, error: BaseException):
        super().__init__(f"{file}: {type(error).__name__}: {error}")
        self.file, self.error = str(file), error


def read_or_raise(read: Callable, file):
    """`read(file)`, with a decoding failure raised as `UnreadableMedia` naming the file."""
    try:
        return read(file)
    except DECODE_ERRORS as error:
        raise UnreadableMedia(file, error) from error


def report(benchmark: str, index, failure: UnreadableMedia) -> None:
    """One line on stderr, above any progress bar."""
    tqdm.write(f"warning: {benchmark} row {index}: cannot read {failure}; the row is scored as wrong", file=sys.stderr)
