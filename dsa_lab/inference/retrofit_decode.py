"""Cached generation for the retrofitted model (dsa_lab/interop/retrofit.py `RetrofitLM`): a KV cache, and for DSA
an indexer-key cache, so the prefix is never recomputed.

prefill(model, ids, plan)            one forward over the prompt at positions 0..L-1 (the plan's own maths: the
                                     same attention and selection as `model(ids, plan)`) that also fills the caches
                                     -> logits (B, 1 or L, vocab), RetrofitState
decode_step(model, state, tokens)    the next position only, through the base model's own layers (its RoPE at that
                                     position): the new token's K/V (and indexer key) are written into the caches,
                                     then it attends over them. dense: every cached key. dsa: its indexer queries
                                     score every cached indexer key (all past: causal by construction), top-k with
                                     select_top_k's tie rule, attention over the k selected cached rows; a structured
                                     plan (window > 0) keeps the first `sinks` and last `window` cached positions and
                                     fills the rest with that top-k over the others (levers.structured_row: the full
                                     forward's rule at that row). oracle: top-k of its own head-summed attention over
                                     the cached keys.
generate(model, ids, n_new, plan)    decoding on the caches (greedy, or sampled as decode.sample_next); the greedy
                                     reference twin is retrofit.greedy_generate (a full forward per token).

What a layer caches (buffers allocated once for `capacity` positions, decode.LayerCache):
  K, V (B, H_kv, T, D) after RoPE — one row per KV head: a GQA group's query heads read their KV head's rows
  directly (q viewed as (B, H_kv, G, D)), nothing is repeated per query head;
  dsa: + the indexer keys (B, T, d_I) after its LayerNorm and RoPE (in bf16 under Plan(index_dtype='bf16')).
The base model runs its forward with use_cache=False and explicit position_ids; our attention function
(retrofit_attention) hands a cached forward's new q/k/v to `_CachedCall.attend`, which owns the caches.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsa_lab.inference.decode import LayerCache, _take, sample_next
from dsa_lab.inference.row_linear import MAX_ROWS, few_row_linears
from dsa_lab.interop import levers, retrofit
from dsa_lab.interop.retrofit import Plan, RetrofitAux, RetrofitLM
from dsa_lab.kernels import cpu_indexer_row, cpu_sparse
from dsa_lab.kernels.chunked import select_last_rows
from sparse_attention import causal_attention_probs, check_no_nan, select_top_k, timed

CACHED_SELECTIONS = ("dense", "dsa", "oracle")


@dataclass
class RetrofitState:
    """The caches of one batch of sequences, the plan they decode under, and where the next token goes."""
    plan: Plan
    caches: list[LayerCache]  # one per layer: "k", "v" (B, H_kv, T, D); dsa: "index_keys" (B, T, d_I)
    length: int  # positions cached = the next token's position
    selected: dict = field(default_factory=dict)  # sparse plans: layer -> positions the last step attended (B, K)
    row_kernels: dict = field(default_factory=dict)  # dsa: layer -> its indexer's cpu_indexer_row.RowKernel or None
    few_rows: few_row_linears | None = None  # the model's linears routed through row_linear, found once


def check_cached_plan(model: RetrofitLM, plan: Plan, positions: int) -> None:
    """Refuse (ValueError, one line) what the cached path does not implement."""
    if plan.selection not in CACHED_SELECTIONS:
        raise ValueError(f"selection={plan.selection!r} has no cached decode; use one of {', '.join(CACHED_SELECTIONS)} "
                         f"(or retrofit.greedy_generate, a full forward per token)")
    if plan.targets or plan.stats or plan.indexer_loss or plan.keep_selection:
        raise ValueError("a cached forward computes logits only; targets/stats/indexer_loss/keep_selection need the "
                         "full forward model(ids, plan)")
    if not has_cached_path(model, plan):
        raise ValueError("previous-token indexer keys (prev_key) have no cached decode yet; use "
                         "retrofit.greedy_generate (a full forward per token)")
    limit = model.indexer_spec["max_seq_len"]
    if plan.selection == "dsa" and positions > limit:
        raise ValueError(f"{positions} positions exceed the indexers' max_seq_len={limit} (their RoPE table); "
                         f"generate fewer tokens or build the RetrofitLM with a larger max_seq_len")


def has_cached_path(model: RetrofitLM, plan: Plan) -> bool:
    """Whether this plan decodes on caches: every plan of CACHED_SELECTIONS but DSA with the retrieval levers'
    previous-token indexer keys (prev_key, dsa_lab/interop/levers.py), whose cached step is not written."""
    return plan.selection != "dsa" or not model.indexer_spec.get("prev_key", False)


class _CachedCall:
    """A cached forward's `dsa_call`: `plan` and `aux` as retrofit's input hook expects (it keeps each layer's
    attention input when the plan needs it); attend() gets the new tokens' q/k/v and owns the caches."""
    cached = True  # retrofit_attention: hand the new tokens' q/k/v to attend() (positions come from the state)

    def __init__(self, model: RetrofitLM, state: RetrofitState):
        self.plan, self.aux, self.state, self.indexers = state.plan, RetrofitAux(), state, model.indexers
        self.full = retrofit._Call(state.plan, model.indexers) if state.length == 0 else None  # the prefill's maths
        self.index_dtype = retrofit.INDEX_DTYPES[state.plan.index_dtype]  # bf16: the cache holds bf16 indexer keys
        self.rope_row = None  # a decode step's RoPE row for its one position, made by the first layer's indexer
        if self.full is not None:
            self.full.aux = self.aux  # one aux: the hook's inputs reach the full forward's selection

    def attend(self, layer: int, q, k, v, scaling) -> torch.Tensor:
        """q (B, H, n, D), k/v (B, H_kv, n, D) of positions start..start+n-1 -> (B, n, H, D)."""
        start, cache, n = self.state.length, self.state.caches[layer], q.shape[2]
        keys, values = cache.write("k", k, 2, start), cache.write("v", v, 2, start)  # (B, H_kv, start+n, D)
        if self.full is not None:  # the prefill: the plan's own maths; the indexer keys of every prompt position
            if self.plan.selection == "dsa":
                keys = index_keys(self.indexers[layer], self.aux.inputs[layer])  # (B, L, d_I)
                cache.write("index_keys", keys.to(self.index_dtype or keys.dtype), 1, 0)
            return self.full.attend(layer, q, k, v, scaling)
        if n != 1:
            raise ValueError(f"a cached step takes one new token per sequence, got {n}; prefill the prompt at once")
        return self.attend_one(layer, q, keys, values, scaling)

    def attend_one(self, layer: int, q, keys, values, scaling) -> torch.Tensor:
        """One new token: q (B, H, 1, D) over the cached keys/values (B, H_kv, T, D) -> (B, 1, H, D)."""
        B, H, _, D = q.shape
        H_kv = keys.shape[1]
        if self.plan.selection != "dense":
            idx = timed(self.plan.timer, "indexer", self.select_one, layer, q, keys, scaling)  # (B, K)
            self.state.selected[layer] = idx
            cache = self.state.caches[layer].buffers  # whole buffers (B, H_kv, capacity, D)
            if cpu_sparse.decode_available(q, cache["k"], cache["v"]):  # the k rows read in place (C++, one call)
                return timed(self.plan.timer, "attention", cpu_sparse.decode_attention, q, cache["k"], cache["v"], idx,
                             scaling)
            keys, values = _take(cache["k"], idx, 2), _take(cache["v"], idx, 2)  # contiguous: k rows copied, not all
        q = q.reshape(B, H_kv, H // H_kv, D)  # a GQA group's query heads side by side, as queries of its KV head
        out = timed(self.plan.timer, "attention", lambda: F.scaled_dot_product_attention(
            q, keys, values, scale=scaling))  # every cached (or selected) key is past: no mask
        return out.reshape(B, 1, H, D)

    def select_one(self, layer: int, q, keys, scaling) -> torch.Tensor:
        """The new token's top-k cached positions (B, min(k, T)), every slot valid."""
        if self.plan.selection == "dsa":  # chunked_select's row T-1 (the fused C++ pass on CPU)
            pos = self.state.length
            indexer = self.indexers[layer]
            if self.rope_row is None:
                self.rope_row = indexer.row_rotation(pos)  # every layer's indexer has the same RoPE
            x = self.aux.inputs[layer]  # (B, 1, d_model)
            kernels = self.state.row_kernels
            if layer not in kernels:  # made at the generation's first step (its weights do not change after)
                kernels[layer] = cpu_indexer_row.row_kernel(indexer, x, self.rope_row)
            iq, ik, iw = (kernels[layer](x, self.rope_row) if kernels[layer] else
                          indexer.project_row(x, pos, self.rope_row))  # (B,1,H_I,d_I) (B,1,d_I) (B,1,H_I)
            dtype = self.index_dtype
            cached_keys = self.state.caches[layer].write("index_keys", ik.to(dtype or ik.dtype), 1, pos)  # (B, T, d_I)
            if self.plan.window:  # structured: the full forward's rule at this row
                return levers.structured_row(iq, cached_keys, iw, self.plan.top_k, self.plan.sinks, self.plan.window,
                                             dtype)
            return select_last_rows(iq, cached_keys, iw, self.plan.top_k, index_dtype=dtype)[0][:, 0]  # (B, K)
        # oracle: the head-summed attention of this query, as retrofit.oracle_selection computes a row
        D = q.shape[-1]
        q = q * ((scaling if scaling is not None else D ** -0.5) * D ** 0.5)
        row = causal_attention_probs(q, retrofit.per_head(keys, q.shape[1] // keys.shape[1])).sum(1)  # (B, 1, T)
        check_no_nan(row)
        return select_top_k(row, self.plan.top_k)[0][:, 0]  # row (B, 1, T) -> (B, K)


def index_keys(indexer, x: torch.Tensor) -> torch.Tensor:
    """x (B, L, d_model) -> the indexer's keys (B, L, d_I) at positions 0..L-1: project(x)[1] without its queries
    and weights (at L 8192 the queries are ~4x the keys' projection cost)."""
    return indexer._rope(indexer.k_norm(indexer.k_proj(x)))


def _forward(model: RetrofitLM, state: RetrofitState, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
    """The base model over ids (B, n) at positions state.length.. with the cached call -> logits (B, n or 1, V).
    A decode step's few rows go through row_linear (torch's CPU GEMV is one thread at a third of the speed)."""
    n = ids.shape[1]
    positions = torch.arange(state.length, state.length + n, device=ids.device)[None].expand(ids.shape[0], n)
    if state.few_rows is None:
        state.few_rows = few_row_linears(model)
    with state.few_rows if ids.numel() <= MAX_ROWS else nullcontext():
        out = model.base(input_ids=ids, position_ids=positions, use_cache=False, dsa_call=_CachedCall(model, state),
                         logits_to_keep=0 if all_logits else 1)
    state.length += n
    return out.logits


@torch.no_grad()
def prefill(model: RetrofitLM, ids: torch.Tensor, plan: Plan = Plan(), capacity: int | None = None,
            all_logits: bool = False):
    """ids (B, L) -> logits (B, L, vocab) with all_logits, else of the last position (B, 1, vocab) (at L 8192 the
    full logits of SmolLM2 are 1.6 GB), and a RetrofitState caching positions 0..L-1. capacity: positions the
    caches hold (default L + 256)."""
    L = ids.shape[1]
    capacity = capacity or L + 256
    check_cached_plan(model, plan, L)
    if capacity < L:
        raise ValueError(f"capacity={capacity} is smaller than the prompt ({L} tokens); give capacity >= {L}")
    state = RetrofitState(plan, [LayerCache(capacity) for _ in model.indexers], 0)
    return _forward(model, state, ids, all_logits), state


@torch.no_grad()
def decode_step(model: RetrofitLM, state: RetrofitState, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, 1) at position state.length -> logits (B, 1, vocab); every cache gains that position."""
    check_cached_plan(model, state.plan, state.length + 1)
    return _forward(model, state, tokens, all_logits=False)


@torch.no_grad()
def generate(model: RetrofitLM, ids: torch.Tensor, n_new: int, plan: Plan = Plan(), *, temperature: float = 0.0,
             top_k: int = 0, generator: torch.Generator | None = None, timing: dict | None = None) -> torch.Tensor:
    """(B, L) -> (B, L + n_new) on the caches. temperature 0: greedy (the tokens of retrofit.greedy_generate, a full
    forward per token); else a draw from softmax(logits / T) among the top_k most likely tokens (0 = all).
    timing (a dict, if given) gains prefill_s, decode_s and decode_steps."""
    if n_new < 1 or temperature < 0 or top_k < 0:
        raise ValueError(f"n_new={n_new} must be >= 1, temperature={temperature} >= 0 and top_k={top_k} >= 0")
    check_cached_plan(model, plan, ids.shape[1] + n_new - 1)  # the last new token is never fed back
    timing = {} if timing is None else timing
    t0 = time.perf_counter()
    logits, state = prefill(model, ids, plan, capacity=ids.shape[1] + n_new)
    timing.update(prefill_s=time.perf_counter() - t0, decode_s=0.0, decode_steps=0)
    out = [ids]
    for step in range(n_new):
        out.append(sample_next(logits[:, -1], temperature, top_k, generator)[:, None])  # (B, 1)
        if step + 1 < n_new:
            t0 = time.perf_counter()
            logits = decode_step(model, state, out[-1])
            timing["decode_s"] += time.perf_counter() - t0
            timing["decode_steps"] += 1
    return torch.cat(out, dim=1)
