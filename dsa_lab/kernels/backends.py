"""Attention backends: how a DSA layer selects its keys and attends over them, one class per
config.ATTENTION_BACKENDS name. Every class has the reference `sparse_attention.MaskedBackend`'s methods
with the same signatures (select, attend, attend_latent, selected_scores); tests/test_kernels.py checks
that, and that each equals the reference (outputs and gradients).

  gather  token-level: chunked selection (kernels.chunked_select); MHA/GQA attention through the C++ kernel on CPU
          (kernels.cpu_sparse, fp32/fp64, when it builds) else kernels.sparse_attention_gather (KV heads repeated),
          kernels.chunked_mqa.sparse_mqa_attention (MLA's shared latent rows)
  triton  the same through the Triton kernels (dsa_lab/kernels/triton_mha.py, dsa_lab/kernels/triton_mqa.py)
  block   the query-block-shared model (kernels.block_*); flex: the block model through FlexAttention

Outside config.ATTENTION_BACKENDS (the retrofit's evaluation, dsa_lab/interop/retrofit.py):
  sdpa_mask  the reference's maths in one fused scaled_dot_product_attention with S_t as a boolean mask
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsa_lab.kernels.chunked import (BLOCK_SIZE, block_index_scores, block_select, block_sparse_attention, chunked_select,
                     expand_block_selection, flex_block_attention, selected_index_scores, sparse_attention_gather)
from dsa_lab.kernels.chunked_mqa import sparse_mqa_attention
from dsa_lab.kernels.cpu_sparse import check_gqa_shapes, kernel_available, sparse_attention_cpu
from sparse_attention import MaskedBackend, Selection, TopKTokenSelector, check_selection, selection_mask
from dsa_lab.kernels.triton_mha import sparse_attention_triton, triton_index_scores
from dsa_lab.kernels.triton_mqa import sparse_mqa_attention_triton


def fast_selectable(indexer, selector) -> bool:
    """A plain lightning indexer (scores = index_scores(*project(x))) with plain top-k: chunked selection applies."""
    return getattr(indexer, "fast_selectable", False) and type(selector) is TopKTokenSelector


class GatherBackend(MaskedBackend):
    """Token-level DSA over exactly the selected tokens. With the plain lightning indexer and top-k
    selector, selection is chunked (no L x L tensor) and the sparse KL recomputes index scores at the
    selected slots only; other indexers and selectors select through the reference path."""
    name = "gather"

    def __init__(self, index_dtype: torch.dtype | None = None):
        self.index_dtype = index_dtype  # torch.bfloat16: the indexer's q.k GEMM in bf16 (chunked_select)

    def select(self, indexer, selector, x, *, shared_scores=None, shared_coarse=None) -> Selection:
        if not fast_selectable(indexer, selector):
            return super().select(indexer, selector, x, shared_scores=shared_scores, shared_coarse=shared_coarse)
        iq, ik, iw = indexer.project(x)  # (B, L, H_I, d_I), (B, L, d_I), (B, L, H_I)
        selection = self.select_indexed(iq.detach(), ik.detach(), iw.detach(), selector.top_k)
        selection.index_inputs = (iq, ik, iw)
        return selection

    def select_indexed(self, q, k, w, top_k: int) -> Selection:
        """Top-k from the indexer's projections q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I)."""
        return Selection(*chunked_select(q, k, w, top_k, index_dtype=self.index_dtype))

    def attend(self, q, k, v, *, selection: Selection, return_probs: bool = False):
        """q (B, H, L, D), k/v (B, Hkv, L, D) with Hkv dividing H (MHA or GQA). CPU fp32/fp64 with the C++ kernel
        built: the kernel (reads each selected row once per KV head, no gather; at L 8192 k 256 its fwd+bwd took
        2.5x less CPU time than the torch path, docs/benchmarks.md); otherwise the chunked torch path, KV heads
        repeated for GQA. MLA's shared rows (attend_latent) stay on chunked_mqa: the kernel was slower there
        (heads as the rows of one matmul per query beat per-head dot products)."""
        if kernel_available(q) and q.dtype == k.dtype == v.dtype:
            return sparse_attention_cpu(q, k, v, selection.selected_idx, selection.valid, return_probs)
        return sparse_attention_gather_torch(q, k, v, selection, return_probs)

    def attend_latent(self, q, kv, *, selection: Selection, v_dim: int, scale: float, return_probs: bool = False):
        return sparse_mqa_attention(q, kv, selection.selected_idx, selection.valid, v_dim=v_dim, scale=scale,
                                    return_probs=return_probs)

    def selected_scores(self, selection: Selection) -> torch.Tensor:
        if selection.index_inputs is None:
            return super().selected_scores(selection)
        return selected_index_scores(*selection.index_inputs, selection.selected_idx, selection.valid)


def sparse_attention_gather_torch(q, k, v, selection: Selection, return_probs: bool = False):
    """The gather backend's torch path (every device; the C++ kernel's reference twin): GQA's KV heads repeated
    for their query groups, then `chunked.sparse_attention_gather`."""
    check_gqa_shapes(q, k, v)
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return sparse_attention_gather(q, k, v, selection.selected_idx, selection.valid, return_probs)


class SdpaMaskBackend(GatherBackend):
    """Selection as `gather` (chunked); attention = the masked reference's maths in one fused SDPA call with S_t as a
    boolean mask: every score is computed (dense cost) but no (B, H, L, L) tensor is kept. On CPU it beats
    gathering k keys per query and head once k is more than a few dozen, so quality evaluations use it; it saves
    no work, so speed is measured with `gather`. Probabilities at the slots (return_probs) come from the reference."""
    name = "sdpa_mask"

    def attend(self, q, k, v, *, selection: Selection, return_probs: bool = False):
        if return_probs:
            return MaskedBackend.attend(self, q, k, v, selection=selection, return_probs=True)
        check_selection(selection.selected_idx, selection.valid, q.shape[2])
        allowed = selection_mask(selection.selected_idx, selection.valid, q.shape[2])[:, None]  # (B, 1, L, L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=k.shape[1] != q.shape[1]), None


class BlockBackend(GatherBackend):
    """Our query-block-shared model: blocks of `block_size` queries share one selected set (block_select),
    plus causal attention inside their own block. Needs the plain lightning indexer and top-k selector."""
    name = "block"

    def __init__(self, block_size: int = BLOCK_SIZE):
        super().__init__()
        self.block_size = block_size

    def select(self, indexer, selector, x, *, shared_scores=None, shared_coarse=None) -> Selection:
        if not fast_selectable(indexer, selector):
            raise ValueError(f"attention_backend={self.name!r} needs the plain lightning indexer and top-k "
                             f"selector; use attention_backend='gather' with other indexers or selectors")
        return super().select(indexer, selector, x)

    def select_indexed(self, q, k, w, top_k: int) -> Selection:
        block_idx, block_valid = block_select(q, k, w, top_k, self.block_size)
        selected_idx, valid = expand_block_selection(block_idx, block_valid, self.block_size, q.shape[1])
        return Selection(selected_idx, valid, block_idx=block_idx, block_valid=block_valid,
                         block_size=self.block_size)

    def attend(self, q, k, v, *, selection: Selection, return_probs: bool = False):
        return block_sparse_attention(q, k, v, selection.block_idx, selection.block_valid, selection.block_size,
                                      return_probs)

    def selected_scores(self, selection: Selection) -> torch.Tensor:
        scores = block_index_scores(*selection.index_inputs, selection.block_idx, selection.block_size)
        return scores.masked_fill(~selection.valid, float("-inf"))


class FlexBackend(BlockBackend):
    """The block model through FlexAttention (GPU; CPU forward only)."""
    name = "flex"

    def attend(self, q, k, v, *, selection: Selection, return_probs: bool = False):
        return flex_block_attention(q, k, v, selection.block_idx, selection.block_valid, selection.block_size,
                                    return_probs)

    def attend_latent(self, q, kv, *, selection: Selection, v_dim: int, scale: float, return_probs: bool = False):
        """MLA's shared latent rows are not FlexAttention's per-head K/V: refused, never run by another path."""
        raise ValueError("attention_backend='flex' runs FlexAttention over per-head K/V (MHA); with attention_type='mla' use "
                         "'block' (the same block model over MLA's shared latent rows) or 'gather'")


class TritonBackend(GatherBackend):
    """Token-level DSA through the Triton kernels; on CUDA the chunked selection scores with the fused
    indexer kernel."""
    name = "triton"

    def select_indexed(self, q, k, w, top_k: int) -> Selection:
        return Selection(*chunked_select(q, k, w, top_k, score_fn=triton_index_scores if q.is_cuda else None))

    def attend(self, q, k, v, *, selection, return_probs: bool = False):
        return sparse_attention_triton(q, k, v, selection.selected_idx, selection.valid, return_probs)

    def attend_latent(self, q, kv, *, selection, v_dim: int, scale: float, return_probs: bool = False):
        return sparse_mqa_attention_triton(q, kv, selection.selected_idx, selection.valid, v_dim=v_dim, scale=scale,
                                           return_probs=return_probs)
