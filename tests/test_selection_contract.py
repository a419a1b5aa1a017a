"""One selection contract on every path (sparse_attention.check_selection): invalid slots hold -1 and only they,
valid positions lie in [0, L) and are distinct per row. Every path refuses the rest with one ValueError; a
top-k selection is certified (the hot paths skip the check) only while its tensors are unmodified."""
import pytest
import torch

from dsa_lab.kernels import chunked as kernels
from dsa_lab.kernels import chunked_mqa as mqa_kernels
from dsa_lab.kernels import triton_mha as triton_kernels
from dsa_lab.kernels import triton_mqa
from sparse_attention import (check_selection, index_scores, select_top_k, sparse_attention_masked,
                              sparse_mqa_attention_masked)

B, H, L, D, K = 2, 2, 12, 8, 4
_g = torch.Generator().manual_seed(0)
Q, KK, V = (torch.randn(B, H, L, D, generator=_g, dtype=torch.float64) for _ in range(3))
QM, KV = torch.randn(B, L, H, D, generator=_g, dtype=torch.float64), torch.randn(B, L, D, generator=_g, dtype=torch.float64)
INDEXER = (torch.randn(B, L, 2, 8, generator=_g), torch.randn(B, L, 8, generator=_g), torch.randn(B, L, 2, generator=_g))

PATHS = {
    "masked": lambda idx, valid: sparse_attention_masked(Q, KK, V, idx, valid, return_probs=True),
    "masked mqa": lambda idx, valid: sparse_mqa_attention_masked(QM, KV, idx, valid, v_dim=6, return_probs=True),
    "gather": lambda idx, valid: kernels.sparse_attention_gather(Q, KK, V, idx, valid, return_probs=True),
    "mqa": lambda idx, valid: mqa_kernels.sparse_mqa_attention(QM, KV, idx, valid, v_dim=6, return_probs=True),
    "triton": lambda idx, valid: triton_kernels.sparse_attention_triton(Q, KK, V, idx, valid),
    "triton mqa": lambda idx, valid: triton_mqa.sparse_mqa_attention_triton(QM, KV, idx, valid, v_dim=6),
}
TRITON_PATHS = ("triton", "triton mqa")


def _selection():
    """A top-k selection, copied (so not certified): rows t < K-1 have invalid slots."""
    idx, valid = select_top_k(index_scores(*INDEXER), K)
    return idx.clone(), valid.clone()


def _bad(kind: str):
    idx, valid = _selection()
    if kind == "out-of-range invalid marker":  # FlashMLA's convention: invalid slots hold a position >= L
        idx[~valid] = L
    elif kind == "-1 at a valid slot":
        idx[0, 8, 1] = -1
    elif kind == "valid index past the sequence":
        idx[1, 9, 0] = L
    elif kind == "repeated position":
        idx[0, 10, 1] = idx[0, 10, 0]
    return idx, valid


def _run(path: str, idx, valid):
    if path in TRITON_PATHS and triton_kernels.triton is None:
        pytest.skip("triton is not installed: the Triton paths cannot be imported here")
    return PATHS[path](idx, valid)


@pytest.mark.parametrize("kind", ["out-of-range invalid marker", "-1 at a valid slot", "valid index past the sequence",
                                  "repeated position"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_refuses_a_selection_that_breaks_the_contract(path, kind):
    idx, valid = _bad(kind)
    with pytest.raises(ValueError, match="^selection: ") as err:
        _run(path, idx, valid)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_accepts_an_uncertified_selection_that_keeps_it(path):
    idx, valid = _selection()
    try:
        _run(path, idx, valid)
    except ValueError as err:  # on CPU the Triton paths refuse the device only after the contract passed
        assert path in TRITON_PATHS and "CUDA" in str(err) and not str(err).startswith("selection:")


def test_masked_and_gather_agree_on_a_checked_selection():
    idx, valid = _selection()
    ref, fast = PATHS["masked"](idx, valid), PATHS["gather"](idx, valid)
    torch.testing.assert_close(ref[0], fast[0])
    torch.testing.assert_close(ref[1], fast[1])


def test_a_certified_selection_modified_in_place_is_checked_again():
    idx, valid = kernels.chunked_select(*INDEXER, K)  # certified: the hot path skips the sort
    check_selection(idx, valid, L)
    idx[0, 10, 1] = idx[0, 10, 0]  # now a repeated position
    with pytest.raises(ValueError, match="same position twice"):
        kernels.sparse_attention_gather(Q, KK, V, idx, valid)
    idx, valid = kernels.chunked_select(*INDEXER, K)
    valid[0, 10, 1] = False  # valid edited, index left: breaks the -1 rule
    with pytest.raises(ValueError, match="must hold index -1"):
        mqa_kernels.sparse_mqa_attention(QM, KV, idx, valid, v_dim=6)
