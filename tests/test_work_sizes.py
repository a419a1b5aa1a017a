"""Device-aware work sizes (dsa_lab/common/work_sizes.py): the chunk plans every chunked path uses, counted at the `default`
presets' shapes on the CUDA budget without a GPU; chunked recall equals the unchunked reference."""
import math

import pytest
import torch

import config
from dsa_lab.experiments import long_context
from dsa_lab.common import work_sizes
from dsa_lab.kernels.chunked import gather_chunk, selected_scores_chunk, selection_bounds
from dsa_lab.kernels.chunked_mqa import mqa_chunk
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


def test_default_presets_run_at_most_8_chunks_per_layer_call_on_cuda():
    """The issue's goal: on the CUDA budget a layer call at the default presets runs a handful of chunks, not L
    (the CPU budget gives one query per chunk at the long-context default: L iterations per layer)."""
    print("\nchunks per layer call on the CUDA budget (CPU budget in brackets):")
    worst, worst_mla = 0, 0
    for preset, *shape in _default_shapes():
        cuda, cpu = _chunk_counts(CUDA, *shape), _chunk_counts(CPU, *shape)
        print(f"  {preset:<18} B={shape[0]:<3} L={shape[1]:<5} " +
              "  ".join(f"{name} {cuda[name]} [{cpu[name]}]" for name in cuda))
        worst = max(worst, *(n for name, n in cuda.items() if name != "mla mqa fwd/bwd"))
        if preset != "long_context mqar":  # MQAR's widths (d_model 64) with MLA's default latent (80) and B=32
            worst_mla = max(worst_mla, cuda["mla mqa fwd/bwd"])
    assert worst <= 8, f"a default-preset layer call runs {worst} chunks on the CUDA budget (goal: <= 8)"
    assert worst_mla <= 8, f"MLA at the default presets' widths runs {worst_mla} chunks on the CUDA budget"


def test_cpu_budgets_are_todays():
    """The CPU budgets were measured on the development machine (cache-sized); the CUDA ones are memory-sized."""
    assert work_sizes.CPU_BUDGETS == {"index": 1 << 19, "gather": 1 << 19, "selected_scores": 1 << 21,
                                      "mqa": 1 << 19, "recall": 1 << 22}
    assert all(work_sizes.work_budget("cuda", kind) > work_sizes.work_budget("cpu", kind) for kind in work_sizes.KINDS)
    assert gather_chunk(8, 8, 8192, 256, 32, CPU) == 1  # the case: one query per chunk on CPU


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
