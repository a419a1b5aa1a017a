"""Variant runs for the indexer-optimisation experiment and the comprehensive ablations (seed "Experiment 4").

A variant is a name and a dict of ModelConfig overrides (the registry: variants.py). For each (L, seed) one
dense branch point is trained (and cached); every variant is built from it, warmed up, then sparse-trained
on the same batches in the same order (train.train_sparse_from). Each finished run is one JSON record, read
back on resume. `aggregate` turns the records into per-variant statistics; reports.py writes them up.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from results_io import atomic_save_torch, atomic_write_json, check_stale, fingerprint, mean_ci95


# ----------------------------------------------------------------------------- analytic costs
def indexer_flops_per_token(cfg: ModelConfig, L: int) -> float:
    """Indexer multiply-adds x2 per token, all layers: projections + ReLU scores over the causal prefix
    (mean (L+1)/2 keys); a shared indexer is counted once per group."""
    proj = 2 * cfg.d_model * (cfg.indexer_heads * cfg.indexer_dim + cfg.indexer_dim + cfg.indexer_heads)
    scores = (L + 1) / 2 * cfg.indexer_heads * (2 * cfg.indexer_dim + 2)
    groups = math.ceil(cfg.n_layers / cfg.shared_indexer_group)
    return groups * (proj + scores)


def attention_flops_per_token(cfg: ModelConfig, mean_keys: float) -> float:
    """Main attention per token, all layers: QKV/out projections + QK^T and PV over the attended keys."""
    return cfg.n_layers * (2 * cfg.d_model * 4 * cfg.d_model + 4 * cfg.d_model * mean_keys)


# ----------------------------------------------------------------------------- running
METRICS = ["val_loss", "val_accuracy", "val_perplexity", "train_loss_variance", "avg_time_per_step", "indexer_ms",
           "attention_ms", "peak_memory_mb", "process_peak_rss_mb", "indexer_recall", "random_recall", "local_recall",
           "warmup_indexer_recall", "mean_selected_keys", "params", "indexer_params", "indexer_overhead",
           "indexer_flops_per_token", "attention_flops_per_token"]


def run_variants(variants: dict[str, dict], model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
                 exp_cfg: ExperimentConfig, out: Path, overwrite: bool = False, category_of: dict | None = None
                 ) -> list[dict]:
    """Train every variant for every length and seed (resumable) -> list of records."""
    from tqdm.auto import tqdm

    from config import config_for_length
    from data import build_windows, load_corpus
    from train import check_backend_device, pick_device, train_sparse_from

    device = pick_device(train_cfg.device)
    corpus = load_corpus(data_cfg)
    vocab = corpus.tokenizer.vocab_size
    records, jobs = [], []
    for L in exp_cfg.seq_lens:
        base_cfg, _ = config_for_length(model_cfg, data_cfg, exp_cfg, L, vocab)
        for name, overrides in variants.items():
            cfg = dataclasses.replace(base_cfg, **overrides)
            cfg.validate()
            check_backend_device(cfg.attention_backend, device)
            for seed in exp_cfg.seeds:
                key = fingerprint([dataclasses.asdict(cfg), dataclasses.asdict(train_cfg), data_cfg.dataset,
                                    data_cfg.tokenizer, corpus.describe()["train_tokens"]])
                jobs.append((L, seed, name, cfg, key))
    stale = check_stale(out, {record_path(out, name, L, seed): key for L, seed, name, _, key in jobs}, overwrite)
    branches: dict[tuple[int, int], dict] = {}
    for L, seed, name, cfg, key in tqdm(jobs, desc="ablation runs"):
        path = record_path(out, name, L, seed)
        if path.exists() and path not in stale:
            records.append(json.loads(path.read_text()))
            continue
        windows = build_windows(corpus, L)
        if (L, seed) not in branches:
            base_cfg, _ = config_for_length(model_cfg, data_cfg, exp_cfg, L, vocab)
            data_id = [data_cfg.dataset, data_cfg.tokenizer, corpus.describe()]
            branches[(L, seed)] = _branch_state(base_cfg, windows, train_cfg, seed, device, out, data_id)
        model, result = train_sparse_from(branches[(L, seed)], cfg, windows, train_cfg, seed, device, desc=name)
        metrics = {k: result["final"].get(k, math.nan) for k in METRICS}
        total = sum(p.numel() for p in model.parameters())
        indexer = sum(p.numel() for p in model.indexer_parameters())
        metrics.update(params=total, indexer_params=indexer, indexer_overhead=indexer / total,
                       indexer_flops_per_token=indexer_flops_per_token(cfg, L),
                       attention_flops_per_token=attention_flops_per_token(cfg, metrics["mean_selected_keys"]))
        record = {"ablation_name": name, "category": (category_of or {}).get(name, "optimization"),
                  "ablation_config": variants[name], "sequence_length": L, "seed": seed, "metrics": metrics,
                  "curves": result["curves"], "config_fingerprint": key}
        atomic_write_json(path, record)
        records.append(json.loads(path.read_text()))
    return records


def record_path(out: Path, name: str, L: int, seed: int) -> Path:
    return out / "records" / f"{name.replace('+', '-')}__L{L}__seed{seed}.json"


def _branch_state(cfg: ModelConfig, windows, tcfg: TrainConfig, seed: int, device, out: Path, data_id) -> dict:
    """The dense branch point for (L, seed), cached on disk so a resumed ablation does not redo it; keyed on
    everything that shapes it (model, data, every training setting but the later stages' lengths)."""
    from train import dense_pretrain
    train = {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in ("steps", "warmup_steps", "profile_steps")}
    key = fingerprint([dataclasses.asdict(cfg), train, data_id, seed])
    path = out / "branch_points" / f"L{windows.seq_len}_seed{seed}_{key}.pt"
    if path.exists():
        return torch.load(path, map_location=device)
    classic, _ = dense_pretrain(cfg, windows, tcfg, seed, device)
    state = {k: v.detach().clone() for k, v in classic.state_dict().items()}
    atomic_save_torch(state, path)
    return state


# ----------------------------------------------------------------------------- analysis
def aggregate(records: list[dict], baseline: str = "baseline") -> dict:
    """-> {name: {L: {metric: mean_ci95, 'speedup_vs_baseline', 'delta_val_loss_vs_baseline', ...}}}.

    Speed-up and loss difference are paired by seed against the baseline run of the same (L, seed).
    """
    by = {}
    for r in records:
        by.setdefault(r["ablation_name"], {}).setdefault(r["sequence_length"], {})[r["seed"]] = r
    summary = {}
    for name, per_L in by.items():
        summary[name] = {}
        for L, per_seed in sorted(per_L.items()):
            seeds = sorted(per_seed)
            entry = {m: mean_ci95([_num(per_seed[s]["metrics"].get(m)) for s in seeds]) for m in METRICS}
            entry["category"] = per_seed[seeds[0]]["category"]
            entry["config"] = per_seed[seeds[0]]["ablation_config"]
            base = by.get(baseline, {}).get(L, {})
            paired = [s for s in seeds if s in base]
            if paired:
                entry["speedup_vs_baseline"] = mean_ci95(
                    [base[s]["metrics"]["avg_time_per_step"] / per_seed[s]["metrics"]["avg_time_per_step"]
                     for s in paired])
                entry["delta_val_loss_vs_baseline"] = mean_ci95(
                    [per_seed[s]["metrics"]["val_loss"] - base[s]["metrics"]["val_loss"] for s in paired])
            summary[name][str(L)] = entry
    return summary


def _num(x):
    return math.nan if x is None else x
