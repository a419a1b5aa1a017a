"""Timing. Callables side by side on a shared machine: in turns (a, b, a, b, ...) so that load from other processes
falls on all of them alike, the first round discarded (one-time set-up: allocator, thread pools, caches), wall
time and process CPU time (all threads: what a call cost when other processes preempt it). Spans inside a hot loop
on CUDA: events recorded on the stream without a host sync, read once a later sync has passed them."""
from __future__ import annotations

import time

import torch


def interleaved(fns: dict, repeats: int, cuda: bool = False) -> dict:
    """{name: callable} -> {name: {"wall_ms": [...], "cpu_ms": [...]}} of `repeats` rounds, each callable once per
    round in turn, after one discarded round."""
    samples = {name: {"wall_ms": [], "cpu_ms": []} for name in fns}
    for rnd in range(repeats + 1):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if rnd:
                samples[name]["wall_ms"].append(1e3 * (time.perf_counter() - t0))
                samples[name]["cpu_ms"].append(1e3 * (time.process_time() - c0))
    return samples


def cuda_mark():
    """A timing event recorded now on the current CUDA stream (no host sync); read with elapsed_s once complete."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def elapsed_s(start, end) -> float:
    """Seconds from mark `start` to mark `end`: wall-clock floats, or cuda_mark events (both complete: the caller
    synchronised once after recording them)."""
    if hasattr(start, "elapsed_time"):
        return start.elapsed_time(end) / 1e3
    return end - start
