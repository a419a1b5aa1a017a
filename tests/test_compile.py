"""--compile: the token-level training paths (chunked selection, gather, MQA) trace without graph breaks, and a
compiled step gives eager's numbers. CPU, dynamo only (torch._dynamo.explain; backend='eager' for equality): the
graph-break count does not depend on the inductor backend, and a CPU inductor build takes minutes."""
import pytest
import torch

from dsa_lab.training import train
from conftest import tiny_model_config
from models import SparseAttentionMoELLM
from selection_checks import single_thread  # noqa: F401  (autouse fixture: one torch thread)
from sparse_attention import AttentionMode

MODES = {"warm-up": AttentionMode(sparse=False, indexer_loss="dense"),
         "sparse": AttentionMode(sparse=True, indexer_loss="sparse")}


def _model(attention_type: str):
    torch.manual_seed(0)
    return SparseAttentionMoELLM(tiny_model_config(attention_backend="gather", attention_type=attention_type,
                                                   max_seq_len=64, sparse_top_k=8))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("attention_type", ["mha", "mla"])
@pytest.mark.parametrize("mode", list(MODES))
def test_token_level_training_forward_has_no_graph_breaks(attention_type, mode):
    """Before: 11 breaks (warm-up) and 20 (sparse) per forward of this 2-layer model: NaN checks with .any(),
    run_chunks' thread-count calls, an out= into a strided view, the MoE's data-dependent expert branch."""
    model = _model(attention_type)
    train.compiled(model)  # sets the dynamo options a compiled run uses
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    explained = torch._dynamo.explain(model)(ids, MODES[mode], return_aux=True)
    reasons = [str(b.reason).split("\n")[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons


@pytest.mark.parametrize("attention_type", ["mha", "mla"])
def test_compiled_sparse_step_equals_eager(attention_type):
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    results = []
    for compile_ in (False, True):
        model = _model(attention_type)
        net = train.compiled(model, backend="eager") if compile_ else model
        logits, aux = net(ids, MODES["sparse"], return_aux=True)
        loss = logits.logsumexp(-1).mean() + aux.indexer_loss
        loss.backward()
        results.append((logits.detach(), aux.indexer_loss.detach(),
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (le, ke, ge), (lc, kc, gc) = results
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kc, ke, rtol=1e-5, atol=1e-6)
    assert ge.keys() == gc.keys()
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_is_compiled_once():
    model = _model("mha")
    assert train.compiled(model) is train.compiled(model)
