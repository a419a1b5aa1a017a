"""Fast sparse paths (dsa_lab/kernels/chunked.py) against the masked reference: selection, outputs, gradients, causality."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dsa_lab.kernels import chunked as kernels
from dsa_lab.kernels.backends import BlockBackend
from dsa_lab.kernels import triton_mha as triton_kernels
from dsa_lab.common import work_sizes
from conftest import ROOT, tiny_model_config
from models import BACKENDS, SparseAttentionMoELLM, build_backend
from sparse_attention import (AttentionMode, MaskedBackend, Selection, TopKTokenSelector, index_scores,
                              sparse_attention_masked)

SHAPES = [(1, 1, 5, 4, 2), (2, 3, 37, 8, 7), (1, 2, 64, 16, 20), (2, 2, 19, 8, 40)]  # B, H, L, D, k


def _indexer(B, L, H_I=2, d_I=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H_I, d_I, generator=g, dtype=dtype)
    return q, torch.randn(B, L, d_I, generator=g, dtype=dtype), torch.randn(B, L, H_I, generator=g, dtype=dtype)


def _qkv(B, H, L, D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def _run(fn, q, k, v, *args):
    out, probs = fn(q, k, v, *args, return_probs=True)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    return out, probs, torch.autograd.grad(out, (q, k, v), grad_out)


def _assert_same(a, b, atol=1e-10):
    (oa, pa, ga), (ob, pb, gb) = a, b
    torch.testing.assert_close(oa, ob, atol=atol, rtol=0)
    torch.testing.assert_close(pa, pb, atol=atol, rtol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def _sorted(idx):
    return idx.sort(-1).values


@pytest.mark.parametrize("B,H,L,D,k", SHAPES)
def test_chunked_select_equals_reference_selector(B, H, L, D, k):
    q, kk, w = _indexer(B, L)
    q = q.round()  # integer-valued inputs: many exact ties, which both paths must break the same way
    ref_idx, ref_valid = TopKTokenSelector(k)(index_scores(q, kk.round(), w.round()))
    for chunk in (1, 3, L):
        idx, valid = kernels.chunked_select(q, kk.round(), w.round(), k, chunk=chunk)
        assert torch.equal(_sorted(idx), _sorted(ref_idx)) and torch.equal(valid.sum(-1), ref_valid.sum(-1))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("budget", [1, 40, 700])
def test_chunked_select_variable_prefix_chunks_equal_reference(monkeypatch, budget, fused):
    """Default chunking (more queries per chunk while the key prefix is short) picks the reference's set, through
    the fused C++ pass and its torch twin."""
    monkeypatch.setitem(work_sizes.CPU_BUDGETS, "index", budget)
    monkeypatch.setattr(kernels, "FUSED_SELECT", fused)
    B, L, k = 2, 57, 9
    q, kk, w = (t.round() for t in _indexer(B, L))  # many exact ties (ReLU zeros, -0.0 vs +0.0)
    ref_idx, ref_valid = TopKTokenSelector(k)(index_scores(q, kk, w))
    idx, valid = kernels.chunked_select(q, kk, w, k)
    assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid)


@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("weights", ["random", "zero"])
def test_block_max_prefilter_picks_the_reference_set_and_order(monkeypatch, chunk, weights):
    """Rows long enough for `_chunk_top_k`'s block prefilter, with many exact ties (integer inputs; zero weights tie
    every key at +-0.0, so only the tie-break toward recent tokens decides) and short last blocks (chunk=5)."""
    B, L, k = 2, 203, 6
    q, kk, w = (t.round() for t in _indexer(B, L))
    w = w * 0 if weights == "zero" else w
    monkeypatch.setattr(kernels, "FUSED_SELECT", False)  # the torch path (the fused C++ twin: tests/test_cpu_select.py)
    pooled = []
    pool = kernels.F.max_pool1d
    monkeypatch.setattr(kernels.F, "max_pool1d", lambda x, *a, **kw: pooled.append(x.shape[-1]) or pool(x, *a, **kw))
    ref_idx, ref_valid = TopKTokenSelector(k)(index_scores(q, kk, w))
    idx, valid = kernels.chunked_select(q, kk, w, k, chunk=chunk)
    assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid)
    assert max(pooled) == L and (chunk is None or any(S % kernels.SELECT_BLOCK for S in pooled))  # the path ran


def test_key_buffer_equals_the_reference_score_position_key():
    from sparse_attention import score_position_key
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3.4e38, -3.4e38])
    x = torch.cat([special, torch.randn(40, generator=torch.Generator().manual_seed(0))]).view(1, 1, -1).repeat(2, 3, 1)
    keys = kernels._KeyBuffer(2, x.shape[-1], "cpu")
    for scores in (x, x[:, :2, :17].contiguous(), x.double(), x[:, :1]):
        assert torch.equal(keys.of(scores), score_position_key(scores))


def test_selected_index_scores_and_grads_match_full_scores():
    B, L = 2, 23
    q, kk, w = (t.requires_grad_() for t in _indexer(B, L))
    idx, valid = kernels.chunked_select(q, kk, w, 6)
    full = index_scores(q, kk, w).gather(-1, idx.clamp(min=0))
    fast = kernels.selected_index_scores(q, kk, w, idx, valid)
    weights = torch.randn(idx.shape, dtype=torch.float64)
    ga = torch.autograd.grad((torch.where(valid, full, 0) * weights).sum(), (q, kk, w))
    gb = torch.autograd.grad((torch.where(valid, fast, 0) * weights).sum(), (q, kk, w))
    assert torch.isinf(fast[~valid]).all()
    torch.testing.assert_close(torch.where(valid, fast, 0), torch.where(valid, full, 0))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("B,H,L,D,k", SHAPES)
def test_gather_matches_masked_reference(B, H, L, D, k):
    q, kk, v = _qkv(B, H, L, D)
    idx, valid = kernels.chunked_select(*_indexer(B, L), k)
    _assert_same(_run(kernels.sparse_attention_gather, q, kk, v, idx, valid),
                 _run(sparse_attention_masked, q, kk, v, idx, valid))


def test_gather_small_chunks_and_fp32(monkeypatch):
    monkeypatch.setitem(work_sizes.CPU_BUDGETS, "gather", 1)  # one query per chunk
    q, kk, v = (t.detach().float().requires_grad_() for t in _qkv(2, 2, 21, 8))
    idx, valid = kernels.chunked_select(*_indexer(2, 21), 5)
    (oa, pa, ga), (ob, pb, gb) = (_run(kernels.sparse_attention_gather, q, kk, v, idx, valid),
                                  _run(sparse_attention_masked, q, kk, v, idx, valid))
    torch.testing.assert_close(oa, ob, atol=1e-5, rtol=1e-5)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,H,L,D,k,budget", [(2, 5, 33, 12, 16, 1), (1, 8, 70, 64, 24, 1 << 19),
                                              (3, 1, 9, 3, 9, 7), (1, 4, 50, 16, 64, 5000)])
def test_gather_more_shapes_and_chunkings(monkeypatch, B, H, L, D, k, budget):
    """Odd heads/dims, k > L, one query per chunk and several: outputs, probs and all grads equal the reference."""
    monkeypatch.setitem(work_sizes.CPU_BUDGETS, "gather", budget)
    q, kk, v = _qkv(B, H, L, D)
    idx, valid = kernels.chunked_select(*_indexer(B, L), k)
    _assert_same(_run(kernels.sparse_attention_gather, q, kk, v, idx, valid),
                 _run(sparse_attention_masked, q, kk, v, idx, valid))


def test_gather_bf16_keeps_fp32_statistics():
    """bf16 inputs: softmax statistics in fp32, so outputs and grads stay within bf16 rounding of the fp64
    reference (a bf16 softmax over 200 slots drifts further); dtypes of outputs/grads are the inputs', the
    probabilities fp32."""
    B, H, L, D, k = 1, 4, 300, 32, 200
    q64, k64, v64 = _qkv(B, H, L, D)
    idx, valid = kernels.chunked_select(*_indexer(B, L), k)
    grad_out = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ref_out, _ = sparse_attention_masked(q64, k64, v64, idx, valid)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), grad_out)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q64, k64, v64))
    out, probs = kernels.sparse_attention_gather(qb, kb, vb, idx, valid, return_probs=True)
    grads = torch.autograd.grad(out, (qb, kb, vb), grad_out.bfloat16())
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert probs.dtype == torch.float32  # the indexer KL's target, fp32 as the masked path's under autocast

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())
    assert rel(out, ref_out) < 6e-3  # measured 4.3e-3; bf16 probabilities (the old path) gave 9.3e-3
    torch.testing.assert_close(probs.double().sum(-1), torch.ones(B, H, L, dtype=torch.float64), atol=1e-2, rtol=0)
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < 2e-2


@pytest.mark.parametrize("B,H,L,D,k", SHAPES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_block_matches_its_masked_reference_twin(B, H, L, D, k, block_size):
    q, kk, v = _qkv(B, H, L, D)
    bidx, bvalid = kernels.block_select(*_indexer(B, L), k, block_size)
    idx, valid = kernels.expand_block_selection(bidx, bvalid, block_size, L)
    assert (idx[valid] <= torch.arange(L)[None, :, None].expand_as(idx)[valid]).all()  # nothing from the future

    def block(q, kk, v, return_probs):
        return kernels.block_sparse_attention(q, kk, v, bidx, bvalid, block_size, return_probs)
    _assert_same(_run(block, q, kk, v), _run(sparse_attention_masked, q, kk, v, idx, valid))


def test_block_with_k_at_least_L_is_dense_attention():
    B, H, L, D = 1, 2, 30, 8
    q, kk, v = _qkv(B, H, L, D)
    sel = kernels.block_select(*_indexer(B, L), L, 8)
    out, _ = kernels.block_sparse_attention(q, kk, v, *sel, 8)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, kk, v, is_causal=True))


def test_block_selection_uses_only_earlier_blocks():
    B, L, Bq = 1, 40, 8
    q, kk, w = _indexer(B, L)
    base = kernels.block_select(q, kk, w, 5, Bq)
    for b in range(1, L // Bq):  # changing anything at positions >= b*Bq leaves blocks <= b unchanged
        q2, k2, w2 = q.clone(), kk.clone(), w.clone()
        for t in (q2, k2, w2):
            t[:, b * Bq:] = torch.randn_like(t[:, b * Bq:])
        other = kernels.block_select(q2, k2, w2, 5, Bq)
        assert torch.equal(other[0][:, : b + 1], base[0][:, : b + 1])


def _causal_check(backend, k, L=20, B=2, H=2, D=8):
    """Selection + attention from per-position inputs: perturbing positions > t changes no output <= t, and the
    gradient of the outputs <= t is zero at positions > t (for gather on CPU: the C++ kernel's backward)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, L, 4 * H * D + 16 + 2, generator=g, dtype=torch.float64)

    def forward(x):
        q, kk, v = (x[..., i * H * D:(i + 1) * H * D].view(B, L, H, D).transpose(1, 2) for i in range(3))
        iq = x[..., 3 * H * D:3 * H * D + 16].reshape(B, L, 2, 8)
        ik, iw = x[..., 3 * H * D + 16:4 * H * D + 16][..., :8], x[..., -2:]
        if backend == "masked":
            sel = Selection(*TopKTokenSelector(k)(index_scores(iq, ik, iw)))
            return MaskedBackend().attend(q, kk, v, selection=sel)[0]
        path = build_backend(tiny_model_config(attention_backend=backend, sparse_block_size=4))
        return path.attend(q, kk, v, selection=path.select_indexed(iq, ik, iw, k))[0]
    base = forward(x)
    for t in (0, 3, 9, L - 2):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(x2[:, t + 1:].shape, generator=g, dtype=torch.float64)
        out = forward(x2)
        torch.testing.assert_close(out[:, :, : t + 1], base[:, :, : t + 1], atol=1e-12, rtol=0)
        assert not torch.allclose(out[:, :, t + 1:], base[:, :, t + 1:])
    xg = x.clone().requires_grad_()  # the backward too: a loss on rows <= t sends no gradient to positions > t
    for t in (3, 9):
        grad, = torch.autograd.grad(forward(xg)[:, :, : t + 1].sum(), xg)
        assert grad[:, : t + 1].any() and not grad[:, t + 1:].any()


@pytest.mark.parametrize("backend", ["masked", "gather", "block"])
@pytest.mark.parametrize("k", [2, 12, 20, 50])  # k < t+1, k > t+1 for early t, k = L, k > L
def test_backends_are_causal(backend, k):
    _causal_check(backend, k)


def test_flex_refuses_cpu_backward_clearly():
    q, kk, v = (t.float() for t in _qkv(1, 2, 16, 8))
    sel = kernels.block_select(*_indexer(1, 16), 4, 4)
    with pytest.raises(ValueError, match="no backward on CPU"):
        kernels.flex_block_attention(q, kk, v, *sel, 4)


def test_flex_forward_on_cpu_matches_block():
    q, kk, v = (t.float() for t in _qkv(1, 2, 40, 8))
    sel = kernels.block_select(*_indexer(1, 40), 6, 8)
    with torch.no_grad():
        out, _ = kernels.flex_block_attention(q, kk, v, *sel, 8)
        ref, _ = kernels.block_sparse_attention(q, kk, v, *sel, 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_every_backend_has_the_reference_signatures():
    """One contract: select / attend / selected_scores take the same (keyword-only) arguments everywhere."""
    import inspect

    def parameters(fn):  # names, kinds (positional / keyword-only) and defaults; annotations are not the contract
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    for name in ("select", "attend", "selected_scores"):
        reference = parameters(getattr(MaskedBackend, name))
        for backend in BACKENDS.values():
            assert parameters(getattr(backend, name)) == reference, (backend.name, name)


def test_block_backend_refuses_other_selectors():
    model = _model("block", 4)
    with pytest.raises(ValueError, match="plain lightning indexer"):
        model.attentions[0].backend.select(model.attentions[0].indexer, torch.nn.Identity(), torch.randn(1, 8, 32))


# ----------------------------------------------------------------------------- model level
def _model(backend, k, seed=0):
    torch.manual_seed(seed)
    return SparseAttentionMoELLM(tiny_model_config(sparse_top_k=k, attention_backend=backend, sparse_block_size=8))


@pytest.mark.parametrize("k", [3, 17, 64])
def test_model_gather_equals_masked_logits_and_indexer_loss(k):
    ref, fast = _model("masked", k), _model("gather", k)
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(5))
    mode = AttentionMode(sparse=True, indexer_loss="sparse")
    (out_ref, aux_ref), (out_fast, aux_fast) = ref(ids, mode, return_aux=True), fast(ids, mode, return_aux=True)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    loss_ref, loss_fast = aux_ref.indexer_loss, aux_fast.indexer_loss
    torch.testing.assert_close(loss_fast, loss_ref, atol=1e-5, rtol=1e-5)
    names = [name for name, _ in ref.named_parameters()]
    g_ref = torch.autograd.grad(out_ref.square().mean() + loss_ref, ref.parameters(), allow_unused=True)
    g_fast = torch.autograd.grad(out_fast.square().mean() + loss_fast, fast.parameters(), allow_unused=True)
    for name, a, b in zip(names, g_ref, g_fast):
        has_ref, has_fast = a is not None, b is not None
        assert has_ref == has_fast, f"{name}: a reference gradient {has_ref}, a fast-path gradient {has_fast}"
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_model_block_layer_equals_its_masked_twin():
    model = _model("block", 6).eval()
    attn = model.attentions[0]
    x = torch.randn(2, 45, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        q, kk, v = attn.project(x)
        sel = kernels.block_select(*attn.indexer.project(x), 6, 8)
        ref, _ = sparse_attention_masked(q, kk, v, *kernels.expand_block_selection(*sel, 8, 45))
        torch.testing.assert_close(attn(x)[0], attn.merge(ref), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["gather", "block"])
@pytest.mark.parametrize("k", [2, 9, 64])
def test_model_with_fast_backend_is_causal(backend, k):
    model = _model(backend, k).eval()
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = model(ids)
        for t in (0, 7, 21, 38):
            changed = ids.clone()
            changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 64
            torch.testing.assert_close(model(changed)[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- triton (interpreter)
TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from dsa_lab.kernels import chunked as kernels, triton_mha as triton_kernels
    from sparse_attention import index_scores, sparse_attention_masked
    torch.manual_seed(0)
    # default interpreter tiles, then the CUDA tiles forced (BK=16 slots, BN=32 keys); odd H and D
    for (B, H, L, D, K), tiles, itiles in [((1, 3, 12, 16, 5), None, None),
                                          ((2, 3, 21, 12, 19), {"BK": 16}, {"BN": 32}),
                                          ((1, 17, 9, 8, 4), {"BK": 16}, {"BN": 32})]:
        q, k, v = [torch.randn(B, H, L, D, requires_grad=True) for _ in range(3)]
        iq, ik, iw = torch.randn(B, L, 2, 16), torch.randn(B, L, 16), torch.randn(B, L, 2)
        s_ref = index_scores(iq[:, 4:], ik, iw[:, 4:])
        s_tri = triton_kernels.triton_index_scores(iq[:, 4:], ik, iw[:, 4:], block_config=itiles)
        assert torch.equal(torch.isinf(s_ref), torch.isinf(s_tri)), "index score mask"
        fin = torch.isfinite(s_ref)
        assert torch.allclose(s_ref[fin], s_tri[fin], atol=1e-4), "index scores"
        score_fn = lambda a, b, c: triton_kernels.triton_index_scores(a, b, c, block_config=itiles)
        sel = kernels.chunked_select(iq, ik, iw, K, score_fn=score_fn)
        assert torch.equal(sel[0].sort(-1).values, kernels.chunked_select(iq, ik, iw, K)[0].sort(-1).values)
        go = torch.randn(B, H, L, D)
        res = []
        for fn in (lambda *a, **kw: triton_kernels.sparse_attention_triton(*a, **kw, block_config=tiles),
                   sparse_attention_masked):
            out, probs = fn(q, k, v, *sel, return_probs=True)
            res.append((out, probs, torch.autograd.grad(out, (q, k, v), go)))
        (oa, pa, ga), (ob, pb, gb) = res
        assert torch.allclose(oa, ob, atol=1e-5), "out"
        assert torch.allclose(pa, pb, atol=1e-5), "probs"
        for a, b in zip(ga, gb):
            assert torch.allclose(a, b, atol=1e-4), "grads"
    # half indexer operands: tl.dot on fp16 with fp32 accumulation = fp32 scores of the fp16-rounded inputs (no
    # rounding of the per-head scores). bf16 takes the same code, but the interpreter's numpy dot cannot do bf16
    # (it returned values off by 1e10 here), so bf16 is left for a CUDA run.
    iq, ik, iw = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 16), torch.randn(1, 40, 2)
    hq, hk = iq.half(), ik.half()
    s_half = triton_kernels.triton_index_scores(hq, hk, iw, block_config={"BN": 32})
    s_ref = index_scores(hq.float(), hk.float(), iw)
    fin = torch.isfinite(s_ref)
    assert torch.equal(fin, torch.isfinite(s_half)) and torch.allclose(s_half[fin], s_ref[fin], atol=1e-4), "fp16"
    print("TRITON_OK")
""")


def test_triton_kernels_match_reference_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert "TRITON_OK" in result.stdout, result.stderr[-3000:]


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, kk, v = (t.float() for t in _qkv(1, 1, 4, 4))
    idx, valid = kernels.chunked_select(*_indexer(1, 4), 2)
    with pytest.raises(ValueError, match="needs CUDA"):
        triton_kernels.sparse_attention_triton(q, kk, v, idx, valid)


def test_block_index_scores_match_the_token_level_recompute():
    """The block route to I[t, S_t] (one matmul per block) equals the per-token gather, values and grads."""
    torch.manual_seed(0)
    B, L, H_I, d_I, Bq = 2, 50, 2, 8, 16
    q = torch.randn(B, L, H_I, d_I, requires_grad=True)
    k = torch.randn(B, L, d_I, requires_grad=True)
    w = torch.randn(B, L, H_I, requires_grad=True)
    backend = BlockBackend(Bq)
    selection = backend.select_indexed(q.detach(), k.detach(), w.detach(), 20)
    selection.index_inputs = (q, k, w)
    idx, valid = selection.selected_idx, selection.valid
    fast = backend.selected_scores(selection)
    ref = kernels.selected_index_scores(q, k, w, idx, valid)
    assert torch.equal(torch.isfinite(fast), valid) and torch.allclose(fast[valid], ref[valid], atol=1e-5)
    g_fast = torch.autograd.grad(fast[valid].sum(), (q, k, w))
    g_ref = torch.autograd.grad(ref[valid].sum(), (q, k, w))
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_block_fused_path_matches_the_explicit_probs_path(block_size):
    """Without probs the block backend runs SDPA per block; it must equal the explicit path (outputs, grads)."""
    B, H, L, D, k = 2, 3, 37, 8, 9
    sel = kernels.block_select(*_indexer(B, L), k, block_size)
    outs, grads = [], []
    for return_probs in (False, True):
        q, kk, v = (t.clone().requires_grad_() for t in _qkv(B, H, L, D))
        out, _ = kernels.block_sparse_attention(q, kk, v, *sel, block_size, return_probs)
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, D)).sum(), (q, kk, v)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_worker_threads_equal_one_thread(monkeypatch):
    """run_chunks deals the chunks to CPU worker threads, each with its own dK/dV accumulator: the selection,
    outputs, probs and every gradient of the MHA gather and the MQA path equal the one-thread run (fp64), and
    two shares really ran."""
    from dsa_lab.kernels import chunked_mqa as mqa_kernels
    shares = []
    real = kernels.run_chunks

    def spy(work, bounds, device):
        parts = real(work, bounds, device)
        shares.append(len(parts))
        return parts

    monkeypatch.setattr(kernels, "run_chunks", spy)
    monkeypatch.setattr(mqa_kernels, "run_chunks", spy)
    monkeypatch.setitem(work_sizes.CPU_BUDGETS, "gather", 64)
    monkeypatch.setattr(kernels, "MIN_PARALLEL_CHUNKS", 2)  # these tiny calls have 6-23 chunks
    B, H, L, D, k = 2, 3, 23, 8, 5
    threads, results = torch.get_num_threads(), {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            idx, valid = kernels.chunked_select(*_indexer(B, L), k, chunk=4)
            q, kv = (torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64,
                                 requires_grad=True) for shape in ((B, L, H, D), (B, L, D)))
            out, probs = mqa_kernels.sparse_mqa_attention(q, kv, idx, valid, v_dim=6, return_probs=True, chunk=4)
            mqa = (out, probs, torch.autograd.grad(out, (q, kv), torch.ones_like(out)))
            results[n] = (idx, _run(kernels.sparse_attention_gather, *_qkv(B, H, L, D), idx, valid), mqa)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[1][0], results[2][0])
    _assert_same(results[1][1], results[2][1], atol=1e-12)
    _assert_same(results[1][2], results[2][2], atol=1e-12)
    assert shares == [1] * 5 + [2] * 5  # select, MQA fwd + bwd, gather fwd + bwd: with 1 thread, then with 2
