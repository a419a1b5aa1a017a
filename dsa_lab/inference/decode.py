"""Incremental decoding with per-layer caches, and DSA's decode path (DeepSeek-V3.2 serving).

prefill(model, ids)                one normal forward over the prompt (the model's own mode: dense or DSA) whose
                                   attention inputs also fill the caches -> logits (B, L, vocab), DecodeState
decode_step(model, state, token)   the next position only: project the new token (RoPE at its position), append
                                   its keys to the caches and attend over them; the prefix is never recomputed.
                                   Dense: every cached key. Sparse: the new token's indexer queries score every
                                   cached indexer key (all lie in the past: causal by construction), top-k with
                                   select_top_k's tie rule (exact (score, position) key; ties -> most recent),
                                   attention over the cached K/V (MLA: latent rows) at the selected positions.
generate(model, prompt, n, ...)    the sampling loop, cached or by full recomputation (its reference twin).

What a layer caches (buffers allocated once for `capacity` positions):
  MHA  K, V (B, H, T, D) after RoPE
  MLA  the shared rows [c ; k_R] (B, T, kv_rank + rope): compressed latent + decoupled RoPE key; every query head
       attends over them in the absorbed (MQA) form, as the sparse MLA model trains (dense MLA trains in MHA mode:
       the same maths)
  DSA  + the indexer's keys (B, T, d_I) when the layer owns an indexer (a layer sharing its group leader's indexer
       selects from the leader's row of scores, as in training)
The MoE feed-forward runs per token as in training (its output never depends on other tokens).
Decoding supports the lightning indexer with plain top-k (any attention backend: the prefill uses it, the decode
step gathers the selected rows itself); other selectors and quantised / multi-scale indexers are refused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models import MultiHeadLatentAttention
from optimized_indexers import MultiScaleIndexer, OptimizedLightningIndexer
from quantization_utils import precision_index_scores
from sparse_attention import (DENSE, AttentionMode, SparseAttentionLayer, TopKTokenSelector, check_no_nan,
                              index_scores, select_top_k)


class LayerCache:
    """One attention layer's cached tensors, each preallocated for `capacity` positions along its seq dim."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.buffers: dict[str, torch.Tensor] = {}

    def write(self, name: str, x: torch.Tensor, seq_dim: int, start: int) -> torch.Tensor:
        """Store x (positions start..start+n-1 along seq_dim) -> the filled part (positions 0..start+n-1), a view."""
        n = x.shape[seq_dim]
        if start + n > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions and position {start + n - 1} does not fit; "
                             f"prefill with a larger capacity (at most max_seq_len)")
        if name not in self.buffers:
            shape = list(x.shape)
            shape[seq_dim] = self.capacity
            self.buffers[name] = x.new_empty(shape)
        buffer = self.buffers[name]
        buffer.narrow(seq_dim, start, n).copy_(x)
        return buffer.narrow(seq_dim, 0, start + n)


@dataclass
class DecodeState:
    """The caches of one batch of sequences and where the next token goes."""
    caches: list[LayerCache]  # one per layer
    length: int  # positions cached = the next token's position
    sparse: bool  # DSA decode path (else dense attention over every cached key)
    selected_idx: list = field(default_factory=list)  # per layer: the last decoded token's positions (B, K) | None


def check_decodable(model, sparse: bool) -> None:
    """Refuse (ValueError, one line) a model whose selection the decode path does not implement."""
    if not sparse:
        return
    for i, attn in enumerate(model.attentions):
        if not isinstance(attn, SparseAttentionLayer):
            raise ValueError(f"layer {i} has dense attention only; decode it with sparse=False")
        if type(attn.selector) is not TopKTokenSelector:
            raise ValueError(f"layer {i} selects with {type(attn.selector).__name__}; the decode path implements "
                             f"the lightning indexer's plain top-k (selection_pattern='topk', k_strategy='fixed', "
                             f"selection_source='indexer'): decode such a model densely (sparse=False)")
        indexer = attn.indexer
        if indexer is not None and (isinstance(indexer, MultiScaleIndexer) or getattr(indexer, "precision", "fp32") != "fp32"):
            raise ValueError(f"layer {i} has a {type(indexer).__name__} (precision "
                             f"{getattr(indexer, 'precision', 'fp32')}); the decode path implements the fp32 lightning "
                             f"indexer (multiscale_block=0, indexer_precision='fp32')")


# ----------------------------------------------------------------------------- per-layer pieces
def _write_keys(attn, heads, cache: LayerCache, start: int):
    """Cache the tokens' keys -> (the tokens' queries, what attention reads for positions 0..start+n-1).

    MHA: q (B, H, n, D), (K, V) (B, H, start+n, D). MLA: absorbed q (B, n, H, kv_rank + rope), (rows,) (B, start+n, ·)."""
    if isinstance(attn, MultiHeadLatentAttention):
        q, rows = attn.absorbed(heads)
        return q, (cache.write("rows", rows, 1, start),)
    q, k, v = heads
    return q, (cache.write("k", k, 2, start), cache.write("v", v, 2, start))


def _write_index_keys(attn, x: torch.Tensor, heads, cache: LayerCache, start: int):
    """Cache the indexer keys of the tokens -> (their indexer q (B, n, H_I, d_I), w (B, n, H_I), all keys (B, start+n, d_I))."""
    inputs = attn.indexer_input(x, heads)
    q, k, w = attn.indexer.project_row(inputs, start) if x.shape[1] == 1 else attn.indexer.project(inputs, start)
    return q, w, cache.write("index_keys", k, 1, start)


def _index_row(indexer, q, w, keys) -> torch.Tensor:
    """The indexer's own score maths for the new token: -> (B, 1, n) against every cached key."""
    if isinstance(indexer, OptimizedLightningIndexer):
        return precision_index_scores(q, keys, w, indexer.precision)
    return index_scores(q, keys, w)


def _take(x: torch.Tensor, selected: torch.Tensor, dim: int) -> torch.Tensor:
    """x (B, ...) -> per batch row the positions selected[b] (K,) along `dim` (whole rows: faster than gather)."""
    return torch.stack([row.index_select(dim - 1, idx) for row, idx in zip(x, selected)])


def _attend(attn, q, cached, selected: torch.Tensor | None) -> torch.Tensor:
    """The new token's attention over the cached positions `selected` (B, K) (None = all) -> (B, 1, d_model)."""
    if isinstance(attn, MultiHeadLatentAttention):
        (rows,) = cached  # (B, n, kv_rank + rope): keys; values are the first kv_rank dims
        if selected is not None:
            rows = _take(rows, selected, 1)  # (B, K, ·)
        probs = ((q[:, 0] @ rows.transpose(1, 2)) * attn.scale).softmax(-1)  # (B, H, K): every head, one row set
        return attn.merge_latent((probs @ rows[..., :attn.kv_rank])[:, None])  # (B, 1, H, kv_rank) -> (B, 1, d)
    k, v = cached  # (B, H, n, D)
    if selected is not None:
        k, v = _take(k, selected, 2), _take(v, selected, 2)  # (B, H, K, D)
    return attn.merge(F.scaled_dot_product_attention(q, k, v))  # every selected key is past: no mask


# ----------------------------------------------------------------------------- prefill / decode step
@torch.no_grad()
def prefill(model, ids: torch.Tensor, capacity: int | None = None, sparse: bool | None = None):
    """ids (B, L) -> logits (B, L, vocab) of one normal forward, and a DecodeState caching positions 0..L-1.

    sparse: the DSA decode path (default: the model's own mode). capacity: positions the caches hold (default
    max_seq_len). The forward's attention inputs are kept (forward pre-hooks) and projected once more to fill
    the caches: one extra pass of each layer's projections (attention and indexer) over the prompt; no attention
    is recomputed."""
    sparse = model.default_mode.sparse if sparse is None else sparse
    check_decodable(model, sparse)
    capacity = capacity or model.cfg.max_seq_len
    inputs: dict[int, torch.Tensor] = {}
    hooks = [block.attn.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0]))
             for i, block in enumerate(model.blocks)]
    try:
        logits = model(ids, AttentionMode() if sparse else DENSE)
    finally:
        for hook in hooks:
            hook.remove()
    state = DecodeState([LayerCache(capacity) for _ in model.blocks], ids.shape[1], sparse)
    for i, (attn, cache) in enumerate(zip(model.attentions, state.caches)):
        heads = attn.project(inputs[i])
        _write_keys(attn, heads, cache, 0)
        if sparse and attn.indexer is not None:
            _write_index_keys(attn, inputs[i], heads, cache, 0)
    return logits, state


@torch.no_grad()
def decode_step(model, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, 1) at position state.length -> logits (B, 1, vocab); every cache gains that position.

    Mirrors Block.forward / the model's forward for one new token (tests compare it with a full forward)."""
    pos = state.length
    x = model.token_emb(tokens)  # (B, 1, d_model)
    rows, selected = [], []
    for i, (block, cache) in enumerate(zip(model.blocks, state.caches)):
        attn = block.attn
        h = block.attn_norm(x)
        heads = attn.project(h, pos)
        q, cached = _write_keys(attn, heads, cache, pos)
        row = idx = None
        if state.sparse:
            if attn.indexer is not None:
                row = _index_row(attn.indexer, *_write_index_keys(attn, h, heads, cache, pos))  # (B, 1, pos+1)
            else:  # shares its group leader's index scores
                row = rows[model.leaders[i]]
            check_no_nan(row)
            idx = select_top_k(row, attn.selector.top_k)[0][:, 0]  # (B, min(k, pos+1)); every slot valid
        rows.append(row)
        selected.append(idx)
        x = x + _attend(attn, q, cached, idx)
        x = x + block.ffn(block.ffn_norm(x))[0]
    state.length, state.selected_idx = pos + 1, selected
    return model.lm_head(model.norm(x))


# ----------------------------------------------------------------------------- generation
def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, vocab) -> next tokens (B,): argmax at temperature 0, else a draw from softmax(logits / T)
    restricted to the top_k most likely tokens (0 = all)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             generator: torch.Generator | None = None, use_cache: bool = True) -> tuple[list[int], dict]:
    """prompt token ids -> (max_new_tokens new ids, timing {'prefill_s', 'decode_s', 'prefills', 'decode_steps'}).

    use_cache=False is the reference twin: a full forward over the context for every token (counted as decode
    steps). Context window: a prompt longer than max_seq_len is refused. When the context fills max_seq_len it
    slides: the last max_seq_len // 2 tokens are prefilled again (positions restart at 0) and decoding goes on;
    the uncached path sees exactly the same windows, so both give the same tokens."""
    limit = model.cfg.max_seq_len
    if not prompt:
        raise ValueError("the prompt is empty (0 tokens); give at least one token of text")
    if len(prompt) > limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens but the model's max_seq_len is {limit}; shorten the "
                         f"prompt to at most {limit} tokens")
    if max_new_tokens < 1 or temperature < 0 or top_k < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1, temperature={temperature} >= 0 and "
                         f"top_k={top_k} >= 0")
    device = next(model.parameters()).device
    tokens, start, state = list(prompt), 0, None
    timing = {"prefill_s": 0.0, "decode_s": 0.0, "prefills": 0, "decode_steps": 0}
    for _ in range(max_new_tokens):
        if len(tokens) - start > limit:  # the context is full: slide the window, prefill again
            start, state = len(tokens) - max(1, limit // 2), None
        t0 = time.perf_counter()
        if not use_cache:
            logits, phase = model(torch.tensor([tokens[start:]], device=device))[:, -1], "decode"
        elif state is None:
            logits, state = prefill(model, torch.tensor([tokens[start:]], device=device))
            logits, phase = logits[:, -1], "prefill"
        else:
            logits, phase = decode_step(model, state, torch.tensor([[tokens[-1]]], device=device))[:, -1], "decode"
        tokens.append(int(sample_next(logits, temperature, top_k, generator)[0]))
        timing[f"{phase}_s"] += time.perf_counter() - t0
        timing["prefills" if phase == "prefill" else "decode_steps"] += 1
    return tokens[len(prompt):], timing
