"""Low-precision indexer: quantiser maths, STE gradients, error ordering, variants, model causality."""
import dataclasses

import pytest
import torch

from config import INDEXER_PRECISIONS, ModelConfig
from optimized_indexers import OptimizedLightningIndexer
from quantization_utils import (FP8_MAX, fake_quantize_fp8, fake_quantize_int, hadamard_matrix, precision_report,
                                quantize_indexer_inputs)
from selection_checks import assert_indexer_trains, assert_model_causal
from selection_checks import single_thread  # noqa: F401  (autouse fixture: one torch thread)
from dsa_lab.common.variants import QUANTIZATION as QUANTIZATION_VARIANTS


def test_variants_are_the_plans_twelve_and_valid():
    assert len(QUANTIZATION_VARIANTS) == 12
    assert {v["indexer_precision"] for v in QUANTIZATION_VARIANTS.values()} == {"fp16", "mixed", "int8", "int4"}
    for overrides in QUANTIZATION_VARIANTS.values():
        dataclasses.replace(ModelConfig(), **overrides).validate()


@pytest.mark.parametrize("levels", [127, 7])
def test_int_quantiser_is_symmetric_per_row(levels):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 16) * torch.rand(5, 3, 1) * 10
    q = fake_quantize_int(x, levels)
    scale = x.abs().amax(-1, keepdim=True) / levels
    codes = q / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= levels + 1e-4
    assert ((q - x).abs() <= scale / 2 + 1e-6).all()
    assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1))  # the row maximum is exact


def test_fp8_quantiser_uses_power_of_two_scales_and_e4m3_values():
    torch.manual_seed(0)
    x = torch.randn(64, 32) * torch.logspace(-3, 3, 64)[:, None]
    q = fake_quantize_fp8(x)
    scale = torch.exp2(torch.ceil(torch.log2(x.abs().amax(-1, keepdim=True) / FP8_MAX)))
    codes = q / scale
    assert codes.abs().max() <= FP8_MAX
    assert torch.equal(codes.to(torch.float8_e4m3fn).float(), codes)  # exactly representable
    rel = ((q - x).abs() / x.abs().amax(-1, keepdim=True)).max()
    assert rel < 2 ** -3


def test_fp8_scale_is_exactly_the_power_of_two_the_format_needs():
    """amax / scale must land in e4m3's top binade (224, 448]: a scale twice too large loses the smallest
    subnormal (2^-9 * scale rounds to 0), one half too small overflows amax."""
    x = torch.tensor([[448.0, 2.0 ** -9, -3.0, 0.0], [288.0 * 4, 4 * 2.0 ** -9, 1.0, 0.0]])  # scales 1 and 4
    q = fake_quantize_fp8(x)
    assert torch.equal(q, x)  # every value is on the grid of the right scale
    y = torch.tensor([[449.0, 1.0]])  # just above 448: the scale must double
    assert fake_quantize_fp8(y)[0, 0].item() == 448.0  # 449 / 2 = 224.5 -> 224 (e4m3 spacing 16 up there: 448)


def test_hadamard_is_orthonormal_and_keeps_dot_products():
    h = hadamard_matrix(16)
    assert torch.allclose(h @ h.T, torch.eye(16), atol=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)


@pytest.mark.parametrize("precision", ["fp8", "int8", "int4"])
def test_straight_through_gradients(precision):
    torch.manual_seed(0)
    q = torch.randn(2, 6, 3, 8, requires_grad=True)
    k = torch.randn(2, 6, 8, requires_grad=True)
    w = torch.randn(2, 6, 3, requires_grad=True)
    gq, gk = torch.randn(2, 6, 3, 8), torch.randn(2, 6, 8)
    q_low, k_low, _ = quantize_indexer_inputs(q, k, w, precision)
    ((q_low * gq).sum() + (k_low * gk).sum()).backward()
    rotation = hadamard_matrix(8) if precision == "fp8" else torch.eye(8)  # d(xH)/dx = H^T
    assert torch.allclose(q.grad, gq @ rotation.T, atol=1e-5)
    assert torch.allclose(k.grad, gk @ rotation.T, atol=1e-5)


def test_error_ordering_and_topk_overlap():
    """fp16 / bf16 / fp8 / int8 / int4 error grows as bits shrink; top-k agreement falls with it."""
    torch.manual_seed(0)
    indexer = OptimizedLightningIndexer(64, heads=4, dim=64, max_seq_len=64)
    report = precision_report(indexer, torch.randn(4, 64, 64), top_k=16)
    err = {p: r["score_rel_error"] for p, r in report.items()}
    assert err["fp32"] == 0 and report["fp32"]["topk_overlap"] == 1
    for low in ("fp16", "bf16", "mixed", "fp8", "int8", "int4"):  # a disabled autocast / quantiser shows as 0
        assert err[low] > 1e-5, low
    assert err["fp16"] < err["int8"] < err["int4"]
    assert err["mixed"] < err["int8"] and err["fp8"] < err["int4"] and err["bf16"] < err["int4"]
    assert report["fp16"]["topk_overlap"] > 0.97
    assert report["int4"]["topk_overlap"] < report["fp16"]["topk_overlap"]
    assert indexer.precision == "fp32"  # restored


@pytest.mark.parametrize("precision", INDEXER_PRECISIONS)
def test_every_precision_keeps_the_model_causal(precision):
    assert_model_causal(indexer_precision=precision)


@pytest.mark.parametrize("precision", ["fp16", "mixed", "fp8", "int8", "int4"])
def test_low_precision_indexer_trains(precision):
    assert_indexer_trains(indexer_precision=precision)

