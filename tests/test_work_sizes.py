"""Device-aware work sizes (dsa_lab/common/work_sizes.py): the chunks every chunked path really runs, counted in
the kernels on CPU at the `default` presets' shapes scaled down with the CUDA budgets scaled to match (no GPU
needed) and at the CPU budgets; every chunk within its budget; chunked recall equals the unchunked reference."""
import math

import pytest
import torch

import config
import sparse_attention
from dsa_lab.experiments import long_context
from dsa_lab.common import work_sizes
from dsa_lab.kernels import chunked, chunked_mqa, cpu_select
from dsa_lab.kernels.chunked import gather_chunk, selected_index_scores, selected_scores_chunk, selection_bounds
from dsa_lab.kernels.chunked import sparse_attention_gather
from dsa_lab.kernels.chunked_mqa import mqa_chunk, sparse_mqa_attention
from sparse_attention import recall_bounds, select_top_k, selection_recall, selection_recall_dense

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU


def _default_shapes():
    """(preset, B, L, K, H, D, MQA D, H_I, d_I) of every layer call the `default` presets make (sweep and both
    long-context tasks; D = the MHA head dim, MQA D = MLA's shared row kv_lora_rank + qk_rope_head_dim)."""
    sweep = config.PRESETS["default"]
    model = config.ModelConfig()
    mla_row = model.kv_lora_rank + model.qk_rope_head_dim
    shapes = [("sweep", sweep["batch_size"], L, max(1, round(0.5 * L)), sweep["n_heads"],
               sweep["d_model"] // sweep["n_heads"], mla_row, sweep["indexer_heads"], sweep["indexer_dim"])
              for L in sweep["seq_lens"]]
    lc = long_context.PRESETS["default"]
    for task in ("lm", "mqar"):
        p = lc[task]
        shapes += [(f"long_context {task}", p["batch_size"], L, lc["top_k"], p["n_heads"], p["d_model"] // p["n_heads"],
                    mla_row, p["indexer_heads"], p["indexer_dim"]) for L in p["seq_lens"]]
    return shapes


def _chunk_counts(device, B, L, K, H, D, D_mqa, H_I, d_I) -> dict:
    """Chunks per layer call of each chunked path, from the plans the kernels use. The presets run MHA; 'mla mqa'
    is the MQA path the same preset would run with attention_type='mla' (an override)."""
    K = min(K, L)
    return {"selection": len(selection_bounds(B, L, H_I, device)),
            "gather fwd/bwd/probs": math.ceil(L / gather_chunk(B, H, L, K, D, device)),
            "selected index scores": math.ceil(L / selected_scores_chunk(B, L, K, H_I, d_I, device)),
            "recall": len(recall_bounds(B, H, L, device)),
            "mla mqa fwd/bwd": math.ceil(L / mqa_chunk(B, L, H, K, D_mqa, device))}


def _run_counted(monkeypatch, B, L, K, H, D, D_mqa, H_I, d_I) -> dict:
    """Run every chunked path once on CPU at this shape (forward and backward where it trains) and count the chunks
    the kernels really run -> {path: [(queries c, the chunk's largest tensor in elements), ...]} (selection: the
    elements before alignment to SELECT_BLOCK, which may add up to SELECT_BLOCK - 1 queries to a chunk that fit)."""
    calls, phase = {}, [""]

    def count(module, name, path, work):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            calls.setdefault(path + phase[0], []).append(work(*args))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)

    def selection_work(q_c, k_t, work):  # per-head scores (B, c * H_I, stop)
        fitted = max(1, q_c.shape[1] - (chunked.SELECT_BLOCK - 1))
        return q_c.shape[1], q_c.shape[0] * fitted * q_c.shape[2] * (k_t.shape[-1] - q_c.shape[1] + fitted)
    count(chunked, "_per_head_scores", "selection", selection_work)
    count(cpu_select, "score_rows", "selection", lambda q_c, k_t, *rest: selection_work(q_c, k_t, None))  # fp32 x86
    count(chunked, "_gather_rows", "gather", lambda k, v, idx, valid, start, stop, bufs: (
        stop - start, k.shape[0] * (stop - start) * k.shape[1] * idx.shape[-1] * k.shape[-1]))  # (B, c, H, K, D)
    count(chunked, "_selected_scores_chunk", "selected index scores", lambda q, k, w, idx: (
        idx.shape[1], idx.numel() * (k.shape[-1] + q.shape[2])))  # (B, c, K, d_I + H_I)
    count(sparse_attention, "causal_attention_probs", "recall", lambda q, k: (q.shape[2], q.shape[:3].numel() * k.shape[2]))
    count(chunked_mqa, "_rows", "mla mqa", lambda idx, valid, L_, start, stop: (
        stop - start, idx.shape[0] * (stop - start) * idx.shape[-1] * max(D_mqa, H)))  # (B, c, K, max(D, H))
    g = torch.Generator().manual_seed(0)
    q_i, k_i, w_i = torch.randn(B, L, H_I, d_I, generator=g), torch.randn(B, L, d_I, generator=g), torch.rand(B, L, H_I, generator=g)
    idx, valid = chunked.chunked_select(q_i, k_i, w_i, K)
    with torch.no_grad():
        selected_index_scores(q_i, k_i, w_i, idx, valid)
    q, k, v = (torch.randn(B, H, L, D, generator=g).requires_grad_() for _ in range(3))
    q_m, kv = torch.randn(B, L, H, D_mqa, generator=g).requires_grad_(), torch.randn(B, L, D_mqa, generator=g).requires_grad_()
    selection_recall(q.detach(), k.detach(), idx, valid)
    for name, attend in (("gather", lambda: sparse_attention_gather(q, k, v, idx, valid)[0]),
                         ("mla mqa", lambda: sparse_mqa_attention(q_m, kv, idx, valid, v_dim=D_mqa // 2)[0])):
        phase[0] = " fwd"
        out = attend()
        phase[0] = " bwd"
        out.sum().backward()
        phase[0] = ""
    return calls


PLANS = {"selection": ("selection", "index"), "gather fwd": ("gather fwd/bwd/probs", "gather"),
         "gather bwd": ("gather fwd/bwd/probs", "gather"), "selected index scores": ("selected index scores", "selected_scores"),
         "recall": ("recall", "recall"), "mla mqa fwd": ("mla mqa fwd/bwd", "mqa"), "mla mqa bwd": ("mla mqa fwd/bwd", "mqa")}


def _scaled(B, L, K, H, D, D_mqa, H_I, d_I, L_small: int = 128):
    """The shape at batch 1 and L_small (K halved with L up to L_small / 2), and each kind's CUDA budget scaled by
    the work that shrank with it, so the scaled call plans the same chunks as the full one: linear kinds
    (query_chunk) by the L x per-query work, causal prefix kinds (prefix_bounds) by rows x L^2."""
    Ls = min(L, L_small)
    Ks = min(K, max(1, K * Ls // L), Ls // 2)
    linear = {"gather": (H * K * D, H * Ks * D), "selected_scores": (K * (d_I + H_I), Ks * (d_I + H_I)),
              "mqa": (K * max(D_mqa, H), Ks * max(D_mqa, H))}
    budgets = {kind: max(1, round(work_sizes.CUDA_BUDGETS[kind] * Ls * small / (B * L * full)))
               for kind, (full, small) in linear.items()}
    budgets.update({kind: max(1, round(work_sizes.CUDA_BUDGETS[kind] * Ls * Ls / (B * L * L)))
                    for kind in ("index", "recall")})
    return (1, Ls, Ks, H, D, D_mqa, H_I, d_I), budgets


def test_default_presets_run_at_most_8_chunks_per_layer_call_on_cuda(monkeypatch):
    """The issue's goal: on the CUDA budget a layer call at the default presets runs a handful of chunks, not L
    (the CPU budget gives one query per chunk at the long-context default: L iterations per layer). Counted in the
    kernels themselves: each default shape scaled down (batch 1, L 128) with the CUDA budgets scaled by the same
    work patched in as the CPU budgets, every chunked path run on CPU (forward and backward), its chunk calls
    counted; each chunk within its budget unless it holds a single query (selection: before alignment)."""
    print("\nchunk calls per layer call, CUDA budgets scaled to batch 1, L 128 (the planner at full size on CPU in brackets):")
    for preset, *shape in _default_shapes():
        planned, cpu = _chunk_counts(CUDA, *shape), _chunk_counts(CPU, *shape)
        small, budgets = _scaled(*shape)
        for kind, budget in budgets.items():
            monkeypatch.setitem(work_sizes.CPU_BUDGETS, kind, budget)
        with monkeypatch.context() as patched:
            calls = _run_counted(patched, *small)
        print(f"  {preset:<18} B={shape[0]:<3} L={shape[1]:<5} " +
              "  ".join(f"{path} {len(calls[path])} [{cpu[plan]}]" for path, (plan, _) in PLANS.items()))
        assert calls.keys() == PLANS.keys()
        for path, (plan, kind) in PLANS.items():
            ran = calls[path]
            assert len(ran) == planned[plan], f"{preset} L={shape[1]}: {path} ran {len(ran)} chunks, planned {planned[plan]}"
            assert all(c == 1 or work <= budgets[kind] for c, work in ran), (preset, shape[1], path, ran, budgets[kind])
            if not (path.startswith("mla") and preset == "long_context mqar"):  # MQAR's widths (d_model 64) with
                #                                                         MLA's default latent (80) and B=32
                assert len(ran) <= 8, f"{preset} L={shape[1]}: {path} runs {len(ran)} chunks on the CUDA budget"


def test_cpu_budgets_are_cache_sized_and_the_kernels_keep_them(monkeypatch):
    """The CPU budgets (measured on the development machine: chunks that stay in L2 are fastest) are cache-sized,
    at most 2**22 elements (16 MiB fp32), and below the memory-sized CUDA ones; at a shape where every path chunks,
    the kernels run the chunks the plans say on CPU, each within its CPU budget."""
    assert all(work_sizes.work_budget("cpu", kind) <= 1 << 22 for kind in work_sizes.KINDS)
    assert all(work_sizes.work_budget("cuda", kind) > work_sizes.work_budget("cpu", kind) for kind in work_sizes.KINDS)
    assert gather_chunk(8, 8, 8192, 256, 32, CPU) == 1  # the case: one query per chunk on CPU
    shape = (4, 512, 64, 8, 32, 80, 4, 64)  # B, L, K, H, D, MQA D, H_I, d_I
    calls = _run_counted(monkeypatch, *shape)
    planned = _chunk_counts(CPU, *shape)
    for path, (plan, kind) in PLANS.items():
        ran = calls[path]
        assert len(ran) == planned[plan] > 1, (path, len(ran), planned[plan])
        assert all(c == 1 or work <= work_sizes.CPU_BUDGETS[kind] for c, work in ran), (path, ran)


def test_unknown_work_kind_is_refused():
    with pytest.raises(ValueError, match="work kind 'gathr' is unknown"):
        work_sizes.work_budget("cpu", "gathr")


def test_prefix_bounds_cover_every_query_once_within_budget():
    """Each causal chunk [start, stop) builds rows * (stop - start) * stop elements: within the budget unless the
    chunk is the minimum (one query, rounded up to `align`: rounding adds at most align - 1 queries to a chunk that
    fit), and as large as the budget allows (one more query would not fit) unless it ends at L."""
    for L, rows, budget, align in [(1, 1, 1, 1), (37, 3, 50, 1), (100, 2, 1000, 8), (64, 4, 1 << 20, 8),
                                   (300, 3, 5000, 1), (1000, 5, 123457, 8), (97, 1, 1, 8)]:
        bounds = work_sizes.prefix_bounds(L, rows, budget, align)
        assert bounds[0][0] == 0 and bounds[-1][1] == L
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(stop % align == 0 for _, stop in bounds[:-1])
        for start, stop in bounds:
            fitted = max(1, stop - start - (align - 1))  # the fewest queries the chunk held before alignment
            assert fitted == 1 or rows * fitted * (start + fitted) <= budget, (L, rows, budget, align, start, stop)
            assert stop == L or rows * (stop - start + 1) * (stop + 1) > budget, (L, rows, budget, align, start, stop)


@pytest.mark.parametrize("budget", [1, 300, 1 << 22])
@pytest.mark.parametrize("B,H,L,k", [(2, 3, 37, 5), (1, 2, 64, 16), (2, 1, 9, 20)])
def test_chunked_recall_equals_the_dense_reference(monkeypatch, budget, B, H, L, k):
    monkeypatch.setitem(work_sizes.CPU_BUDGETS, "recall", budget)
    g = torch.Generator().manual_seed(0)
    q, kk = torch.randn(B, H, L, 8, generator=g), torch.randn(B, H, L, 8, generator=g)
    scores = torch.randn(B, L, L, generator=g).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    idx, valid = select_top_k(scores, k)
    valid[:, ::3, -1] = False  # rows with fewer valid slots (adaptive k)
    idx = idx.masked_fill(~valid, -1)
    got, ref = selection_recall(q, kk, idx, valid), selection_recall_dense(q, kk, idx, valid)
    assert got.keys() == ref.keys()
    for key in ref:
        if isinstance(ref[key], list):
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(ref[key]), rtol=1e-5, atol=1e-6)
        else:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    if budget == 1:
        assert len(recall_bounds(B, H, L, CPU)) == L  # one query per chunk: the chunking was exercised
