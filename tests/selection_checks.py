"""Checks shared by the indexer-optimisation tests: model-level causality, the selector contract,
and the indexer KL losses training through a variant."""
import pytest
import torch

from conftest import tiny_model_config
from models import SparseAttentionMoELLM
from sparse_attention import AttentionMode

L = 24
T = 9  # the position whose past must not see the future
KS = (4, 16, 64)  # k < T+1, k > T+1, k >= L


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and do not stall when the two cores are busy elsewhere
    (import this fixture into a test module to apply it to every test there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_model_causal(backends=("masked", "gather"), ks=KS, progress: float = 0.5, **overrides) -> None:
    """Changing tokens after position T changes no logit at positions <= T, for each k and backend.

    The original and the changed sequences run as one batch (rows never interact: no MoE capacity).
    """
    for backend in backends:
        for k in ks:
            torch.manual_seed(0)
            model = SparseAttentionMoELLM(tiny_model_config(sparse_top_k=k, attention_backend=backend, **overrides))
            model.set_training_progress(progress)
            ids = torch.randint(0, 64, (2, L))
            changed = ids.clone()
            changed[:, T + 1:] = torch.randint(0, 64, (2, L - T - 1))
            with torch.no_grad():
                base, out = model(torch.cat([ids, changed])).chunk(2)
            assert torch.allclose(out[:, : T + 1], base[:, : T + 1], atol=1e-5), \
                f"{overrides} k={k} backend={backend}: future tokens leak into positions <= {T}"
            assert not torch.allclose(out[:, T + 1:], base[:, T + 1:])  # the test can fail


def assert_selection_contract(selected_idx: torch.Tensor, valid: torch.Tensor, budget: int | None = None) -> None:
    """(B, L, K) long/bool: valid slots are causal and distinct, invalid slots are -1, at most `budget` per row."""
    B, Lq, K = selected_idx.shape
    assert selected_idx.dtype == torch.long and valid.dtype == torch.bool and valid.shape == selected_idx.shape
    t = torch.arange(Lq)[None, :, None]
    assert bool((selected_idx[valid] >= 0).all())
    assert bool(((selected_idx <= t) | ~valid).all()), "a future token was selected"
    assert bool((selected_idx[~valid] == -1).all())
    mask = torch.zeros(B, Lq, Lq + 1, dtype=torch.long).scatter_add_(
        -1, torch.where(valid, selected_idx, Lq), torch.ones_like(selected_idx))[..., :Lq]
    assert int(mask.max()) <= 1, "a token was selected twice"
    if budget is not None:
        assert int(valid.sum(-1).max()) <= budget


def assert_indexer_trains(**overrides) -> None:
    """Dense warm-up KL and sparse KL are finite and reach every indexer parameter."""
    for mode, sparse in (("dense", False), ("sparse", True)):
        torch.manual_seed(0)
        model = SparseAttentionMoELLM(tiny_model_config(**overrides))
        model.set_training_progress(1.0)
        for p in model.main_parameters():
            p.requires_grad_(False)
        _, aux = model(torch.randint(0, 64, (2, L)), AttentionMode(sparse=sparse, indexer_loss=mode), return_aux=True)
        loss = aux.indexer_loss
        assert torch.isfinite(loss), f"{overrides}: {mode} indexer loss {loss}"
        loss.backward()
        for p in model.indexer_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, \
                f"{overrides}: no {mode} KL gradient on an indexer parameter"
