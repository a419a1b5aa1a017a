"""Indexer-optimisation strategies and comprehensive ablations (seed "Experiment 4"), on real text.

A variant is a name and a dict of ModelConfig overrides. For each (L, seed) one dense branch point is
trained (and cached); every variant is built from it, warmed up, then sparse-trained on the same batches
in the same order (train.train_sparse_from). Each finished run is one JSON record, read back on resume.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from config import K_STRATEGIES, SELECTION_PATTERNS, DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from results_io import atomic_write_json, mean_ci95

INDEXER_SIZES = {"baseline": (4, 64), "light": (2, 32), "minimal": (1, 16), "ultra_light": (1, 8)}


def indexer_size(name: str) -> dict:
    heads, dim = INDEXER_SIZES[name]
    return {"indexer_heads": heads, "indexer_dim": dim, "indexer_rope_dim": dim // 2}


BASE = indexer_size("baseline")
OPTIMIZATIONS: dict[str, dict] = {
    **{name: indexer_size(name) for name in INDEXER_SIZES},
    "local_global": {**BASE, "selection_pattern": "local_global_25"},
    "sliding_window": {**BASE, "selection_pattern": "sliding_s50"},
    "hierarchical": {**BASE, "selection_pattern": "hierarchical_3"},
    "strided": {**BASE, "selection_pattern": "strided_4"},
    "fp16_indexer": {**BASE, "indexer_precision": "fp16"},
    "bf16_indexer": {**BASE, "indexer_precision": "bf16"},
    "mixed_precision": {**BASE, "indexer_precision": "mixed"},
    "fp8_indexer": {**BASE, "indexer_precision": "fp8"},
    "int8_indexer": {**BASE, "indexer_precision": "int8"},
    "int4_indexer": {**BASE, "indexer_precision": "int4"},
    "adaptive_k": {**BASE, "k_strategy": "adaptive_entropy"},
    "progressive_k": {**BASE, "k_strategy": "progressive_linear"},
    "shared_indexer": {**BASE, "shared_indexer_group": 2},
    "multiscale_indexer": {**BASE, "multiscale_block": 16},
}
DEFAULT_OPTIMIZATIONS = ["baseline", "light", "minimal", "ultra_light", "local_global", "fp16_indexer",
                         "fp8_indexer", "int8_indexer", "adaptive_k"]


def _combinations() -> dict[str, dict]:
    """The plan's 20 combinations: size x precision x (plain | local+global | adaptive k), and a few more."""
    combos = {}
    for size in ("light", "minimal"):
        for precision in ("fp16", "int8"):
            for extra_name, extra in (("topk", {}), ("local_global", {"selection_pattern": "local_global_25"}),
                                      ("adaptive_k", {"k_strategy": "adaptive_entropy"})):
                combos[f"{size}+{precision}+{extra_name}"] = {**indexer_size(size), "indexer_precision": precision,
                                                              **extra}
    for precision in ("fp16", "int8"):
        for extra_name, extra in (("topk", {}), ("local_global", {"selection_pattern": "local_global_25"})):
            combos[f"ultra_light+{precision}+{extra_name}"] = {**indexer_size("ultra_light"),
                                                               "indexer_precision": precision, **extra}
    combos["light+shared2"] = {**indexer_size("light"), "shared_indexer_group": 2}
    combos["minimal+fp16+shared2"] = {**indexer_size("minimal"), "indexer_precision": "fp16", "shared_indexer_group": 2}
    combos["light+multiscale16"] = {**indexer_size("light"), "multiscale_block": 16}
    combos["minimal+int8+multiscale16"] = {**indexer_size("minimal"), "indexer_precision": "int8",
                                           "multiscale_block": 16}
    return combos


CATEGORIES: dict[str, dict[str, dict]] = {
    "indexer_architecture": {f"h{h}_d{d}": {"indexer_heads": h, "indexer_dim": d, "indexer_rope_dim": d // 2}
                             for h in (1, 2, 3, 4) for d in (8, 16, 32, 64)},
    "attention_patterns": {p: {**BASE, "selection_pattern": p} for p in SELECTION_PATTERNS if p != "topk"},
    "quantization": {f"{p}_{size}": {**indexer_size(size), "indexer_precision": p}
                     for p in ("fp16", "mixed", "int8", "int4") for size in ("baseline", "light", "minimal")},
    "selection_strategies": {s: {**BASE, "k_strategy": s} for s in K_STRATEGIES if s != "fixed"},
    "combinations": _combinations(),
}
QUESTIONS = {"optimal_indexer_config": "indexer_architecture", "attention_patterns": "attention_patterns",
             "quantization": "quantization", "k_values": "selection_strategies", "combinations": "combinations"}
QUICK_SUBSET = {  # one or two per family, for --mode quick
    "indexer_architecture": ["h1_d8", "h1_d16", "h2_d32"],
    "attention_patterns": ["local_global_25", "sliding_s50", "hierarchical_3", "strided_4"],
    "quantization": ["fp16_baseline", "int8_baseline", "int4_baseline"],
    "selection_strategies": ["ratio_25", "progressive_linear", "adaptive_entropy"],
    "combinations": ["light+fp16+topk", "minimal+int8+local_global"],
}


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


def _fingerprint(obj) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
                key = _fingerprint([dataclasses.asdict(cfg), dataclasses.asdict(train_cfg), data_cfg.dataset,
                                    data_cfg.tokenizer, corpus.describe()["train_tokens"]])
                jobs.append((L, seed, name, cfg, key))
    stale = [p for L, seed, name, _, key in jobs
             if (p := record_path(out, name, L, seed)).exists() and json.loads(p.read_text())["config_fingerprint"] != key]
    if stale and not overwrite:
        raise ValueError(f"{out} holds {len(stale)} finished run(s) made with a different config (e.g. {stale[0]}); "
                         f"use another --out or pass --overwrite to replace them")
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
    key = _fingerprint([dataclasses.asdict(cfg), train, data_id, seed])
    path = out / "branch_points" / f"L{windows.seq_len}_seed{seed}_{key}.pt"
    if path.exists():
        return torch.load(path, map_location=device)
    classic, _ = dense_pretrain(cfg, windows, tcfg, seed, device)
    state = {k: v.detach().clone() for k, v in classic.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
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


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (cost, loss), both lower-is-better."""
    front = []
    for name, (c, l) in points.items():
        if not any((c2 <= c and l2 <= l) and (c2 < c or l2 < l) for n2, (c2, l2) in points.items() if n2 != name):
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def significance(entry: dict) -> str:
    """'better' / 'worse' if the paired 95 % CI of the loss difference excludes 0, 'n.s.', or 'untestable'."""
    d = entry.get("delta_val_loss_vs_baseline")
    if not d or d["ci95"][0] is None:
        return "untestable (1 seed)"
    lo, hi = d["ci95"]
    return "better" if hi < 0 else "worse" if lo > 0 else "n.s."


def results_table(summary: dict, names: list[str], L: int) -> str:
    """Markdown table of the variants at one length, best validation loss first."""
    from results_io import fmt_ci, markdown_table
    rows = []
    for name in sorted(names, key=lambda n: summary[n][str(L)]["val_loss"]["mean"]):
        e = summary[name][str(L)]
        rows.append([name, fmt_ci(e["val_loss"]), fmt_ci(e.get("delta_val_loss_vs_baseline")), significance(e),
                     fmt_ci(e["val_accuracy"], 1, 100), fmt_ci(e["avg_time_per_step"], 1, 1000),
                     fmt_ci(e.get("speedup_vs_baseline"), 2), fmt_ci(e["indexer_ms"], 2), fmt_ci(e["indexer_recall"]),
                     fmt_ci(e["train_loss_variance"], 4), f"{e['indexer_params']['mean']:,.0f}",
                     f"{100 * e['indexer_overhead']['mean']:.1f}", f"{e['indexer_flops_per_token']['mean'] / 1e6:.2f}"])
    header = ["variant", "val loss", "Δ vs baseline", "vs baseline", "acc %", "ms/step", "speed-up", "indexer ms",
              "recall", "loss var", "indexer params", "overhead %", "indexer MFLOP/tok"]
    return markdown_table(header, rows)


def answer(summary: dict, names: list[str], lengths: list[int]) -> list[str]:
    """Findings computed from the data: best per length, whether it beats the baseline, the Pareto front."""
    lines = []
    for L in lengths:
        present = [n for n in names if str(L) in summary.get(n, {})]
        if not present:
            continue
        best = min(present, key=lambda n: summary[n][str(L)]["val_loss"]["mean"])
        e = summary[best][str(L)]
        from results_io import fmt_ci
        front = pareto_front({n: (summary[n][str(L)]["avg_time_per_step"]["mean"],
                                  summary[n][str(L)]["val_loss"]["mean"]) for n in present})
        lines.append(f"- L={L}: lowest validation loss **{best}** ({fmt_ci(e['val_loss'])}); against the baseline: "
                     f"{significance(e)}. Pareto front (time/step vs loss, cheapest first): {', '.join(front)}.")
    return lines
