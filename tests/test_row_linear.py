"""row_linear (dsa_lab/inference/row_linear.py), the few-row CPU linear of decode steps, against its twin F.linear:
outputs and gradients; few_row_linears routes a module's nn.Linear through it and restores them; decode steps use it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsa_lab.inference import row_linear as rl


def _calls(monkeypatch) -> list:
    """Count the F.linear calls row_linear falls back to."""
    seen = []
    real = F.linear
    monkeypatch.setattr(rl.F, "linear", lambda *a: seen.append(1) or real(*a))
    return seen


@pytest.mark.parametrize("rows", [1, 2, 7, 16])
def test_blocked_linear_equals_f_linear_in_fp64(rows):
    """The blocked bmm's maths, outputs and gradients, to 1e-12 (fp64)."""
    torch.manual_seed(0)
    x = torch.randn(rows, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(36, 24, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(rows, 36, dtype=torch.float64)
    want, got = F.linear(x, w), rl.blocked_linear(x, w)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for g, e in zip(torch.autograd.grad(got, [x, w], grad), torch.autograd.grad(want, [x, w], grad)):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("lead", [(1,), (1, 1), (2, 1), (3, 5), (16,)])
@pytest.mark.parametrize("bias", [True, False])
def test_few_fp32_rows_take_the_blocked_bmm_and_equal_f_linear(lead, bias, monkeypatch):
    """Outputs and the gradients of x, weight and bias equal F.linear's (to fp32 rounding) for 1-16 rows."""
    torch.manual_seed(0)
    x = torch.randn(*lead, 24, requires_grad=True)
    w = torch.randn(36, 24, requires_grad=True)
    b = torch.randn(36, requires_grad=True) if bias else None
    grad = torch.randn(*lead, 36)
    want = F.linear(x, w, b)
    expected = torch.autograd.grad(want, [x, w] + [b] * bias, grad)
    fallbacks = _calls(monkeypatch)
    got = rl.row_linear(x, w, b)
    assert not fallbacks, "the few-row input fell back to F.linear"
    tol = 2e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for g, e in zip(torch.autograd.grad(got, [x, w] + [b] * bias, grad), expected):
        torch.testing.assert_close(g, e, atol=tol, rtol=tol)


@pytest.mark.parametrize("x_shape, w_shape, dtype", [((17, 24), (36, 24), torch.float32),  # more rows than MAX_ROWS
                                                     ((2, 24), (30, 24), torch.float32),  # O not a multiple of BLOCKS
                                                     ((0, 24), (36, 24), torch.float32),  # no rows
                                                     ((2, 24), (36, 24), torch.float64)])  # fp64 keeps F.linear's bits
def test_other_inputs_fall_back_to_f_linear(x_shape, w_shape, dtype, monkeypatch):
    x, w = torch.randn(x_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    fallbacks = _calls(monkeypatch)
    assert torch.equal(rl.row_linear(x, w), F.linear(x, w))
    assert len(fallbacks) == 2  # row_linear's fallback and the reference's own call (one patched F.linear)


def test_few_row_linears_routes_every_linear_and_restores_them(monkeypatch):
    """Inside: each plain nn.Linear computes through row_linear (same outputs); after, its own forward again, also
    when the block raised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    x = torch.randn(1, 8)
    want = model(x)
    routed = []
    real = rl.row_linear
    monkeypatch.setattr(rl, "row_linear", lambda *a: routed.append(1) or real(*a))
    with rl.few_row_linears(model):
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-6)
    assert len(routed) == 2 and all("forward" not in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError, match="inside"):
        with rl.few_row_linears(model):
            raise RuntimeError("inside")
    assert all("forward" not in vars(m) for m in model.modules())
    model(x)
    assert len(routed) == 2
