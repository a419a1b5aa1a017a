"""Models: causality for every backend and k, k >= L equals classic, shared parameter names, MoE."""
import pytest
import torch

from models import AdaptiveMoELLM, FixedSparseMoELLM
from config import CPU_TRAINABLE_BACKENDS
from conftest import model_pair, tiny_model_config
from models import ClassicAttentionMoELLM, MoEFeedForward, SparseAttentionMoELLM
from adaptive_selection import AdaptiveKConfig
from sparse_attention import DENSE, AttentionMode

L = 24


def _assert_causal(model, vocab=64, positions=(0, 2, 9, 17, L - 2)):
    """Changing tokens after position t changes no logit at positions <= t."""
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (2, L))
    with torch.no_grad():
        base = model(ids)
        for t in positions:
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(0, vocab, (2, L - t - 1))
            out = model(changed)
            assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5), f"leak into position <= {t}"
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])  # the test can fail


@pytest.mark.parametrize("backend", CPU_TRAINABLE_BACKENDS)
@pytest.mark.parametrize("k", [1, 4, L - 1, L, 3 * L])  # k < t+1, k > t+1 for early t, k >= L
def test_sparse_model_is_causal(backend, k):
    torch.manual_seed(0)
    model = SparseAttentionMoELLM(tiny_model_config(sparse_top_k=k, attention_backend=backend)).eval()
    _assert_causal(model)


ADAPTIVE_BUILDS = {"adaptive": lambda c: AdaptiveMoELLM(c, AdaptiveKConfig(k_min=1)),
                   "adaptive_k_min_3L": lambda c: AdaptiveMoELLM(c, AdaptiveKConfig(k_min=3 * L)),
                   "fixed25": lambda c: FixedSparseMoELLM(c, 0.25), "fixed100": lambda c: FixedSparseMoELLM(c, 1.0),
                   "matched": lambda c: FixedSparseMoELLM(c, mean_keys=5.0)}
MLA_DIMS = dict(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


@pytest.mark.parametrize("attention_type", ["mha", "mla"])
@pytest.mark.parametrize("backend", ["masked", "gather"])
@pytest.mark.parametrize("name", ADAPTIVE_BUILDS)
def test_adaptive_and_fixed_share_models_are_causal(name, backend, attention_type):
    torch.manual_seed(0)
    cfg = tiny_model_config(attention_backend=backend, attention_type=attention_type,
                            **(MLA_DIMS if attention_type == "mla" else {}))
    _assert_causal(ADAPTIVE_BUILDS[name](cfg).eval())


def test_classic_model_and_dense_mode_are_causal():
    torch.manual_seed(0)
    _assert_causal(ClassicAttentionMoELLM(tiny_model_config()).eval())
    sparse = SparseAttentionMoELLM(tiny_model_config()).eval()
    _assert_causal(lambda ids: sparse(ids, DENSE))


@pytest.mark.parametrize("backend", CPU_TRAINABLE_BACKENDS)
def test_sparse_with_k_at_least_L_equals_classic_with_the_same_weights(backend):
    classic, sparse = model_pair(tiny_model_config(sparse_top_k=L, attention_backend=backend), 0, "cpu")
    ids = torch.randint(0, 64, (2, L))
    with torch.no_grad():
        assert torch.allclose(sparse.eval()(ids), classic.eval()(ids), atol=1e-5)
        assert torch.allclose(sparse(ids, DENSE), classic(ids), atol=1e-5)


def test_small_k_really_changes_the_output():
    classic, sparse = model_pair(tiny_model_config(sparse_top_k=2), 0, "cpu")
    ids = torch.randint(0, 64, (2, L))
    with torch.no_grad():
        assert not torch.allclose(sparse.eval()(ids), classic.eval()(ids), atol=1e-4)


def test_shared_parts_have_the_same_names_and_only_indexers_differ():
    classic = ClassicAttentionMoELLM(tiny_model_config())
    sparse = SparseAttentionMoELLM(tiny_model_config())
    missing, unexpected = sparse.load_state_dict(classic.state_dict(), strict=False)
    assert not unexpected and missing and all(".indexer." in k for k in missing)
    for name, tensor in classic.state_dict().items():
        assert torch.equal(sparse.state_dict()[name], tensor)


def test_indexer_and_main_parameters_partition_the_model():
    sparse = SparseAttentionMoELLM(tiny_model_config())
    indexer, main = sparse.indexer_parameters(), sparse.main_parameters()
    assert indexer and main and len(indexer) + len(main) == len(list(sparse.parameters()))
    names = {id(p): n for n, p in sparse.named_parameters()}
    assert all(".indexer." in names[id(p)] for p in indexer)
    assert ClassicAttentionMoELLM(tiny_model_config()).indexer_parameters() == []


def test_attention_mode_refuses_contradictions_where_it_is_set():
    with pytest.raises(ValueError, match="needs sparse=False"):
        AttentionMode(sparse=True, indexer_loss="dense")
    with pytest.raises(ValueError, match="needs sparse=True"):
        AttentionMode(sparse=False, indexer_loss="sparse")
    with pytest.raises(ValueError, match="has none"):
        ClassicAttentionMoELLM(tiny_model_config())(torch.zeros(1, 4, dtype=torch.long), AttentionMode(sparse=True))


def test_moe_routing_gates_and_loss_free_balancing_update():
    torch.manual_seed(0)
    cfg = tiny_model_config(balance_bias_rate=0.01)
    moe = MoEFeedForward(cfg).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] += 1.0  # expert 0 scores highest for inputs with positive sum
    x = torch.ones(2, 8, 32).abs()
    out, balance_loss = moe(x)
    assert out.shape == x.shape and balance_loss > 0
    share = moe.update_balance_bias()
    assert torch.isclose(share.sum(), torch.tensor(1.0))
    assert share[0] == share.max() and moe.balance_bias[0] < 0  # overloaded expert is pushed down
    assert (moe.balance_bias[share < share.mean()] > 0).all()  # underloaded experts are pulled up
    assert moe.load_counts.sum() == 0  # counts reset after each update
    assert moe.balance_bias.requires_grad is False


def test_moe_matches_a_per_token_loop():
    torch.manual_seed(0)
    moe = MoEFeedForward(tiny_model_config()).eval()
    x = torch.randn(1, 5, 32)
    out, _ = moe(x)
    for t in range(5):
        h = x[0, t]
        scores = torch.sigmoid(moe.router(h))
        chosen = (scores + moe.balance_bias).topk(2).indices
        gates = scores[chosen] / scores[chosen].sum()
        expect = sum(g * moe.experts[e](h) for g, e in zip(gates, chosen.tolist()))
        expect = expect + sum(s(h) for s in moe.shared_experts)
        assert torch.allclose(out[0, t], expect, atol=1e-5)


def test_input_longer_than_max_seq_len_is_a_clear_error():
    model = ClassicAttentionMoELLM(tiny_model_config(max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
