"""Shared fixtures: the repository root on sys.path, tiny configs, the real corpus and SmolLM2 loaded once."""
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
    from dsa_lab.training.data import load_corpus
    return load_corpus(DataConfig(cache_dir=str(tmp_path_factory.mktemp("data_cache"))))


@pytest.fixture(scope="session")
def smollm2_loaded():
    """The real SmolLM2-135M (GGUF dequantised to fp32: the slow part), loaded once per session -> (base, tokenizer,
    model id). RetrofitLM hooks the base it wraps: a test module wraps a copy.deepcopy of it, never this one."""
    from dsa_lab.interop import retrofit
    model_id = retrofit.resolve_model(None)
    base, tokenizer = retrofit.load_base(model_id)
    return base, tokenizer, model_id


def model_pair(cfg: ModelConfig, seed: int, device="cpu"):
    """Classic and sparse models with identical shared weights (only the indexers are extra), as every runner
    builds them: the classic model after torch.manual_seed(seed), the sparse one from its state."""
    import torch
    from models import ClassicAttentionMoELLM
    from dsa_lab.training.train import sparse_from_state
    torch.manual_seed(seed)
    classic = ClassicAttentionMoELLM(cfg)
    return classic.to(device), sparse_from_state(cfg, classic.state_dict(), seed).to(device)


def indexer_param_count(d_model: int, heads: int, dim: int) -> int:
    """Parameters of one indexer: q_proj d*H*d_I + k_proj d*d_I + LayerNorm 2*d_I + weights_proj d*H."""
    return d_model * heads * dim + d_model * dim + 2 * dim + d_model * heads


def indexer_parameter_report(model) -> dict:
    """Indexer parameters of a SparseAttentionMoELLM and their share of all its parameters."""
    indexer = sum(p.numel() for p in model.indexer_parameters())
    total = sum(p.numel() for p in model.parameters())
    owners = sum(1 for a in model.attentions if a.indexer is not None)
    return {"indexer_params": indexer, "total_params": total, "indexer_share": indexer / total,
            "indexers": owners, "params_per_indexer": indexer // max(1, owners)}


def variant_parameter_reports(base_cfg: ModelConfig, variants: dict[str, dict]) -> dict[str, dict]:
    """{variant name: indexer_parameter_report + reduction vs base_cfg's indexer}, models built on the meta device."""
    import dataclasses

    import torch
    from models import SparseAttentionMoELLM
    with torch.device("meta"):
        base = indexer_parameter_report(SparseAttentionMoELLM(base_cfg))["indexer_params"]
        reports = {}
        for name, overrides in variants.items():
            report = indexer_parameter_report(SparseAttentionMoELLM(dataclasses.replace(base_cfg, **overrides)))
            report["indexer_param_reduction"] = 1 - report["indexer_params"] / base
            reports[name] = report
    return reports


def record_stages(monkeypatch, *modules) -> list[dict]:
    """Record every training stage the code under test runs: `run_stage` patched in dsa_lab.training.train (the
    warm-up, dense pre-training) and in each of `modules` (a runner that imported it by name). -> a list that fills
    with one {"desc", "stage", "start": the model's state_dict when the stage starts (cloned), "batches": the inputs
    of every batch it drew, in order} per stage run."""
    from dsa_lab.training import train
    real_run_stage, stages = train.run_stage, []

    def recording_run_stage(model, stage, stream, *args, **kwargs):
        record = {"desc": args[3] if len(args) > 3 else kwargs.get("desc"), "stage": stage.name,
                  "start": {n: t.detach().clone() for n, t in model.state_dict().items()}, "batches": []}
        real_next = stream.next

        def next_batch():
            batch = real_next()
            record["batches"].append(batch[0].clone())
            return batch
        stream.next = next_batch
        stages.append(record)
        return real_run_stage(model, stage, stream, *args, **kwargs)

    for module in (train, *modules):
        monkeypatch.setattr(module, "run_stage", recording_run_stage)
    return stages
