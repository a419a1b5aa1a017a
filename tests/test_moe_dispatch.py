"""MoE dispatch: the sync-free dense formulation equals the per-expert loop (its reference twin) in outputs and in
every gradient, an expert no token chose included; 'auto' picks it on CUDA only; it runs no syncing op."""
import dataclasses

import pytest
import torch

from config import ADDED_DEFAULTS, build_configs, fingerprint_fields
from conftest import tiny_model_config
from models import MoEFeedForward, SparseAttentionMoELLM, expert_counts
from sync_ops import SyncOps

CASES = {"plain": {}, "grouped": dict(num_experts=8, expert_top_k=3, moe_n_group=4, moe_topk_group=2),
         "scaled, unnormalised": dict(moe_norm_topk_prob=False, moe_routed_scaling=2.5, num_shared_experts=0)}


def moe_pair(**overrides):
    """(loop, dense) MoE layers in fp64 with identical weights; the last expert never chosen (its selection bias)."""
    torch.manual_seed(0)
    loop = MoEFeedForward(tiny_model_config(moe_dispatch="loop", **overrides)).double().train()
    with torch.no_grad():
        loop.balance_bias[-1] = -1e9  # selection only: the expert receives no token
    dense = MoEFeedForward(tiny_model_config(moe_dispatch="dense", **overrides)).double().train()
    dense.load_state_dict(loop.state_dict())
    return loop, dense


def forward_backward(moe, x):
    """-> (out, balance loss, {param name: grad, 0 where None}, grad of x, the load counts)."""
    x = x.clone().requires_grad_(True)
    out, balance = moe(x)
    ((out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum() + 10 * balance).backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in moe.named_parameters()}
    return out, balance, grads, x.grad, moe.load_counts.clone()


@pytest.mark.parametrize("case", CASES)
def test_dense_dispatch_equals_the_loop_in_outputs_and_every_gradient(case):
    loop, dense = moe_pair(**CASES[case])
    x = torch.randn(3, 11, loop.router.in_features, dtype=torch.float64)
    ref, got = forward_backward(loop, x), forward_backward(dense, x)
    assert ref[4][-1] == 0 and ref[4].sum() == x.shape[0] * x.shape[1] * loop.top_k  # the last expert got no token
    assert loop.experts[-1].gate_up.weight.grad is None  # the loop never ran it
    for name, a, b in (("out", ref[0], got[0]), ("balance loss", ref[1], got[1]), ("x grad", ref[3], got[3]),
                       ("loads", ref[4], got[4])):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13, msg=name)
    assert ref[2].keys() == got[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-12, atol=1e-13, msg=name)
    idle = f"experts.{loop.num_experts - 1}.gate_up.weight"
    assert torch.equal(got[2][idle], torch.zeros_like(got[2][idle]))  # dense: a zero gradient (the loop: None)


def test_a_whole_model_trains_the_same_through_either_dispatch():
    """Logits and every parameter's gradient of a 2-layer sparse model (fp64), loop vs dense dispatch."""
    grads, logits = {}, {}
    for dispatch in ("loop", "dense"):
        torch.manual_seed(0)
        model = SparseAttentionMoELLM(tiny_model_config(moe_dispatch=dispatch)).double().train()
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
        logits[dispatch], aux = model(ids, return_aux=True)
        (logits[dispatch].logsumexp(-1).mean() + aux.balance_loss).backward()
        grads[dispatch] = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    torch.testing.assert_close(logits["dense"], logits["loop"], rtol=1e-12, atol=1e-12)
    for name, g in grads["loop"].items():
        torch.testing.assert_close(grads["dense"][name], g, rtol=1e-11, atol=1e-13, msg=name)


def test_auto_picks_dense_on_cuda_while_it_costs_at_most_four_times_the_routed_flops():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    auto = MoEFeedForward(tiny_model_config())  # 4 experts top-2
    assert auto.dispatch == "auto" and not auto.dense_dispatch(cpu) and auto.dense_dispatch(cuda)
    many = MoEFeedForward(tiny_model_config(num_experts=16, expert_top_k=2))  # 8x the FLOPs: the loop
    assert not many.dense_dispatch(cuda)
    assert MoEFeedForward(tiny_model_config(moe_dispatch="dense")).dense_dispatch(cpu)
    assert not MoEFeedForward(tiny_model_config(moe_dispatch="loop")).dense_dispatch(cuda)


def test_the_dense_dispatch_runs_no_syncing_op_and_the_loop_does():
    """On CUDA nonzero, bincount and .item() make the host wait; the detector sees them on CPU."""
    cfg = dict(balance_aux_weight=0.0)  # one_hot's value checks run on CPU only (CUDA skips them)
    loop, dense = moe_pair(**cfg)
    x = torch.randn(2, 9, loop.router.in_features, dtype=torch.float64)
    found = {}
    for name, moe in (("loop", loop), ("dense", dense)):
        with SyncOps() as ops:
            out, _ = moe(x)
            out.sum().backward()
            moe.update_balance_bias()
        found[name] = ops.found
    assert "aten::nonzero" in found["loop"]  # the detector works
    assert found["dense"] == []


def test_expert_counts_and_an_idle_balance_update_match_the_old_forms():
    chosen = torch.tensor([[0, 2], [2, 1], [0, 2]])
    assert torch.equal(expert_counts(chosen, 5), torch.bincount(chosen.flatten(), minlength=5))
    moe = MoEFeedForward(tiny_model_config())
    with torch.no_grad():
        moe.balance_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    before = moe.balance_bias.clone()
    share = moe.update_balance_bias()  # no load seen: share 0, bias unchanged
    assert torch.equal(share, torch.zeros(4)) and torch.equal(moe.balance_bias, before)


def test_moe_dispatch_is_checked_and_kept_out_of_fingerprints_at_its_default():
    with pytest.raises(ValueError, match="moe_dispatch='grouped' is unknown; choose one of auto, loop, dense"):
        build_configs({"moe_dispatch": "grouped"})
    model = build_configs()[0]
    assert "moe_dispatch" not in fingerprint_fields(model)  # finished runs keep their fingerprints
    omitted = {"moe_dispatch", *ADDED_DEFAULTS}  # the levers' keys (issue 30) are also left out at their defaults
    assert fingerprint_fields(model) == {k: v for k, v in dataclasses.asdict(model).items() if k not in omitted}
    assert fingerprint_fields(dataclasses.replace(model, moe_dispatch="dense"))["moe_dispatch"] == "dense"
