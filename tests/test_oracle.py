"""The oracle control: top-k of the layer's true head-summed attention. Causal, the selector contract, recall never
below the indexer's on the same layer inputs (and equal to the ceiling selection_recall reports), dense at k >= L."""
import pytest
import torch

from conftest import tiny_model_config
from efficient_patterns import OracleSelector
from models import SparseAttentionMoELLM
from selection_checks import assert_model_causal, assert_selection_contract, single_thread  # noqa: F401
from sparse_attention import DENSE, AttentionMode, DeepSeekSparseAttention, causal_attention_probs

L = 24


def _qk(B=2, H=4, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, L, D, generator=gen) * 2, torch.randn(B, H, L, D, generator=gen) * 2


def test_oracle_model_is_causal_for_every_k_and_backend():
    assert_model_causal(selection_source="oracle")


@pytest.mark.parametrize("k", [4, 9, 40])
def test_oracle_keeps_the_top_k_of_head_summed_attention_under_the_selector_contract(k):
    q, k_ = _qk()
    idx, valid = OracleSelector(k).select(2, L, "cpu", attention=(q, k_))
    assert_selection_contract(idx, valid, budget=k)
    t = torch.arange(L)
    assert torch.equal(valid.sum(-1), torch.minimum(t + 1, torch.tensor(k)).expand(2, L))  # short rows: whole prefix
    p = causal_attention_probs(q, k_).sum(1)  # (B, L, L)
    kept = (p.gather(-1, idx.clamp(min=0)) * valid).sum(-1)
    best = p.sort(-1, descending=True).values[..., :min(k, L)].sum(-1)
    assert torch.allclose(kept, best, atol=1e-5)


def test_oracle_selection_at_t_ignores_everything_after_t():
    q, k = _qk()
    q2, k2 = q.clone(), k.clone()
    q2[:, :, 10:], k2[:, :, 10:] = torch.randn_like(q2[:, :, 10:]), torch.randn_like(k2[:, :, 10:])
    a, _ = OracleSelector(5).select(2, L, "cpu", attention=(q, k))
    b, _ = OracleSelector(5).select(2, L, "cpu", attention=(q2, k2))
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.equal(a[:, 10:], b[:, 10:])


def test_query_blocks_give_the_same_selection(monkeypatch):
    q, k = _qk()
    whole = OracleSelector(6).select(2, L, "cpu", attention=(q, k))
    monkeypatch.setattr(OracleSelector, "CHUNK_ELEMENTS", 2 * 4 * L * 5)  # blocks of 5 queries
    blocks = OracleSelector(6).select(2, L, "cpu", attention=(q, k))
    assert all(torch.equal(a, b) for a, b in zip(whole, blocks))


def test_oracle_recall_bounds_the_indexers_on_the_same_layer_inputs():
    """One layer, one input: the indexer's recall <= the oracle selection's recall, which is the ceiling
    selection_recall reports beside the indexer's (oracle_recall_sum), at equal budgets."""
    torch.manual_seed(0)
    cfg = tiny_model_config(sparse_top_k=5)
    layer = DeepSeekSparseAttention(cfg).eval()
    x = torch.randn(2, L, cfg.d_model)
    mode = AttentionMode(sparse=True, stats=True)
    with torch.no_grad():
        indexer = layer(x, mode)[1].stats
        layer.selector, layer.indexer = OracleSelector(5), None
        oracle = layer(x, mode)[1].stats
    assert indexer["rows"] == oracle["rows"] > 0
    assert oracle["recall_sum"] > indexer["recall_sum"] + 1  # clearly better than an untrained indexer
    assert oracle["recall_sum"] == pytest.approx(indexer["oracle_recall_sum"], rel=1e-5)
    assert oracle["oracle_recall_sum"] == pytest.approx(oracle["recall_sum"], rel=1e-5)
    assert oracle["selected_mass_by_distance"] == pytest.approx(indexer["oracle_mass_by_distance"], rel=1e-4, abs=1e-6)


def test_oracle_with_k_at_least_L_equals_dense():
    torch.manual_seed(0)
    model = SparseAttentionMoELLM(tiny_model_config(sparse_top_k=L, selection_source="oracle")).eval()
    assert model.indexer_parameters() == []  # an indexer-free control
    ids = torch.randint(0, 64, (2, L))
    with torch.no_grad():
        assert torch.allclose(model(ids), model(ids, DENSE), atol=1e-5)
        small = SparseAttentionMoELLM(tiny_model_config(sparse_top_k=4, selection_source="oracle")).eval()
        small.load_state_dict(model.state_dict())
        assert not torch.allclose(small(ids), small(ids, DENSE), atol=1e-3)  # the test can fail


def test_oracle_refuses_to_select_without_the_attention_inputs():
    with pytest.raises(ValueError, match="attention=\\(q, k\\)"):
        OracleSelector(4).select(1, L, "cpu")
