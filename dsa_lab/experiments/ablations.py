"""Variant runs for the indexer-optimisation experiment and the comprehensive ablations (seed "Experiment 4").

A variant is a name and a dict of ModelConfig overrides (the registry: dsa_lab/common/variants.py). For each (L, seed) one
dense branch point is trained (and cached); every variant is built from it, warmed up, then sparse-trained
on the same batches in the same order (train.train_sparse_from). Each finished run is one JSON record, read
back on resume. `aggregate` turns the records into per-variant statistics; dsa_lab/experiments/reports.py writes them up.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import torch

from dsa_lab.common.variants import OPTIMIZATIONS
from dsa_lab.experiments import reports
from dsa_lab.experiments import skeleton as experiment
from config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, config_for_length, fingerprint_fields
from dsa_lab.training.data import STREAM_PRETRAIN, BatchStream, build_windows, eval_subset, stream_seed
from dsa_lab.common.results_io import atomic_write_json, fingerprint, mean_ci95, read_json, run_fingerprint
from dsa_lab.training.train import check_backend_device, dense_pretrain, state_of, train_sparse_from
from dsa_lab.experiments.costs import (attention_flops_per_token, indexer_bytes_per_token, indexer_flops_per_token,
                               step_peak_memory_mb)


@torch.no_grad()
def quantization_agreement(model, inputs: torch.Tensor, device: torch.device) -> dict:
    """Top-k overlap and relative score error of the run's low-precision indexer (first layer) against the
    same trained indexer in fp32, on held-out inputs (quantization_utils.precision_report). NaN for fp32."""
    from quantization_utils import precision_report
    indexer = model.attentions[0].indexer
    precision = getattr(indexer, "precision", "fp32")
    if precision == "fp32":
        return {"quant_topk_overlap": math.nan, "quant_score_rel_error": math.nan}
    captured = []
    handle = indexer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    was_training = model.training
    model.eval()
    try:
        model(inputs.to(device))
    finally:
        handle.remove()
        model.train(was_training)
    report = precision_report(indexer, captured[0], model.cfg.sparse_top_k, precisions=(precision,))[precision]
    return {"quant_topk_overlap": report["topk_overlap"], "quant_score_rel_error": report["score_rel_error"]}


# ----------------------------------------------------------------------------- running
METRICS = ["val_loss", "val_accuracy", "val_perplexity", "train_loss_variance", "avg_time_per_step", "indexer_ms",
           "attention_ms", "peak_memory_mb", "process_peak_rss_mb", "step_peak_memory_mb", "indexer_recall",
           "random_recall", "local_recall", "warmup_indexer_recall", "mean_selected_keys", "params", "indexer_params",
           "indexer_overhead", "indexer_flops_per_token", "attention_flops_per_token", "total_flops_per_token",
           "indexer_bytes_per_token", "quant_topk_overlap", "quant_score_rel_error"]


def interleaved(names: list[str], L: int, seed: int) -> list[str]:
    """The variants of one (L, seed) in a shuffled order (seeded by L and seed): no variant — the baseline
    included — always runs first, in a cold cache or beside a warming machine."""
    order = list(names)
    random.Random(f"{L}:{seed}").shuffle(order)
    return order


def plain_selection(cfg: ModelConfig) -> bool:
    """The plain lightning indexer with plain top-k: the fast backends select it chunked, without an L x L tensor."""
    return (cfg.indexer_precision == "fp32" and cfg.selection_pattern == "topk" and cfg.k_strategy == "fixed"
            and not cfg.multiscale_block and cfg.shared_indexer_group == 1)


def one_code_path(configs: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
    """Variants of one comparison run on one code path: when some variant needs the full-score (reference)
    selection, every variant uses the masked backend, so times compare the optimisations, not two code paths."""
    backends = {c.attention_backend for c in configs.values()}
    if all(plain_selection(c) for c in configs.values()) or backends == {"masked"}:
        return configs
    return {name: dataclasses.replace(c, attention_backend="masked") for name, c in configs.items()}


def run_variants(variants: dict[str, dict], model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
                 exp_cfg: ExperimentConfig, out: Path, overwrite: bool = False, category_of: dict | None = None,
                 run=None) -> list[dict]:
    """Train every variant for every length and seed (resumable: finished runs are read back; with `run`
    (train.Execution) checkpointing, an interrupted one continues from OUT/resume/) -> list of records."""
    from tqdm.auto import tqdm

    from dsa_lab.common import distributed
    from dsa_lab.training.data import load_corpus

    device, run = experiment.prepare(train_cfg.device, run, [], [train_cfg.batch_size])
    with distributed.main_first():  # rank 0 builds the caches, the others read them
        corpus = load_corpus(data_cfg)
    jobs = variant_jobs(variants, model_cfg, train_cfg, data_cfg, exp_cfg, corpus, device, run)
    experiment.clear_stale(out, {record_path(out, name, L, seed): key for L, seed, name, _, (_, key) in jobs},
                           overwrite)  # a stale record is removed (with --overwrite) and that run redone
    branches: dict[tuple[int, int], dict] = {}
    finished: dict[tuple[str, int], dict] = {}  # (key, seed) -> record: a second name for one config is not rerun
    records = []
    for L, seed, name, cfg, (config, key) in tqdm(jobs, desc="ablation runs"):
        path = record_path(out, name, L, seed)
        labels = {"ablation_name": name, "category": (category_of or {}).get(name, "optimization"),
                  "ablation_config": variants[name], "sequence_length": L, "seed": seed}
        if not path.exists() and (key, seed) in finished:  # same config and seed under another name
            twin = finished[(key, seed)]
            records.append(_write_and_read(path, {**twin, **labels, "same_run_as": twin["ablation_name"]}))
            continue

        def compute(this_run, L=L, seed=seed, name=name, cfg=cfg):
            windows = build_windows(corpus, L)
            if (L, seed) not in branches:  # one branch point in memory at a time
                base_cfg, _ = config_for_length(model_cfg, data_cfg, exp_cfg, L, corpus.tokenizer.vocab_size)
                data_id = [data_cfg.dataset, data_cfg.tokenizer, corpus.describe(), run_fingerprint(device, run.dtype)]
                branches.clear()
                branches[(L, seed)] = branch_state(base_cfg, windows, train_cfg, seed, device, out, data_id, run,
                                                   overwrite)
            model, result = train_sparse_from(branches[(L, seed)], cfg, windows, train_cfg, seed, device, desc=name,
                                              run=this_run)
            return {"metrics": variant_metrics(model, result, cfg, windows, train_cfg, device),
                    "curves": result["curves"]}
        records.append(experiment.run_record(path, key, labels, compute, run, out / "resume" / path.stem, overwrite,
                                             config, device))
        finished.setdefault((key, seed), records[-1])
    return records


def variant_jobs(variants: dict[str, dict], model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
                 exp_cfg: ExperimentConfig, corpus, device, run) -> list[tuple]:
    """Every (L, seed, name, config, (keyed config, key)) in run order, each variant's config checked before any
    training; the variants of one (L, seed) interleaved."""
    from optimized_indexers import check_multiscale
    jobs = []
    for L in exp_cfg.seq_lens:
        base_cfg, _ = config_for_length(model_cfg, data_cfg, exp_cfg, L, corpus.tokenizer.vocab_size)
        configs = {}
        for name, overrides in variants.items():
            cfg = dataclasses.replace(base_cfg, **overrides)
            cfg.validate()
            check_backend_device(cfg.attention_backend, device)
            if cfg.multiscale_block:
                check_multiscale(cfg.sparse_top_k, L, cfg.multiscale_block)  # refuse before any training
            configs[name] = cfg
        configs = one_code_path(configs)
        for seed in exp_cfg.seeds:
            for name in interleaved(list(variants), L, seed):
                keyed = experiment.config_key({"seq_len": L, "model": fingerprint_fields(configs[name]),
                                               "train": dataclasses.asdict(train_cfg), "dataset": data_cfg.dataset,
                                               "tokenizer": data_cfg.tokenizer,
                                               "train_tokens": corpus.describe()["train_tokens"]}, device, run)
                jobs.append((L, seed, name, configs[name], keyed))
    return jobs


def variant_metrics(model, result: dict, cfg: ModelConfig, windows, train_cfg: TrainConfig, device) -> dict:
    """A trained variant's METRICS: its final quality and speed, parameter counts, analytic FLOPs and bytes per
    token, one step's peak memory, and its quantised indexer's agreement with fp32."""
    L = windows.seq_len
    metrics = {k: result["final"].get(k, math.nan) for k in METRICS}
    total = sum(p.numel() for p in model.parameters())
    indexer = sum(p.numel() for p in model.indexer_parameters())
    idx_flops = indexer_flops_per_token(cfg, L)
    attn_flops = attention_flops_per_token(cfg, metrics["mean_selected_keys"])
    batch = windows.train[:train_cfg.batch_size]
    val_batch = windows.val[:train_cfg.batch_size, :-1]
    metrics.update(params=total, indexer_params=indexer, indexer_overhead=indexer / total,
                   indexer_flops_per_token=idx_flops, attention_flops_per_token=attn_flops,
                   total_flops_per_token=idx_flops + attn_flops, indexer_bytes_per_token=indexer_bytes_per_token(cfg, L),
                   step_peak_memory_mb=step_peak_memory_mb(model, batch[:, :-1], batch[:, 1:], device),
                   **quantization_agreement(model, val_batch, device))
    return metrics


def _write_and_read(path: Path, record: dict) -> dict:
    """Write a record (rank 0) and read it back on every rank (the JSON-cleaned copy the summary uses)."""
    from dsa_lab.common import distributed
    atomic_write_json(path, record)
    distributed.barrier()
    return read_json(path)


def record_path(out: Path, name: str, L: int, seed: int) -> Path:
    return out / "records" / f"{name.replace('+', '-')}__L{L}__seed{seed}.json"


def branch_state(cfg: ModelConfig, windows, tcfg: TrainConfig, seed: int, device, out: Path, data_id, run,
                 overwrite: bool = False) -> dict:
    """The dense branch point for (L, seed) (train.dense_pretrain), cached as branch_points/L<L>_seed<S>_<key>.pt
    (experiment.cached_state) so a resumed ablation does not redo it; keyed on everything that shapes it (model,
    data, the machine, every training setting but the later stages' lengths)."""
    later = ("steps", "warmup_steps", "profile_steps", "warmup_until_plateau", "warmup_eval_every",
             "warmup_plateau_window", "warmup_min_rel_improvement", "warmup_eval_windows")  # the warm-up's rule too
    train = {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in later}
    key = fingerprint([fingerprint_fields(cfg), train, data_id, seed])
    path = out / "branch_points" / f"L{windows.seq_len}_seed{seed}_{key}.pt"

    def compute():
        stream = BatchStream(windows.train, tcfg.batch_size, stream_seed(seed, STREAM_PRETRAIN))
        with experiment.checkpointing(run, out / "resume" / path.stem, key, overwrite) as this_run:
            classic, _ = dense_pretrain(cfg, stream, eval_subset(windows.val, tcfg.eval_windows), tcfg, seed, device,
                                        f"L={windows.seq_len} seed={seed}", run=this_run)
        return state_of(classic), {"seed": seed}
    return experiment.cached_state(path, key, compute, device)


# ----------------------------------------------------------------------------- analysis
def aggregate(records: list[dict], baseline: str = "baseline") -> dict:
    """-> {name: {L: {metric: mean_ci95, 'time_ratio_vs_baseline', 'delta_val_loss_vs_baseline', ...}}}.

    Time ratio and loss difference are paired by seed against the baseline run of the same (L, seed).
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
                entry.update(experiment.paired_differences([per_seed[s]["metrics"] for s in paired],
                                                           [base[s]["metrics"] for s in paired], baseline))
            summary[name][str(L)] = entry
    return summary


def _num(x):
    return math.nan if x is None else x


def run_indexer_optimization(model_cfg, train_cfg, data_cfg, exp_cfg, names: list[str], overwrite: bool,
                             run=None) -> dict:
    """Each strategy through warm-up + sparse training from a shared dense branch point, per L and seed."""
    from dsa_lab.common import distributed
    from dsa_lab.training.train import pick_device

    unknown = [n for n in names if n not in OPTIMIZATIONS]
    if unknown:
        raise ValueError(f"unknown --optimization {unknown}; choose from {', '.join(OPTIMIZATIONS)}")
    if "baseline" not in names:
        names = ["baseline", *names]  # time ratios and differences are relative to it
    out = Path(exp_cfg.out)
    experiment.check_experiment(out, "indexer_optimization")
    started = time.perf_counter()
    records = run_variants({n: OPTIMIZATIONS[n] for n in names}, model_cfg, train_cfg, data_cfg, exp_cfg,
                                     out, overwrite, run=run)
    if not distributed.is_main():
        return {}
    config = {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(train_cfg),
              "data": dataclasses.asdict(data_cfg)}
    summary = {**experiment.summary_head("indexer_optimization", config, list(exp_cfg.seeds),
                                         pick_device(train_cfg.device), started),
               "sequence_lengths": list(exp_cfg.seq_lens), "strategies": names, "results": aggregate(records)}
    L_max = max(exp_cfg.seq_lens)

    def figures(summary_json):
        from dsa_lab.experiments import plots
        results = summary_json["results"]
        plots.optimization_comparison(results, names, L_max, out / "optimization_comparison.png")
        plots.speed_quality_tradeoffs(results, names, exp_cfg.seq_lens, reports.pareto_front,
                                      out / "speed_quality_tradeoffs.png", "Indexer strategies: speed vs quality")
        plots.scaling_analysis(results, names, exp_cfg.seq_lens, out / "scaling_analysis.png")
        return ["optimization_comparison.png", "speed_quality_tradeoffs.png", "scaling_analysis.png"]
    return experiment.finish(out, summary, figures, reports.optimization_report,
                             lambda s: reports.results_table(s["results"], names, L_max))
