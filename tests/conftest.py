"""Shared fixtures: the repository root on sys.path, tiny configs, the real corpus cached once."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)

from config import DataConfig, ModelConfig  # noqa: E402


def tiny_model_config(**overrides) -> ModelConfig:
    """d_model 32, 2 layers, 4 heads, 4 experts top-2, indexer 2 x 16 (RoPE on 8)."""
    base = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_seq_len=64, num_experts=4,
                expert_top_k=2, indexer_heads=2, indexer_dim=16, indexer_rope_dim=8, sparse_top_k=8)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The embedded Shakespeare corpus with the default BPE (trained once per test session)."""
    from data import load_corpus
    return load_corpus(DataConfig(cache_dir=str(tmp_path_factory.mktemp("data_cache"))))
