"""Prefill and decode speed of a retrofitted model (dsa_lab/interop/retrofit.py), dense vs DSA: the measurement
behind `benchmark.py --retrofit` and the retrofit REPORT's prefill timing.

Every figure times the compared paths in turns (dense, DSA, dense, DSA, ...) so that load from other processes
falls on both alike; the first round is discarded (one-time set-up: allocator, thread pools, caches) and the median
of the next `repeats` rounds is reported, wall time and process CPU time (all threads). The indexer's share is the
median over the same calls of (indexer time / call time), from the plan's SectionTimer (wall time on CPU; CUDA
events on the GPU's timeline, so timing the sections adds no host sync to the DSA call).

prefill_speed      retrofit_decode.prefill of L tokens (fills the caches, last-position logits)
decode_speed       one retrofit_decode.decode_step at a fixed position of the prefilled caches (the state rewound
                   before every call): dense reads every cached K/V row, DSA its indexer keys and k rows
recompute_speed    one token of retrofit.greedy_generate: a full forward over the context (generation without caches)
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from dsa_lab.common.timing import cuda_mark, elapsed_s, interleaved
from dsa_lab.inference import retrofit_decode
from dsa_lab.interop.retrofit import Plan, greedy_generate
from sparse_attention import SectionTimer


def _timed_plan(plan: Plan, shares: list, cuda: bool):
    """-> a plan with a fresh SectionTimer, and a function that records, once the call is done, the shares of its
    time spent in the indexer (projection, scores, top-k) and in the sparse attention. On CUDA the call's span and
    its sections are events on the GPU's timeline (no sync between sections), read in one sync at the end."""
    timer = SectionTimer(cuda)
    t0 = cuda_mark() if cuda else time.perf_counter()

    def done():
        end = cuda_mark() if cuda else time.perf_counter()
        if cuda:
            end.synchronize()  # the call's last work, and with it every section's events, is complete
        total = elapsed_s(t0, end)
        shares.append({name: timer.totals.get(name, 0.0) / total for name in ("indexer", "attention")})
    return dataclasses.replace(plan, timer=timer), done


def _summary(samples: dict, shares: list, repeats: int) -> dict:
    """Medians of both paths, DSA / dense ratios, and the indexer's share (its first call discarded)."""
    med = {name: {key: statistics.median(v) for key, v in s.items()} for name, s in samples.items()}
    return {"dense_ms": med["dense"]["wall_ms"], "dsa_ms": med["dsa"]["wall_ms"],
            "dense_cpu_ms": med["dense"]["cpu_ms"], "dsa_cpu_ms": med["dsa"]["cpu_ms"],
            "dsa_over_dense": med["dsa"]["wall_ms"] / med["dense"]["wall_ms"],
            "dsa_over_dense_cpu": med["dsa"]["cpu_ms"] / med["dense"]["cpu_ms"],
            "indexer_share": _median_share(shares, "indexer"),
            "sparse_attention_share": _median_share(shares, "attention"), "repeats": repeats}


def _median_share(shares: list, name: str) -> float | None:
    """The median share over the timed calls (the first, discarded call left out); None when not measured."""
    return statistics.median(s[name] for s in shares[1:]) if len(shares) > 1 else None


@torch.no_grad()
def prefill_speed(model, ids: torch.Tensor, top_k: int, backend: str, repeats: int, capacity: int | None = None,
                  cuda: bool = False, plan: Plan | None = None) -> tuple[dict, dict]:
    """ids (1, L) -> (timings, {"dense": state, "dsa": state}: the caches of the last prefill of each, for
    decode_speed). DSA: `plan`, default Plan("dsa", top_k, backend). A plan without a cached path (the retrieval
    lever prev_key; structured plans have one) times full forwards model(ids, plan) for both, no states
    ("cached": False)."""
    states, shares = {}, []
    sparse = plan or Plan("dsa", top_k=top_k, backend=backend)
    cached = retrofit_decode.has_cached_path(model, sparse)

    def run(name: str, p: Plan) -> None:
        if cached:
            states[name] = retrofit_decode.prefill(model, ids, p, capacity)[1]
        else:
            model(ids, p)

    def dsa():
        timed, done = _timed_plan(sparse, shares, cuda)
        run("dsa", timed)
        done()
    timings = _summary(interleaved({"dense": lambda: run("dense", Plan()), "dsa": dsa}, repeats, cuda), shares, repeats)
    return {**timings, "seq_len": ids.shape[1], "top_k": top_k, "backend": backend, "cached": cached}, states


@torch.no_grad()
def decode_speed(model, states: dict, token: torch.Tensor, repeats: int, cuda: bool = False) -> dict:
    """One decode step of `token` (1, 1) at the last cached position of each state (context = its length), dense
    and DSA in turns; -> timings with tokens/s (1000 / median ms, batch 1)."""
    position = states["dense"].length - 1
    shares = []

    def step(name: str):
        state = states[name]
        state.length, plan = position, state.plan
        done = None
        if name == "dsa":
            state.plan, done = _timed_plan(plan, shares, cuda)
        retrofit_decode.decode_step(model, state, token)
        if done:
            done()
            state.plan = plan
    timings = _summary(interleaved({"dense": lambda: step("dense"), "dsa": lambda: step("dsa")}, repeats, cuda),
                       shares, repeats)
    return {**timings, "context": position + 1, "top_k": states["dsa"].plan.top_k,
            "dense_tokens_per_s": 1e3 / timings["dense_ms"], "dsa_tokens_per_s": 1e3 / timings["dsa_ms"]}


@torch.no_grad()
def recompute_speed(model, ids: torch.Tensor, top_k: int, backend: str, repeats: int, cuda: bool = False,
                    plan: Plan | None = None) -> dict:
    """One generated token without caches (retrofit.greedy_generate: a full forward over ids (1, L)), dense and DSA
    (`plan`, default Plan("dsa", top_k, backend)) in turns -> timings with tokens/s."""
    plans = {"dense": Plan(), "dsa": plan or Plan("dsa", top_k=top_k, backend=backend)}
    samples = interleaved({name: (lambda p=p: greedy_generate(model, ids, 1, p)) for name, p in plans.items()},
                          repeats, cuda)
    timings = _summary(samples, [], repeats)
    return {**timings, "context": ids.shape[1], "top_k": top_k, "backend": backend,
            "dense_tokens_per_s": 1e3 / timings["dense_ms"], "dsa_tokens_per_s": 1e3 / timings["dsa_ms"]}
