"""Sparse attention over a shared KV row per token (dsa_lab/kernels/chunked_mqa.py, dsa_lab/kernels/triton_mqa.py) against the masked reference:
outputs, selected probabilities, gradients of q and kv; the Triton kernels on CPU under TRITON_INTERPRET=1."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT
from dsa_lab.kernels.chunked_mqa import sparse_mqa_attention
from sparse_attention import sparse_mqa_attention_masked as sparse_mqa_attention_reference
from sparse_attention import select_top_k

# B, L, H, D, K, v_dim: H=1; odd L with v_dim < D; v_dim == D; K > t+1 on most rows (K clipped to L); odd all
SHAPES = [(1, 5, 1, 4, 2, 4), (2, 37, 3, 12, 9, 8), (1, 64, 4, 16, 20, 16), (2, 19, 2, 8, 40, 5),
          (1, 33, 5, 10, 7, 6)]


def _selection(B, L, K, seed=0, shuffle=True):
    """Causal top-K of random scores -> (B, L, min(K, L)); slots shuffled so invalid ones sit anywhere."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, L, L, generator=g).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    idx, valid = select_top_k(scores, K)
    if shuffle:
        perm = torch.argsort(torch.rand(idx.shape, generator=g), dim=-1)
        idx, valid = idx.gather(-1, perm), valid.gather(-1, perm)
    return idx, valid


def _inputs(B, L, H, D, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D, generator=g, dtype=dtype).requires_grad_()
    kv = torch.randn(B, L, D, generator=g, dtype=dtype).requires_grad_()
    return q, kv


def _run(fn, q, kv, idx, valid, v_dim, **kw):
    out, probs = fn(q, kv, idx, valid, v_dim=v_dim, return_probs=True, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    return out, probs, torch.autograd.grad(out, (q, kv), grad_out)


def _assert_same(a, b, atol=1e-10):
    (oa, pa, ga), (ob, pb, gb) = a, b
    torch.testing.assert_close(oa, ob, atol=atol, rtol=0)
    torch.testing.assert_close(pa, pb, atol=atol, rtol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- reference twin
def test_reference_twin_equals_a_per_token_loop():
    """The reference itself (expand kv to every head, scale, value columns) against the definition."""
    B, L, H, D, K, v_dim, scale = 2, 11, 3, 6, 4, 4, 0.3
    q, kv = _inputs(B, L, H, D)
    idx, valid = _selection(B, L, K)
    out, probs = sparse_mqa_attention_reference(q, kv, idx, valid, v_dim=v_dim, scale=scale, return_probs=True)
    for b in range(B):
        for t in range(L):
            sel = idx[b, t][valid[b, t]]
            p = ((q[b, t] @ kv[b, sel].T) * scale).softmax(-1)  # (H, |S_t|)
            torch.testing.assert_close(out[b, t], p @ kv[b, sel, :v_dim], atol=1e-12, rtol=0)
            torch.testing.assert_close(probs[b, :, t][:, valid[b, t]], p, atol=1e-12, rtol=0)
    assert (probs.permute(0, 2, 3, 1)[~valid] == 0).all()


# ----------------------------------------------------------------------------- torch path
@pytest.mark.parametrize("B,L,H,D,K,v_dim", SHAPES)
def test_torch_path_matches_reference_fp64(B, L, H, D, K, v_dim):
    idx, valid = _selection(B, L, K)
    q, kv = _inputs(B, L, H, D)
    ref = _run(sparse_mqa_attention_reference, q, kv, idx, valid, v_dim)
    for chunk in (None, 1, 4):  # default budget (one chunk here), one query at a time, a ragged last chunk
        _assert_same(_run(sparse_mqa_attention, q, kv, idx, valid, v_dim, chunk=chunk), ref)


def test_torch_path_custom_scale_and_rows_with_no_valid_slot():
    B, L, H, D, K, v_dim = 2, 13, 3, 8, 5, 6
    idx, valid = _selection(B, L, K)
    valid[0, 4], valid[1, 0] = False, False  # rows with nothing to attend to (cannot come from causal top-k)
    idx[~valid] = -1
    q, kv = _inputs(B, L, H, D)
    fast = _run(sparse_mqa_attention, q, kv, idx, valid, v_dim, scale=0.7, chunk=3)
    _assert_same(fast, _run(sparse_mqa_attention_reference, q, kv, idx, valid, v_dim, scale=0.7))
    out, probs, (dq, dkv) = fast
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dkv).all()
    assert (out[0, 4] == 0).all() and (out[1, 0] == 0).all() and (probs[0, :, 4] == 0).all()
    assert (dq[0, 4] == 0).all() and (dq[1, 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_path_half_precision_close_to_fp32(dtype):
    B, L, H, D, K, v_dim = 2, 50, 4, 32, 12, 24
    idx, valid = _selection(B, L, K)
    q, kv = _inputs(B, L, H, D, dtype=torch.float32)
    out32, probs32 = sparse_mqa_attention(q, kv, idx, valid, v_dim=v_dim, return_probs=True)
    qh, kvh = q.detach().to(dtype).requires_grad_(), kv.detach().to(dtype).requires_grad_()
    out, probs = sparse_mqa_attention(qh, kvh, idx, valid, v_dim=v_dim, return_probs=True)
    assert out.dtype == dtype and probs.dtype == torch.float32  # probabilities fp32, as the masked path's under autocast
    tol = 4e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), out32, atol=tol, rtol=tol)
    torch.testing.assert_close(probs.float(), probs32, atol=tol, rtol=tol)
    dq, dkv = torch.autograd.grad(out.float().sum(), (qh, kvh))
    dq32, dkv32 = torch.autograd.grad(out32.sum(), (q, kv))
    assert dq.dtype == dkv.dtype == dtype
    for x, y in ((dq, dq32), (dkv, dkv32)):
        assert (x.float() - y).norm() <= 5 * tol * y.norm()


def test_torch_path_gradcheck():
    idx, valid = _selection(1, 6, 3)
    q, kv = _inputs(1, 6, 2, 4)
    assert torch.autograd.gradcheck(
        lambda q, kv: sparse_mqa_attention(q, kv, idx, valid, v_dim=3, chunk=4)[0], (q, kv))


def test_torch_path_saves_nothing_of_size_heads_by_slots():
    """Memory: backward keeps q, kv, the selection, out and a (B, L, H) lse; no (B, H, L, K) probs, no
    per-head index table, no gathered (L, K, D) rows."""
    B, L, H, D, K, v_dim = 1, 40, 8, 16, 32, 16
    idx, valid = _selection(B, L, K)
    q, kv = _inputs(B, L, H, D)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        sparse_mqa_attention(q, kv, idx, valid, v_dim=v_dim, return_probs=True)
    allowed = q.numel() + kv.numel() + 2 * idx.numel() + B * L * H * v_dim + B * L * H
    assert sum(saved) <= allowed and max(saved) < B * H * L * K


def test_bad_inputs_are_value_errors():
    idx, valid = _selection(1, 6, 3)
    q, kv = _inputs(1, 6, 2, 4)
    with pytest.raises(ValueError, match="v_dim"):
        sparse_mqa_attention(q, kv, idx, valid, v_dim=5)
    with pytest.raises(ValueError, match="kv must be"):
        sparse_mqa_attention(q, kv[:, :5], idx, valid, v_dim=4)
    with pytest.raises(ValueError, match="selected_idx and valid"):
        sparse_mqa_attention(q, kv, idx[:, :5], valid, v_dim=4)


# ----------------------------------------------------------------------------- Triton (interpreter, subprocess)
TRITON_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    from dsa_lab.kernels import triton_mqa
    from sparse_attention import sparse_mqa_attention_masked as sparse_mqa_attention_reference
    sys.path.insert(0, "tests")
    from test_mqa_kernels import _selection, _inputs
    cases = json.loads(sys.argv[1])
    if cases == "cuda_tiles":  # the tiles the GPU autotuner can pick, forced: BLOCK_H of H=3 and 64, every BLOCK_K
        block_ks = sorted({c.kwargs["BLOCK_K"] for c in triton_mqa._CONFIGS})
        cases = [[1, 10, 3, 20, 37, 12, None, "float32", {"BLOCK_H": bh, "BLOCK_K": bk}]
                 for bh in (triton_mqa.block_h_for(3), 64) for bk in block_ks]
        cases.append([1, 6, 20, 16, 70, 16, None, "float32", {"BLOCK_H": 16, "BLOCK_K": 32}])  # 2 head blocks
    for B, L, H, D, K, v_dim, scale, dtype, cfg in cases:
        t0 = time.time()
        dtype = getattr(torch, dtype)
        idx, valid = _selection(B, L, K)
        if K == 5:  # a row with nothing to attend to
            valid[:, 2], idx[:, 2] = False, -1
        q, kv = _inputs(B, L, H, D, dtype=torch.float32)
        go = torch.randn(B, L, H, v_dim, generator=torch.Generator().manual_seed(9))
        ref_out, ref_p = sparse_mqa_attention_reference(q, kv, idx, valid, v_dim=v_dim, scale=scale, return_probs=True)
        ref_g = torch.autograd.grad(ref_out, (q, kv), go)
        qt, kvt = q.detach().to(dtype).requires_grad_(), kv.detach().to(dtype).requires_grad_()
        out, p = triton_mqa.sparse_mqa_attention_triton(qt, kvt, idx, valid, v_dim=v_dim, scale=scale,
                                                        return_probs=True, block_config=cfg)
        g = torch.autograd.grad(out, (qt, kvt), go.to(dtype))
        tol = 2e-5 if dtype == torch.float32 else 3e-3
        assert out.dtype == g[0].dtype == g[1].dtype == dtype and p.dtype == torch.float32  # fp32 probabilities
        for name, a, b in [("out", out, ref_out), ("probs", p, ref_p), ("dq", g[0], ref_g[0]), ("dkv", g[1], ref_g[1])]:
            err = (a.float() - b).abs().max().item()
            assert err <= tol * max(1.0, b.abs().max().item()), (name, B, L, H, D, K, v_dim, cfg, err)
        print("case", B, L, H, D, K, v_dim, cfg, f"{time.time() - t0:.1f}s")
    print("TRITON_MQA_OK")
""")

# B, L, H, D, K, v_dim, scale, dtype, forced tiles (None: the interpreter defaults)
TRITON_CASES = {
    "fp32_shapes": [[1, 12, 3, 16, 5, 16, None, "float32", None],  # v_dim == D (no tail), an empty row
                    [2, 13, 5, 24, 7, 16, 0.3, "float32", None],  # odd L, H=5, v_dim < D, custom scale
                    [1, 40, 3, 20, 37, 12, None, "float32", None],  # odd K over 3 blocks (online softmax)
                    [1, 9, 1, 10, 4, 3, None, "float32", None]],  # H=1, odd dims
    "cuda_tiles": "cuda_tiles",
    "fp16": [[1, 11, 3, 24, 7, 16, None, "float16", None],
             [1, 9, 4, 16, 5, 16, None, "float16", {"BLOCK_H": 64, "BLOCK_K": 64}]],
}


@pytest.mark.parametrize("group", list(TRITON_CASES))
def test_triton_kernels_match_reference_in_interpreter(group):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, json.dumps(TRITON_CASES[group])], env=env,
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "TRITON_MQA_OK" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]


def test_triton_autotune_configs_fit_the_slots():
    from dsa_lab.kernels import triton_mqa
    if triton_mqa.triton is None:
        pytest.skip("triton not installed")
    kept = triton_mqa._prune(triton_mqa._CONFIGS, {"K": 20})
    assert kept and {c.kwargs["BLOCK_K"] for c in kept} == {16, 32}
    assert triton_mqa._prune(triton_mqa._CONFIGS, {"K": 3})  # never empty
    assert [triton_mqa.block_h_for(h) for h in (1, 5, 16, 20, 64, 128)] == [16, 16, 16, 32, 64, 64]


def test_one_config_env_turns_gpu_autotuning_off(monkeypatch):
    """DSA_TRITON_ONE_CONFIG=1 (the GPU check sets it): a CUDA input gets one forced launch config instead of
    None (autotune); without it, autotuning."""
    from types import SimpleNamespace
    from dsa_lab.kernels import triton_mqa
    q = SimpleNamespace(shape=(1, 8, 16, 80), dtype=torch.bfloat16, is_cuda=True)
    monkeypatch.delenv(triton_mqa.ONE_CONFIG_ENV, raising=False)
    assert triton_mqa._meta(q, 64, None)[1] is None
    monkeypatch.setenv(triton_mqa.ONE_CONFIG_ENV, "1")
    assert triton_mqa._meta(q, 64, None)[1] == {"BLOCK_K": 32, "num_warps": 4, "num_stages": 1}


def test_triton_without_gpu_or_triton_is_a_clear_error(monkeypatch):
    from dsa_lab.kernels import triton_mqa
    idx, valid = _selection(1, 6, 3)
    q, kv = (t.detach().float() for t in _inputs(1, 6, 2, 4))
    monkeypatch.setattr(triton_mqa, "triton", None)
    with pytest.raises(ValueError, match="needs the `triton` package"):
        triton_mqa.sparse_mqa_attention_triton(q, kv, idx, valid, v_dim=4)
    monkeypatch.undo()
    if triton_mqa.triton is not None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="needs CUDA"):
            triton_mqa.sparse_mqa_attention_triton(q, kv, idx, valid, v_dim=4)



def test_a_launch_that_needs_too_much_shared_memory_is_retried_with_smaller_tiles():
    """On an H200 the MLA backward at D 576 / H 128 asked 323584 bytes of shared memory (232448 there): the launch
    halves BLOCK_H, then a forced BLOCK_K, down to 16, and re-raises when nothing smaller is left."""
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources
    from dsa_lab.kernels.triton_mqa import launch_fitting

    class Kernel:  # kernel[grid](*args, **meta): fits when BLOCK_H * BLOCK_K <= fits
        def __init__(self, fits):
            self.fits, self.launches = fits, []

        def __getitem__(self, grid):
            def launch(*args, **meta):
                if meta["BLOCK_H"] * meta.get("BLOCK_K", 16) > self.fits:
                    raise OutOfResources(323584, 232448, "shared memory")
                self.launches.append((grid, meta))
            return launch

    kernel = Kernel(fits=16 * 32)
    launch_fitting(kernel, (7, 128, 2), (), {"BLOCK_H": 64}, {"BLOCK_K": 32, "num_warps": 8})
    assert kernel.launches == [((7, 8, 2), {"BLOCK_H": 16, "BLOCK_K": 32, "num_warps": 8})]
    kernel = Kernel(fits=16 * 16)
    launch_fitting(kernel, (7, 128, 2), (), {"BLOCK_H": 64}, {"BLOCK_K": 64})
    assert kernel.launches[0][1] == {"BLOCK_H": 16, "BLOCK_K": 16}
    with pytest.raises(OutOfResources):
        launch_fitting(Kernel(fits=1), (7, 128, 2), (), {"BLOCK_H": 64}, None)
    with pytest.raises(ZeroDivisionError):  # any other error is not retried
        launch_fitting(type("K", (), {"__getitem__": lambda self, g: lambda *a, **m: 1 / 0})(), (1, 1, 1), (),
                       {"BLOCK_H": 64}, None)
