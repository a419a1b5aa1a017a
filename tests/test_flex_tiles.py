"""The FlexAttention mask-tile rule (dsa_lab.kernels.chunked.flex_mask_block) against the tiles torch's flex
kernels use: a table of the default tiles of torch 2.5-2.7 (kernel/flex_attention.py) and 2.8+ (template
heuristics), and, where this torch has them, its own CUDA heuristics asked for every capability, dtype and head
dim with autotuning on and off. A mask tile that a kernel tile does not divide is the "Q and KV block size must be
divisible by BLOCK_M and BLOCK_N" error that ended the flex path on Hopper with 64-token tiles."""
import pytest
import torch

from dsa_lab.kernels.chunked import FLEX_MAX_TILE, flex_mask_block

BLOCK_SIZES = (8, 16, 32, 48, 64, 96, 128, 256)
# (fwd BLOCK_M, BLOCK_N), (bwd BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2) defaults, per torch release and GPU.
TILES = {
    "2.5-2.7 sm90 bf16 d64": ((128, 128), (64, 64, 64, 64)),
    "2.5-2.7 sm90 fp32 d64": ((128, 32), (16, 16, 16, 16)),
    "2.5-2.7 sm90 bf16 d128": ((128, 64), (64, 128, 128, 64)),
    "2.5-2.7 sm80 bf16 d64": ((128, 64), (32, 128, 128, 32)),
    "2.5-2.7 other fp32": ((32, 16), (16, 16, 16, 16)),
    "2.8-2.13 sm90 bf16 d64": ((128, 128), (64, 128, 128, 64)),
    "2.8-2.13 sm90 fp32 d64": ((128, 32), (16, 16, 16, 16)),
    "2.8-2.13 sm100 bf16 d64": ((128, 128), (64, 128, 128, 64)),
    "2.8-2.13 sm120 bf16 d64": ((128, 64), (32, 128, 128, 32)),
    "2.8-2.13 autotune fwd": ((64, 128), (64, 64, 64, 64)),
}


def _divides(tile: int, tiles: tuple) -> bool:
    return all(tile % t == 0 for t in tiles)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_mask_tile_is_a_multiple_of_the_block_that_every_known_kernel_tile_divides(block_size):
    tile = flex_mask_block(block_size)
    assert tile % block_size == 0 and tile >= FLEX_MAX_TILE
    for name, (fwd, bwd) in TILES.items():
        assert _divides(tile, fwd + bwd), (name, block_size, tile)


def test_the_old_rule_fails_the_table():
    """The tile the CUDA path used before (the block size itself) is refused on Hopper: the table can fail."""
    fwd, bwd = TILES["2.8-2.13 sm90 bf16 d64"]
    assert not _divides(64, fwd + bwd)


def _installed_heuristic():
    try:
        from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic
    except ImportError:
        return None
    return CUDAConfigHeuristic()


@pytest.mark.parametrize("autotune", [False, True])
def test_mask_tile_against_this_torchs_own_cuda_heuristics(monkeypatch, autotune):
    heuristic = _installed_heuristic()
    if heuristic is None or not hasattr(heuristic, "get_flex_attn_fwd_configs"):
        pytest.skip(f"torch {torch.__version__} has no CUDAConfigHeuristic flex configs to ask")
    from torch._inductor import config as inductor_config
    seen = 0
    with inductor_config.patch(max_autotune=autotune):
        seen = _check_every_capability(monkeypatch, heuristic)
    assert seen > 0


def _check_every_capability(monkeypatch, heuristic) -> int:
    seen = 0
    for capability in ((8, 0), (8, 6), (9, 0), (10, 0), (12, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for head_dim in (32, 64, 128, 192, 256):
                tiles = [(c.block_m, c.block_n) for c in heuristic.get_flex_attn_fwd_configs(head_dim, dtype)]
                tiles += [(c.block_m1, c.block_n1, c.block_m2, c.block_n2)
                          for c in heuristic.get_flex_attn_bwd_configs(head_dim, dtype)]
                for t in tiles:
                    assert max(t) <= FLEX_MAX_TILE, (capability, dtype, head_dim, t)
                    for block_size in BLOCK_SIZES:
                        assert _divides(flex_mask_block(block_size), t), (capability, dtype, head_dim, t)
                seen += len(tiles)
    return seen
