"""Multi-head latent attention: MQA mode (absorbed) equals MHA mode (decompressed), sparse MLA with k >= L
equals classic MLA, causality for every backend, classic -> sparse weight loading, interleaved RoPE."""
import pytest
import torch

from config import CPU_TRAINABLE_BACKENDS
from conftest import model_pair, tiny_model_config
from models import ClassicAttentionMoELLM, SparseAttentionMoELLM, SparseLatentAttention
from dsa_lab.common.rope import RotaryEmbedding
from sparse_attention import DENSE, AttentionMode, MaskedBackend, Selection, TopKTokenSelector

L = 24
MLA = dict(attention_type="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
           v_head_dim=6)


def mla_config(**overrides):
    return tiny_model_config(**{**MLA, **overrides})


def test_absorbed_mqa_mode_equals_decompressed_mha_mode_outputs_and_grads():
    """Attention over the shared latent rows with W_UK/W_UV absorbed = per-head decompressed attention, on the
    same weights and the same selection (fp64)."""
    torch.manual_seed(0)
    attn = SparseLatentAttention(mla_config(sparse_top_k=5)).double()
    x = torch.randn(2, L, 32, dtype=torch.float64)
    selection = Selection(*TopKTokenSelector(5)(torch.randn(2, L, L, dtype=torch.float64)))
    results = []
    for absorbed in (True, False):
        attn.zero_grad()
        heads = attn.project(x)
        if absorbed:
            out, probs = attn.attend_selected(heads, MaskedBackend(), selection, True)
        else:
            q, k, v = attn.decompress(heads)
            out, probs = MaskedBackend().attend(q, k, v, selection=selection, return_probs=True)
            out = attn.merge(out)
        (out * torch.linspace(-1, 1, 32, dtype=torch.float64)).sum().backward()
        results.append((out, probs, [p.grad.clone() for p in attn.parameters() if p.grad is not None]))
    (oa, pa, ga), (ob, pb, gb) = results
    torch.testing.assert_close(oa, ob, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(pa, pb, atol=1e-10, rtol=1e-10)
    assert len(ga) == len(gb) > 0
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", CPU_TRAINABLE_BACKENDS)
def test_sparse_mla_with_k_at_least_L_equals_classic_mla(backend):
    classic, sparse = model_pair(mla_config(sparse_top_k=L, attention_backend=backend), 0, "cpu")
    ids = torch.randint(0, 64, (2, L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(sparse.eval()(ids), classic.eval()(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sparse(ids, DENSE), classic(ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(SparseAttentionMoELLM(mla_config(sparse_top_k=2)).eval()(ids),
                                  sparse(ids), atol=1e-4)


@pytest.mark.parametrize("backend", CPU_TRAINABLE_BACKENDS)
@pytest.mark.parametrize("k", [1, 4, L - 1, 3 * L])
def test_mla_models_are_causal(backend, k):
    torch.manual_seed(0)
    for model in (ClassicAttentionMoELLM(mla_config()), SparseAttentionMoELLM(mla_config(sparse_top_k=k,
                                                                                          attention_backend=backend))):
        model.eval()
        ids = torch.randint(0, 64, (2, L), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            base = model(ids)
            for t in (0, 5, 13, L - 2):
                changed = ids.clone()
                changed[:, t + 1:] = (changed[:, t + 1:] + 7) % 64
                out = model(changed)
                torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
                assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


def test_classic_to_sparse_mla_weight_loading_copies_all_but_the_indexers():
    classic = ClassicAttentionMoELLM(mla_config())
    sparse = SparseAttentionMoELLM(mla_config())
    missing, unexpected = sparse.load_state_dict(classic.state_dict(), strict=False)
    assert not unexpected and missing and all(".indexer." in k for k in missing)
    assert "blocks.0.attn.kv_b_proj.weight" in classic.state_dict()


def test_mla_indexer_reads_the_query_latent_and_trains_on_both_kls():
    torch.manual_seed(0)
    model = SparseAttentionMoELLM(mla_config(sparse_top_k=4))
    indexer = model.attentions[0].indexer
    assert indexer.q_proj.in_features == MLA["q_lora_rank"]  # DeepSeek-V3.2: wq_b reads the query latent
    ids = torch.randint(0, 64, (2, L))
    for mode in (AttentionMode(sparse=False, indexer_loss="dense"), AttentionMode(sparse=True, indexer_loss="sparse")):
        model.zero_grad()
        _, aux = model(ids, mode, return_aux=True)
        aux.indexer_loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.indexer_parameters())
        assert all(p.grad is None for p in model.main_parameters())  # the KL never reaches the main model


def test_interleaved_rope_equals_rotate_half_on_deinterleaved_dims():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8)
    plain, inter = RotaryEmbedding(8, 16), RotaryEmbedding(8, 16, interleaved=True)
    deinterleaved = torch.cat([x[..., 0::2], x[..., 1::2]], -1)
    torch.testing.assert_close(inter(x, seq_dim=1), plain(deinterleaved, seq_dim=1))
    # pairs (2i, 2i+1) rotate together: a vector with only dims 0 and 1 set keeps its norm in those two
    pair = torch.zeros(1, 6, 8)
    pair[..., :2] = torch.randn(1, 6, 2)
    rotated = inter(pair, seq_dim=1)
    torch.testing.assert_close(rotated[..., [0, 4]].norm(dim=-1), pair[..., :2].norm(dim=-1))


def test_mla_with_flex_is_refused_in_one_line_never_run_by_another_path():
    """FlexAttention takes per-head K/V; MLA's sparse path attends over shared latent rows. The config and the
    backend both refuse the pair (before this, attend_latent silently ran the gather MQA path)."""
    from dsa_lab.kernels.backends import FlexBackend
    with pytest.raises(ValueError, match="attention_backend='flex' runs FlexAttention over per-head K/V") as err:
        tiny_model_config(attention_type="mla", attention_backend="flex").validate()
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="use 'block'"):
        FlexBackend().attend_latent(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 8), selection=None, v_dim=4, scale=1.0)
    tiny_model_config(attention_type="mla", attention_backend="block").validate()  # the block model over MLA runs
