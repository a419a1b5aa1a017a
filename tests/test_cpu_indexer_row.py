"""A decode step's indexer projection in one C++ call (dsa_lab/kernels/cpu_indexer_row.py) against its twin,
LightningIndexer.project_row (bit for bit project()'s row): q, k and w equal to fp32 rounding (the kernel's GEMVs sum
in their own order), at the retrofit's width and at widths off the 4-row / 8-lane blocks; the cases it does not serve
go to project_row."""
import os
import shutil

import pytest
import torch

from dsa_lab.kernels import cpu_indexer_row
from sparse_attention import LightningIndexer
from test_retrofit_decode import test_prefill_then_steps_equal_full_recomputation as steps_equal_full_recomputation

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")


def _indexer(d_model, heads, dim, rope, seed=0):
    torch.manual_seed(seed)
    indexer = LightningIndexer(d_model, heads, dim, rope, 64)
    with torch.no_grad():  # LayerNorm's affine off its init, so a swapped gain or bias shows
        indexer.k_norm.weight.copy_(torch.randn(dim))
        indexer.k_norm.bias.copy_(torch.randn(dim))
    return indexer


@pytest.mark.parametrize("d_model, heads, dim, rope", [(576, 4, 64, 32), (40, 3, 12, 4), (37, 6, 10, 10)])
def test_the_kernel_row_is_project_row(d_model, heads, dim, rope):
    indexer = _indexer(d_model, heads, dim, rope)
    x = torch.randn(2, 1, d_model)
    with torch.no_grad():
        for pos in (0, 1, 37, 63):
            rope_row = indexer.row_rotation(pos)
            got = cpu_indexer_row.row_kernel(indexer, x, rope_row)(x, rope_row)
            want = indexer.project_row(x, pos, rope_row)
            for g, w in zip(got, want):
                assert g.shape == w.shape
                torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-6)


def test_what_the_kernel_does_not_serve_goes_to_project_row():
    indexer = _indexer(40, 3, 12, 4)
    x = torch.randn(1, 1, 40)
    rope_row = indexer.row_rotation(5)
    assert cpu_indexer_row.row_kernel(indexer, x, rope_row) is None  # autograd on: the kernel has no backward
    with torch.no_grad():
        assert cpu_indexer_row.row_kernel(indexer, x, rope_row) is not None
        assert cpu_indexer_row.row_kernel(indexer, x, None) is None  # no RoPE row: project()'s layouts
        assert cpu_indexer_row.row_kernel(indexer, x.double(), rope_row) is None
        assert cpu_indexer_row.row_kernel(indexer, torch.randn(1, 2, 40), rope_row) is None  # one position only
        subclass = type("OwnKeys", (LightningIndexer,), {"key_features": lambda self, x, start=0: self.k_proj(x)})
        assert cpu_indexer_row.row_kernel(subclass(40, 3, 12, 4, 64), x, rope_row) is None


def test_the_retrofit_decode_step_projects_through_the_kernel(monkeypatch):
    """The cached step calls the kernel where it serves, and its logits and selections still equal full
    recomputation (test_retrofit_decode's check, tiny GQA model, k 8 < context)."""
    calls = []
    real = cpu_indexer_row.RowKernel.__call__
    monkeypatch.setattr(cpu_indexer_row.RowKernel, "__call__", lambda *a: calls.append(1) or real(*a))
    steps_equal_full_recomputation("llama", "dsa", 8, "gather")
    assert len(calls) == 6 * 2  # 6 steps x 2 layers
