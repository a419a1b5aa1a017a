"""The DSA maths: indexer formula, causal selection, reference sparse attention, KL losses, recall."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from dsa_lab.common.rope import RotaryEmbedding
from sparse_attention import (AttentionMode, DeepSeekSparseAttention, LightningIndexer, TopKTokenSelector, merge_recall_stats,
                              causal_attention_probs, indexer_kl_dense, indexer_kl_sparse,
                              selection_recall, sparse_attention_masked)


def test_indexer_matches_the_paper_formula_by_direct_loop():
    torch.manual_seed(0)
    H_I, d_I, B, L = 3, 8, 2, 7
    idx = LightningIndexer(d_model=16, n_heads=H_I, head_dim=d_I, rope_dim=4, max_seq_len=16)
    x = torch.randn(B, L, 16)
    scores = idx(x)
    q, k, w_scaled = idx.project(x)
    w_raw = idx.weights_proj(x)
    for b in range(B):
        for t in range(L):
            for s in range(L):
                if s > t:
                    assert scores[b, t, s] == float("-inf")
                    continue
                direct = sum(w_raw[b, t, j] * H_I ** -0.5 * d_I ** -0.5 * torch.relu(q[b, t, j] @ k[b, s])
                             for j in range(H_I))
                assert torch.allclose(scores[b, t, s], direct, atol=1e-5)
    assert torch.allclose(w_scaled, w_raw * H_I ** -0.5 * d_I ** -0.5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_project_row_is_project_at_one_position_bit_for_bit(interleaved):
    """A cached decode step's projection (one position, queries and key rotated together, RoPE row shared or not)
    gives project(x, start)'s q, k and w exactly, at the first, a middle and the last position; interleaved RoPE
    takes project() itself. Caught (planted): the rotate-half sign kept on the sin row, the swap's halves in place."""
    torch.manual_seed(0)
    idx = LightningIndexer(d_model=16, n_heads=3, head_dim=8, rope_dim=4, max_seq_len=40, rope_interleaved=interleaved)
    x = torch.randn(2, 1, 16)
    for start in (0, 17, 39):
        shared = idx.row_rotation(start)  # None: interleaved RoPE takes project()
        for rope_row in (None, shared):
            for got, want in zip(idx.project_row(x, start, rope_row), idx.project(x, start)):
                assert got.shape == want.shape and torch.equal(got, want), start


def test_indexer_key_is_layernormed_and_rope_touches_only_the_leading_dims():
    torch.manual_seed(0)
    idx = LightningIndexer(d_model=16, n_heads=2, head_dim=8, rope_dim=4, max_seq_len=16)
    x = torch.randn(1, 1, 16).expand(1, 6, 16)  # the same token at every position
    q, k, _ = idx.project(x)
    assert torch.allclose(q[0, :, :, 4:], q[0, :1, :, 4:].expand(6, -1, -1))  # no RoPE on the rest
    assert not torch.allclose(q[0, 1, :, :4], q[0, 0, :, :4])  # RoPE on the leading 4 dims
    norm = idx.k_norm(idx.k_proj(x))
    assert torch.allclose(k[..., 4:], norm[..., 4:])
    assert torch.allclose(norm.mean(-1), torch.zeros(1, 6), atol=1e-5)


def test_rope_is_non_interleaved_and_relative():
    rope = RotaryEmbedding(8, 32)
    q, k = torch.randn(8), torch.randn(8)
    def at(v, pos):
        x = torch.zeros(1, 32, 8)
        x[0, pos] = v
        return rope(x, seq_dim=1)[0, pos]
    assert torch.allclose(at(q, 5) @ at(k, 3), at(q, 12) @ at(k, 10), atol=1e-5)
    x = torch.zeros(1, 2, 8)
    x[0, 1, 0] = 1.0  # first dim pairs with dim 4 (rotate-half), not with dim 1 (interleaved)
    out = rope(x, seq_dim=1)[0, 1]
    assert out[4] != 0 and out[1] == 0


@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_selector_is_causal_and_selects_all_past_tokens_when_few(k):
    torch.manual_seed(0)
    L = 8
    scores = torch.randn(2, L, L) * 10
    scores[:, :, -1] = 1e9  # a huge *future* score must still never be picked by early rows
    idx, valid = TopKTokenSelector(k)(scores)
    assert idx.shape == (2, L, min(k, L))
    t = torch.arange(L)[None, :, None]
    assert (idx[valid] >= 0).all() and (idx <= t).all()
    assert (idx[~valid] == -1).all()
    assert torch.equal(valid.sum(-1), torch.clamp(torch.arange(L) + 1, max=k).expand(2, L))
    for row in range(L):
        chosen = set(idx[0, row][valid[0, row]].tolist())
        if row + 1 <= k:
            assert chosen == set(range(row + 1))
        else:
            assert chosen == set(scores[0, row, : row + 1].topk(k).indices.tolist())


def test_sparse_reference_with_k_at_least_L_equals_dense_causal_attention():
    torch.manual_seed(0)
    B, H, L, D = 2, 3, 10, 8
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    idx, valid = TopKTokenSelector(L)(torch.randn(B, L, L))
    out, _ = sparse_attention_masked(q, k, v, idx, valid)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


def test_sparse_reference_attends_only_to_the_selected_tokens():
    torch.manual_seed(0)
    B, H, L, D = 1, 2, 6, 4
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    idx, valid = TopKTokenSelector(2)(torch.randn(B, L, L))
    out, probs = sparse_attention_masked(q, k, v, idx, valid, return_probs=True)
    t = 5
    sel = idx[0, t][valid[0, t]]
    p = ((q[0, :, t:t + 1] @ k[0, :, sel].transpose(-1, -2)) / 2).softmax(-1)  # D ** -0.5 = 1/2
    assert torch.allclose(out[0, :, t], (p @ v[0, :, sel])[:, 0], atol=1e-5)
    assert torch.allclose(probs[0, :, t], p[:, 0], atol=1e-5)


def _hand_kl(p_rows, score_rows):
    total = 0.0
    for p, s in zip(p_rows, score_rows):
        q = torch.softmax(s, -1)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()) if pi > 0)
    return total / len(p_rows)


def test_dense_kl_matches_hand_computation_and_its_gradient_is_softmax_minus_p():
    torch.manual_seed(0)
    B, H, L = 1, 3, 5
    probs = causal_attention_probs(torch.randn(B, H, L, 4), torch.randn(B, H, L, 4))
    scores = torch.randn(B, L, L).masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf")).requires_grad_()
    loss = indexer_kl_dense(probs, scores)
    p = probs.sum(1)[0]
    p = p / p.sum(-1, keepdim=True)
    expect = _hand_kl([p[t, : t + 1] for t in range(L)], [scores[0, t, : t + 1].detach() for t in range(L)])
    assert math.isclose(loss.item(), expect, rel_tol=1e-5)
    loss.backward()
    for t in range(L):  # d KL / d I = (softmax(I) - p) / rows
        g = (scores[0, t, : t + 1].detach().softmax(-1) - p[t, : t + 1]) / L
        assert torch.allclose(scores.grad[0, t, : t + 1], g, atol=1e-6)


def test_sparse_kl_matches_hand_computation_over_the_selected_set_only():
    torch.manual_seed(0)
    B, H, L, K = 1, 2, 4, 2
    sel_probs = torch.rand(B, H, L, K)
    sel_scores = torch.randn(B, L, K)
    valid = torch.tensor([[[True, False], [True, True], [True, True], [True, True]]])
    loss = indexer_kl_sparse(sel_probs, sel_scores, valid)
    rows_p, rows_s = [], []
    for t in range(L):
        m = valid[0, t]
        p = sel_probs[0, :, t].sum(0)[m]
        rows_p.append(p / p.sum())
        rows_s.append(sel_scores[0, t][m])
    assert math.isclose(loss.item(), _hand_kl(rows_p, rows_s), rel_tol=1e-5)


def test_recall_counts_attention_mass_inside_the_selection():
    torch.manual_seed(0)
    B, H, L, D, K = 2, 2, 12, 4, 3
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    p = causal_attention_probs(q, k).sum(1)
    p = p / p.sum(-1, keepdim=True)
    oracle = p.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf"))
    idx, valid = TopKTokenSelector(K)(oracle)  # the best possible selection
    stats = selection_recall(q, k, idx, valid)
    assert stats["rows"] == B * (L - K)
    best = stats["recall_sum"] / stats["rows"]
    rand_idx, rand_valid = TopKTokenSelector(K)(torch.randn(B, L, L))
    rand = selection_recall(q, k, rand_idx, rand_valid)
    assert best >= rand["recall_sum"] / rand["rows"]
    assert best >= stats["random_recall_sum"] / stats["rows"] and best >= stats["local_recall_sum"] / stats["rows"]
    expected_random = sum(K / (t + 1) for t in range(K, L)) * B
    assert math.isclose(stats["random_recall_sum"], expected_random, rel_tol=1e-6)



def test_recall_sum_equals_a_loop_over_the_rows_where_selection_drops_tokens():
    """recall_sum and rows: a per-row loop over (b, t) with k_t < t+1 only (k_t = the row's valid slots), with
    plain top-k and with slots masked row by row (per-row k, as adaptive k gives)."""
    torch.manual_seed(0)
    B, H, L, D, K = 2, 2, 12, 4, 5
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    p = causal_attention_probs(q, k).sum(1)
    p = p / p.sum(-1, keepdim=True)
    idx, valid = TopKTokenSelector(K)(torch.randn(B, L, L))
    dropped = valid & (torch.rand(B, L, K, generator=torch.Generator().manual_seed(1)) < 0.3)
    for row_valid in (valid, valid & ~dropped):
        stats = selection_recall(q, k, idx, row_valid)
        expected, rows = 0.0, 0
        for b in range(B):
            for t in range(L):
                chosen = idx[b, t][row_valid[b, t]].tolist()
                if len(chosen) < t + 1:  # selection drops tokens in this row
                    expected += sum(float(p[b, t, s]) for s in chosen)
                    rows += 1
        assert 0 < rows < B * L and stats["rows"] == rows
        assert stats["recall_sum"] == pytest.approx(expected, rel=1e-5)

def test_indexer_input_is_detached_and_lm_loss_never_reaches_it():
    torch.manual_seed(0)
    attn = DeepSeekSparseAttention(tiny_model_config(sparse_top_k=3))
    x = torch.randn(2, 10, 32, requires_grad=True)
    out, aux = attn(x, AttentionMode(sparse=True, indexer_loss="sparse"))
    out.sum().backward(retain_graph=True)
    assert all(p.grad is None for p in attn.indexer.parameters())  # LM-side loss: no indexer gradient
    grad_x, grad_qkv = x.grad.clone(), attn.qkv.weight.grad.clone()
    aux.indexer_loss.backward()
    assert torch.equal(x.grad, grad_x)  # the KL sends nothing into the main model
    assert torch.equal(attn.qkv.weight.grad, grad_qkv)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.indexer.parameters())


def test_ties_go_to_the_most_recent_tokens_in_the_reference_and_the_chunked_path():
    """All-zero scores (ReLU ties) select the last k tokens of each row, on both selection paths."""
    from dsa_lab.kernels import chunked as kernels
    L, K = 9, 3
    idx, valid = TopKTokenSelector(K)(torch.zeros(1, L, L))
    t = torch.arange(L)[:, None]
    expected = (t - torch.arange(K)[None, :])  # t, t-1, t-2 (negative = invalid for t < K-1)
    assert torch.equal(idx[0].sort(-1, descending=True).values, expected.clamp(min=-1).sort(-1, descending=True).values)
    q, k, w = torch.zeros(1, L, 2, 4), torch.randn(1, L, 4), torch.ones(1, L, 2)  # q = 0: every score ties at 0
    chunked, _ = kernels.chunked_select(q, k, w, K, chunk=2)
    assert torch.equal(chunked.sort(-1).values, idx.sort(-1).values)


def test_nan_index_scores_are_refused_with_one_clear_error():
    scores = torch.zeros(1, 5, 5)
    scores[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="contain NaN"):
        TopKTokenSelector(2)(scores)


def test_recall_by_distance_matches_a_hand_count():
    """Dense mass kept per distance bucket (0, 1, 2-3, 4-7, ...) equals a direct loop over (t, s)."""
    torch.manual_seed(0)
    B, H, L, D, K = 2, 2, 12, 4, 3
    q, k = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    idx, valid = TopKTokenSelector(K)(torch.randn(B, L, L))
    merged = merge_recall_stats([selection_recall(q, k, idx, valid)])
    p = causal_attention_probs(q, k).sum(1)
    p = p / p.sum(-1, keepdim=True)
    mass, kept = [0.0] * 4, [0.0] * 4
    for b in range(B):
        for t in range(K, L):  # rows where selection drops tokens
            chosen = set(idx[b, t][valid[b, t]].tolist())
            for s in range(t + 1):
                bucket = int(math.floor(math.log2(t - s + 1)))
                mass[bucket] += float(p[b, t, s])
                kept[bucket] += float(p[b, t, s]) * (s in chosen)
    expected = [c / m for m, c in zip(mass, kept)]
    assert merged["recall_by_distance"] == pytest.approx(expected, rel=1e-5)
