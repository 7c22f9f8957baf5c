"""The efficiency harness (`python -m covipal.bench`): prefill, decode, memory and FLOPs of every method."""
