"""A cached decode step's indexer projection of one position in one C++ call (`cpu_indexer_row.cpp`, built like
cpu_select.cpp by dsa_lab/kernels/cpp_build.py): `LightningIndexer.project_row`'s q, k and w — three GEMVs, the key's
LayerNorm, the shared RoPE row and the weights' scale — without its ~12 torch ops, which on the 2-thread CPU cost
~330 us per layer against ~50 us of weight reads (docs/benchmarks.md). project_row is its twin
(tests/test_cpu_indexer_row.py: equal to fp32 rounding; the GEMVs sum in 8 lanes, not in torch's order).

  row_kernel(indexer, x, rope_row)   a RowKernel when the kernel serves this indexer and input (CPU, fp32, no autograd,
                                     the base LightningIndexer's projection with project_row's RoPE row, built), else
                                     None. It holds the weights' pointers: make it per generation (the weights must not
                                     change while it lives), as retrofit_decode's state does
  RowKernel(x, rope_row)             x (B, 1, d_model) -> q (B, 1, H_I, d_I), k (B, 1, d_I), w (B, 1, H_I)
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import nn

from dsa_lab.kernels.cpp_build import CppKernel, longs, ptr
from sparse_attention import LightningIndexer

KERNEL = CppKernel(Path(__file__).with_name("cpu_indexer_row.cpp"), "a decode step's indexer row takes project_row")


class RowKernel:
    """One indexer's call, prepared once: a decode step's Python time per layer is the cost here (~2 us an
    attribute on the 2-core VM), so the weights' pointers and the constants are made at construction."""

    def __init__(self, indexer: LightningIndexer):
        self.heads, self.dim = indexer.n_heads, indexer.head_dim
        self.weights = [t.contiguous() for t in (indexer.q_proj.weight, indexer.k_proj.weight,
                                                  indexer.weights_proj.weight, indexer.k_norm.weight,
                                                  indexer.k_norm.bias)]  # held: their pointers stay valid
        self.consts = [*map(ptr, self.weights)]
        self.eps = ctypes.c_double(indexer.k_norm.eps)
        self.scale = ctypes.c_double(indexer.n_heads ** -0.5 * indexer.head_dim ** -0.5)
        self.fn = KERNEL.library().dsa_indexer_row_f32

    def __call__(self, x: torch.Tensor, rope_row) -> tuple:
        B, _, d = x.shape
        x = x.reshape(B, d).contiguous()
        q, k, w = x.new_empty(B, 1, self.heads, self.dim), x.new_empty(B, 1, self.dim), x.new_empty(B, 1, self.heads)
        cos, sin, swap = rope_row
        self.fn(ptr(x), *self.consts, ptr(cos), ptr(sin), ptr(swap), longs(B, d, self.heads, self.dim), self.eps,
                self.scale, ptr(q), ptr(k), ptr(w))
        return q, k, w


def row_kernel(indexer: LightningIndexer, x: torch.Tensor, rope_row) -> RowKernel | None:
    """See the module docstring."""
    serves = (rope_row is not None and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[1] == 1
              and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
              and not torch.compiler.is_compiling() and type(indexer).key_features is LightningIndexer.key_features
              and isinstance(indexer.k_norm, nn.LayerNorm) and indexer.k_norm.weight is not None
              and indexer.k_norm.bias is not None
              and all(lin.bias is None and lin.weight.dtype == torch.float32
                      for lin in (indexer.q_proj, indexer.k_proj, indexer.weights_proj))
              and KERNEL.library() is not None)
    return RowKernel(indexer) if serves else None
