"""A cached decode step's sparse attention in one C++ call (cpu_sparse.decode_attention: the selected rows read in
place from the preallocated caches) against its twin, the rows gathered and SDPA: MHA and GQA, rows at any place in
a larger buffer, the default and a given scale; and the retrofit's cached steps through it still equal full
recomputation."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from dsa_lab.kernels import cpu_sparse
from test_retrofit_decode import test_prefill_then_steps_equal_full_recomputation as steps_equal_full_recomputation

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")


@pytest.mark.parametrize("H, Hkv, D, Dv", [(6, 2, 16, 16), (4, 4, 8, 12), (9, 3, 64, 64)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_decode_attention_is_gathered_rows_and_sdpa(H, Hkv, D, Dv, scale):
    g = torch.Generator().manual_seed(0)
    B, T, capacity, K = 2, 50, 64, 8
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2)  # (B, H, 1, D) as the attention hands it over
    k_cache, v_cache = torch.randn(B, Hkv, capacity, D, generator=g), torch.randn(B, Hkv, capacity, Dv, generator=g)
    idx = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B)])  # (B, K) distinct past positions
    with torch.no_grad():
        assert cpu_sparse.decode_available(q, k_cache, v_cache)
        got = cpu_sparse.decode_attention(q, k_cache, v_cache, idx, scale)
    take = lambda t: t.gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))  # (B, Hkv, K, .)
    want = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), take(k_cache), take(v_cache), scale=scale)
    torch.testing.assert_close(got, want.reshape(B, 1, H, Dv), rtol=1e-5, atol=1e-6)


def test_decode_attention_is_refused_where_it_does_not_serve():
    q, cache = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 16, 8)
    assert not cpu_sparse.decode_available(q, cache, cache)  # autograd on
    with torch.no_grad():
        assert not cpu_sparse.decode_available(q.double(), cache.double(), cache.double())
        assert not cpu_sparse.decode_available(torch.randn(1, 2, 3, 8), cache, cache)  # one new token only


def test_the_retrofit_decode_step_attends_through_the_kernel(monkeypatch):
    calls = []
    real = cpu_sparse.decode_attention
    monkeypatch.setattr(cpu_sparse, "decode_attention", lambda *a: calls.append(1) or real(*a))
    steps_equal_full_recomputation("qwen3", "dsa", 8, "gather")
    assert len(calls) == 6 * 2  # 6 steps x 2 layers
