"""The per-token row the family adapters lay out for vision-side pruners: view, row, col, score, then the key."""

FIXED = 4  # channels before the keys: view, row, col, score
NEWLINE = -1.0  # view/row/col of newline tokens (and of non-visual positions)
VIDEO_VIEWS = 1_000_000  # frame views are numbered from here, image views from 0 (exact in float32)
