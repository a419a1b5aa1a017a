"""The fused C++ score -> top-k pass (dsa_lab/kernels/cpu_select.py) against its torch twin (chunked._select_chunks'
torch passes) and the reference (index_scores + select_top_k): the same positions in the same order and validity,
ties included (integer-valued inputs: exact sums in any order, ReLU zeros, equal scores broken toward the most
recent key), fp32 / fp64 / the bf16 GEMM, rows shorter than k, structured rows (sinks + window left out)."""
import os
import shutil

import pytest
import torch

from dsa_lab.kernels import chunked, cpu_select
from sparse_attention import index_scores, select_top_k

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")


def _indexer(B, L, H_I=3, d_I=8, dtype=torch.float64, seed=0, integer=True):
    g = torch.Generator().manual_seed(seed)
    q, k, w = (torch.randn(B, L, H_I, d_I, generator=g), torch.randn(B, L, d_I, generator=g),
               torch.randn(B, L, H_I, generator=g))
    if integer:  # small integers: exact products and sums in fp32, fp64 and the bf16 GEMM; many ties
        q, k, w = (t.mul(1.5).round() for t in (q, k, w))
    return q.to(dtype), k.to(dtype), w.to(dtype)


def _reference(q, k, w, top_k, kept=(0, 0)):
    scores = index_scores(q, k, w)  # (B, L, L), -inf at future keys
    if kept != (0, 0):
        L = scores.shape[-1]
        scores = scores.masked_fill(chunked.kept_keys(torch.arange(L), L, *kept), float("-inf"))
    return select_top_k(scores, top_k)


PATHS = ("scoring", "pass", "torch")  # GEMM fused in (fp32) / GEMM + the C++ pass / the torch twin


def _select(monkeypatch, path: str, *args, **kw):
    """chunked_select through one path; asserts that path ran."""
    monkeypatch.setattr(chunked, "FUSED_SELECT", path != "torch")
    if path == "pass":
        monkeypatch.setattr(cpu_select, "scoring_available", lambda q, w: False)
    calls = []
    for name in ("select_rows", "score_rows"):
        real = getattr(cpu_select, name)
        monkeypatch.setattr(cpu_select, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    out = chunked.chunked_select(*args, **kw)
    assert set(calls) == {"scoring": {"score_rows"}, "pass": {"select_rows"}, "torch": set()}[path]
    monkeypatch.undo()  # the next call spies on the real functions again
    return out


def _paths(dtype) -> tuple:
    """The paths that serve dtype here: the fused scoring is fp32's where this machine's GEMM sums as it does."""
    scoring = dtype == torch.float32 and cpu_select.scoring_available(torch.zeros(8), torch.zeros(1))
    return PATHS if scoring else PATHS[1:]


def test_the_kernel_builds_where_a_compiler_exists():
    assert cpu_select.KERNEL.status() == "built"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,L,top_k,chunk", [(2, 57, 9, None), (1, 203, 6, 5), (2, 40, 64, 7), (1, 1, 3, None),
                                             (3, 130, 16, 1)])
@pytest.mark.parametrize("kept", [(0, 0), (2, 3), (4, 16)])
def test_fused_equals_torch_twin_and_reference(monkeypatch, dtype, B, L, top_k, chunk, kept):
    q, k, w = _indexer(B, L, dtype=dtype)
    ref_idx, ref_valid = _reference(q, k, w, top_k, kept)
    for path in _paths(dtype):
        idx, valid = _select(monkeypatch, path, q, k, w, top_k, chunk=chunk, kept=kept)
        assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid), (path, kept)


@pytest.mark.parametrize("weights", ["zero", "negative", "underflow"])
def test_all_tied_rows_keep_the_most_recent_keys(monkeypatch, weights):
    """Zero weights tie every key at +-0.0; negative weights make every ReLU'd score <= 0; fp64 scores of -1e-60
    round to float32 -0.0 beside the +0.0 of ReLU zeros, which the reference keys alike: ties that only the
    tie-break toward recent keys decides, in both paths."""
    q, k, w = _indexer(2, 90, dtype=torch.float64 if weights == "underflow" else torch.float32)
    w = {"zero": w * 0, "negative": -w.abs(), "underflow": -1e-60 * w.abs()}[weights]
    ref = _reference(q, k, w, 12)
    for path in _paths(q.dtype):
        idx, valid = _select(monkeypatch, path, q, k, w, 12)
        assert torch.equal(idx, ref[0]) and torch.equal(valid, ref[1])
    if weights != "negative":
        t = torch.arange(90)[:, None]
        assert torch.equal(idx[0, 20:], (t - torch.arange(12))[20:])  # t, t-1, ..., t-11


def test_bf16_gemm_fused_equals_its_torch_twin(monkeypatch):
    """index_dtype=bf16: the kernel reads the GEMM's bf16 output and sums in fp32, as the torch path does after its
    copy to fp32 (exact here: small integers are bf16-exact)."""
    q, k, w = _indexer(2, 150, dtype=torch.float32)
    a = _select(monkeypatch, "pass", q, k, w, 20, index_dtype=torch.bfloat16)
    b = _select(monkeypatch, "torch", q, k, w, 20, index_dtype=torch.bfloat16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0], _reference(q, k, w, 20)[0])


def test_random_fp32_scores_pick_the_twins_sets(monkeypatch):
    """Continuous fp32 inputs at a realistic width: the two paths sum the head weights in their own order, so a
    near-tie may fall either way; the sets agree in >= 99.9 % of the slots (seen: all of them)."""
    q, k, w = _indexer(1, 600, H_I=4, d_I=32, dtype=torch.float32, integer=False)
    a, va = _select(monkeypatch, "pass", q, k, w, 64)
    b, vb = _select(monkeypatch, "torch", q, k, w, 64)
    assert torch.equal(va, vb)
    same = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1) & va
    assert same.sum() / va.sum() >= 0.999


@pytest.mark.parametrize("B,L,H_I,d_I,top_k,chunk,kept", [
    (1, 700, 4, 64, 64, None, (0, 0)), (2, 333, 16, 64, 40, 7, (4, 16)), (1, 97, 5, 12, 8, 1, (2, 3)),
    (2, 130, 3, 8, 16, 33, (0, 0)), (1, 66, 1, 5, 70, None, (0, 0)), (1, 40, 6, 16, 9, 3, (0, 40))])
def test_fused_scoring_gives_the_gemm_paths_selection_bit_for_bit(monkeypatch, B, L, H_I, d_I, top_k, chunk, kept):
    """fp32 scores a few ulp apart, where any other summation order flips their order: the scoring with the GEMM fused
    in selects exactly what the GEMM + C++ pass selects (positions, order, validity) — tiles cut at odd rows, key
    blocks with tails, head counts not a multiple of 4, widths not a multiple of 8, batch rows, structured rows."""
    if not cpu_select.scoring_available(torch.zeros(d_I), torch.zeros(1)):
        pytest.skip("no fused scoring on this machine (no AVX2 + FMA, or torch's GEMM sums in another order)")
    q, k, w = _near_ties(B, L, H_I, d_I, seed=L)  # summed over d in reverse, 5 of these 6 fail
    a = _select(monkeypatch, "scoring", q, k, w, top_k, chunk=chunk, kept=kept)
    b = _select(monkeypatch, "pass", q, k, w, top_k, chunk=chunk, kept=kept)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _near_ties(B, L, H_I, d_I, seed):
    """Keys within 1e-3 of one positive key: fp32 scores a few ulp apart, whose order any other summation changes."""
    g = torch.Generator().manual_seed(seed)
    k = torch.rand(d_I, generator=g) + 0.5 + 1e-3 * torch.randn(B, L, d_I, generator=g)
    return torch.rand(B, L, H_I, d_I, generator=g), k, torch.rand(B, L, H_I, generator=g)


@pytest.mark.parametrize("d_I", [64, 128, 256, 320])
def test_every_width_selects_what_the_gemm_path_selects(monkeypatch, d_I):
    """Whichever path chunked_select takes at this indexer width (MKL sums 256 or more products in blocks here, so
    the fused scoring must stay off there), its selection is the GEMM + C++ pass's, bit for bit."""
    q, k, w = _near_ties(1, 300, 4, d_I, seed=d_I)
    monkeypatch.setattr(chunked, "FUSED_SELECT", True)
    a = chunked.chunked_select(q, k, w, 32)
    b = _select(monkeypatch, "pass", q, k, w, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_gemm_that_sums_otherwise_keeps_the_gemm_path(monkeypatch):
    """Where torch's GEMM does not give the FMA chain's bits (another BLAS), the fused scoring stays off, so it can
    never change a selection: a GEMM perturbed by one ulp fails the check and chunked_select takes the C++ pass."""
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b, **kw: torch.nextafter(real(a, b), torch.tensor(float("inf"))))
    assert not cpu_select.gemm_sums_in_order()
    monkeypatch.setattr(cpu_select, "_ENTRIES", {})  # the check runs again
    assert not cpu_select.scoring_available(torch.zeros(16), torch.zeros(1))
    calls = []
    monkeypatch.setattr(cpu_select, "select_rows", lambda *a, **kw: calls.append(1))
    chunked.chunked_select(*_indexer(1, 50, H_I=4, d_I=16, dtype=torch.float32), 8)
    assert calls  # FUSED_SELECT on: the GEMM + C++ pass ran


def test_unserved_dtypes_take_the_torch_path(monkeypatch):
    """bf16 inputs (scores in bf16, e.g. CPU autocast) are not the kernel's: the torch path runs and equals the
    reference."""
    q, k, w = _indexer(1, 50, dtype=torch.bfloat16)
    monkeypatch.setattr(cpu_select, "select_rows", lambda *a, **kw: pytest.fail("the kernel ran on bf16 scores"))
    idx, valid = chunked.chunked_select(q, k, w, 8)
    ref_idx, ref_valid = _reference(q, k, w, 8)
    assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid)


@pytest.mark.parametrize("kept", [(0, 0), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_rows_are_chunked_selects_last_rows(monkeypatch, kept, dtype):
    """select_last_rows (a cached decode step's new tokens at the end of the cache) equals chunked_select's last
    rows, through the fused pass and through its torch twin, at every cache length T (rows shorter than k too)."""
    q, k, w = _indexer(2, 70, dtype=dtype)
    full_idx, full_valid = chunked.chunked_select(q, k, w, 24, kept=kept)
    for fused in (True, False):
        monkeypatch.setattr(chunked, "FUSED_SELECT", fused)
        for T in (1, 5, 23, 24, 25, 70):
            for Lq in (1, 3, 6):  # 3 x 1 and 3 x 3 query-head rows: key-major GEMM; 3 x 6 > GEMV_ROWS: q k^T
                if Lq > T:
                    continue
                idx, valid = chunked.select_last_rows(q[:, T - Lq:T], k[:, :T], w[:, T - Lq:T], 24, kept=kept)
                K = min(24, T)
                assert torch.equal(idx, full_idx[:, T - Lq:T, :K]) and torch.equal(valid, full_valid[:, T - Lq:T, :K])


@pytest.mark.parametrize("kept", [(0, 0), (4, 16)])
def test_bf16_decode_rows_read_a_bf16_key_cache_as_chunked_select_bf16(monkeypatch, kept):
    """index_dtype=bf16 with the keys cached in bf16 (a decode step's indexer-key cache): the same rows as
    chunked_select(index_dtype=bf16) over fp32 keys, fused and torch twin; the fp32 path would differ on these
    inputs (the keys below are not bf16-exact: their rounding must happen once, where the cache is written)."""
    q, k, w = _indexer(2, 70, dtype=torch.float32)
    k = k + 1e-3 * torch.randn(k.shape, generator=torch.Generator().manual_seed(1))  # rounding in bf16 matters
    full_idx, full_valid = chunked.chunked_select(q, k, w, 24, kept=kept, index_dtype=torch.bfloat16)
    assert not torch.equal(full_idx, chunked.chunked_select(q, k, w, 24, kept=kept)[0])  # bf16 is visible here
    cache = k.to(torch.bfloat16)
    for fused in (True, False):
        monkeypatch.setattr(chunked, "FUSED_SELECT", fused)
        for T in (1, 23, 25, 70):
            idx, valid = chunked.select_last_rows(q[:, T - 1:T], cache[:, :T], w[:, T - 1:T], 24, kept=kept,
                                                  index_dtype=torch.bfloat16)
            K = min(24, T)
            assert torch.equal(idx, full_idx[:, T - 1:T, :K]) and torch.equal(valid, full_valid[:, T - 1:T, :K])


@pytest.mark.parametrize("where", ["old key", "query", "weights"])
@pytest.mark.parametrize("H_I, d_I", [(3, 8), (4, 64)])
def test_decode_rows_refuse_nan_anywhere(where, H_I, d_I):
    """A NaN in an old cached key, the new query or its weights is refused in one line (the check runs on the
    per-head scores, not on all of the cache)."""
    q, k, w = _indexer(1, 40, H_I=H_I, d_I=d_I, dtype=torch.float32)
    {"old key": k[0, 3], "query": q[0, -1, 1], "weights": w[0, -1]}[where][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        chunked.select_last_rows(q[:, -1:], k, w[:, -1:], 8)


def _spy_decode_row(monkeypatch) -> list:
    calls = []
    real = cpu_select.decode_row
    monkeypatch.setattr(cpu_select, "decode_row", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("H_I, d_I", [(4, 64), (6, 16), (5, 12)])  # 4-head lanes; 4 + 2 single heads; no 8-lanes
@pytest.mark.parametrize("kept", [(0, 0), (4, 16)])
@pytest.mark.parametrize("bf16", [False, True])
def test_one_row_kernel_equals_the_torch_passes(monkeypatch, H_I, d_I, kept, bf16):
    """cpu_select.decode_row (a decode step's one row, GEMM fused in) against select_last_rows' torch passes, integer
    inputs (exact in any summation order, many ties): the same positions, order and validity, batch rows apart, at
    odd and even cache lengths, rows shorter than k; with a bf16 key cache, each score rounded as the bf16 GEMM's."""
    q, k, w = _indexer(2, 201, H_I=H_I, d_I=d_I, dtype=torch.float32)
    if bf16:  # scores beyond bf16's 8 bits: its rounding of the per-head scores shows
        q = q * 17
    cache = k.to(torch.bfloat16) if bf16 else k
    index_dtype = torch.bfloat16 if bf16 else None
    calls = _spy_decode_row(monkeypatch)
    for T in (1, 2, 24, 25, 200, 201):
        rows = (q[:, T - 1:T], cache[:, :T], w[:, T - 1:T], 24)
        monkeypatch.setattr(chunked, "FUSED_SELECT", False)
        want = chunked.select_last_rows(*rows, kept=kept, index_dtype=index_dtype)
        monkeypatch.setattr(chunked, "FUSED_SELECT", True)
        got = chunked.select_last_rows(*rows, kept=kept, index_dtype=index_dtype)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), T
    assert len(calls) == 6  # the kernel ran each time


def test_one_row_kernel_on_random_fp32_picks_the_twins_set(monkeypatch):
    """Continuous inputs at the retrofit's width (4 x 64), 4096 keys: the kernel sums each dot product in 8 lanes, the
    GEMM in its own order, so a near-tie may fall either way; the sets agree in >= 127 of 128 slots per row."""
    q, k, w = _indexer(3, 4096, H_I=4, d_I=64, dtype=torch.float32, integer=False)
    calls = _spy_decode_row(monkeypatch)
    got = chunked.select_last_rows(q[:, -1:], k, w[:, -1:], 128)[0]
    monkeypatch.setattr(chunked, "FUSED_SELECT", False)
    want = chunked.select_last_rows(q[:, -1:], k, w[:, -1:], 128)[0]
    same = (got.unsqueeze(-1) == want.unsqueeze(-2)).any(-1).sum(-1)  # (B, 1)
    assert calls and (same >= 127).all(), same
