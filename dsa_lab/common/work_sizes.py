"""Work sizes: how much one chunk of a chunked path may hold, per device type, in one place.

Every chunked path (chunked selection, the MHA gather forward/backward, the MQA path, the index scores and
attention probabilities at the selected slots, recall) asks `work_budget(device, kind)` for its budget and
plans its query chunks with `query_chunk` / `prefix_bounds` / `chunk_bounds`, so a test can count the chunks
of a layer call on any device without having that device.

A budget counts the elements of the largest tensor one chunk builds (see each kind below):
  CPU   cache-sized (measured on the 2-core development machine: chunks that stay in L2 are fastest).
  CUDA  memory-sized: the GPU is bound by memory, not cache, and every chunk costs a Python iteration and
        several kernel launches, so a chunk is as large as a bounded slice of memory allows (2**29 elements:
        2 GiB fp32, 1 GiB bf16). At the `default` presets (sweep L 256, long-context L 8192) a layer call
        runs at most 8 chunks (tests/test_work_sizes.py).
Other device types take the CUDA budgets (memory-bound accelerators).
"""
from __future__ import annotations

import torch

# kind -> elements. index: per-head index scores (B, c * H_I, stop) of chunked selection; gather: gathered K (or
# V) rows (B, c, H, K, D) of the MHA gather path and of the slot probabilities; selected_scores: gathered indexer
# keys + per-head scores (B, c, K, d_I + H_I); mqa: gathered shared rows (B, c, K, max(D, H)); recall: dense
# probabilities (B, H, c, L) of the recall evaluation.
CPU_BUDGETS = {"index": 1 << 19, "gather": 1 << 19, "selected_scores": 1 << 21, "mqa": 1 << 19, "recall": 1 << 22}
CUDA_BUDGETS = {"index": 1 << 29, "gather": 1 << 29, "selected_scores": 1 << 29, "mqa": 1 << 29, "recall": 1 << 29}
KINDS = tuple(CPU_BUDGETS)


def work_budget(device, kind: str) -> int:
    """Elements one chunk of `kind` may hold on `device` (a torch.device or its type name)."""
    if kind not in CPU_BUDGETS:
        raise ValueError(f"work kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    device_type = device if isinstance(device, str) else torch.device(device).type
    return (CPU_BUDGETS if device_type == "cpu" else CUDA_BUDGETS)[kind]


def query_chunk(L: int, per_query: int, budget: int) -> int:
    """Queries per chunk when each query costs `per_query` elements: in [1, L]."""
    return max(1, min(L, budget // max(1, per_query)))


def chunk_bounds(L: int, chunk: int) -> list:
    """[(start, stop), ...] of `chunk` queries each (the last one shorter)."""
    return [(start, min(L, start + chunk)) for start in range(0, L, chunk)]


def prefix_chunk(start: int, rows_per_query: int, budget: int) -> int:
    """Queries per chunk starting at `start` so that rows_per_query * c * (start + c) <= budget (at least 1):
    a causal chunk of queries [start, start + c) sees the keys [0, start + c)."""
    b = budget / max(1, rows_per_query)
    c = int((-start + (start * start + 4 * b) ** 0.5) / 2)  # positive root of c^2 + start*c - b = 0
    return max(1, c)


def prefix_bounds(L: int, rows_per_query: int, budget: int, align: int = 1) -> list:
    """Causal query chunks [(start, stop), ...] of about `budget` elements each (early chunks, with short key
    prefixes, hold more queries); every stop but L is a multiple of `align`."""
    bounds, start = [], 0
    while start < L:
        stop = min(L, start + prefix_chunk(start, rows_per_query, budget))
        stop = min(L, stop + -stop % align)
        bounds.append((start, stop))
        start = stop
    return bounds
