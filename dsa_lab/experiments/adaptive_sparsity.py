"""The adaptive-sparsity experiment (seed "Experiment 3"): does a k chosen from what the sequence is like beat a
fixed share of the prefix, at the same number of selected keys?

    python run_experiment.py --experiment adaptive_sparsity [--preset quick|cpu|default] [--seq-lens ...]
        [--seeds ...] [--attention-type mha|mla] [--models ...] [--out results/adaptive_sparsity/<mha|mla>]

Per length L and seed every model starts from the same dense branch point and sees the same batches in the same
order (stage 2: the seed's stream 1):
  dense      the classic model continues dense training
  fixed25/50/75  DSA keeping k_t = ceil(f (t+1)) keys, f = 25 / 50 / 75 % of the causal prefix
  adaptive   DSA with k_t from the DynamicSparsityController (adaptive_selection.py: prefix complexity and the
             entropy of the indexer's scores, causal)
  matched    DSA keeping a fixed share r of the prefix, r chosen so that its mean keys per query at L equals the
             adaptive model's measured mean of the same seed (the mean of its mean_selected_keys over the sparse
             stage's evaluations): the budget-matched comparison
Sparse models: indexer warm-up (dense KL, main model frozen), then sparse training (the paper's two stages). The
warm-up does not depend on the selector (dense attention, dense KL), so it runs once per (L, seed) and every sparse
model starts from its weights (a test checks that two selectors warm up to the same indexer).
Writes OUT/summary.json, records/L<L>/seed<S>/ (branch.pt + .json, warmup.pt + .json, <model>.json: resumable),
adaptive_sparsity.png and REPORT.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dsa_lab.common import distributed
from dsa_lab.experiments import skeleton as experiment
from dsa_lab.experiments import reports
from dsa_lab.experiments.costs import attention_flops_per_token, indexer_flops_per_token, step_peak_memory_mb
from models import AdaptiveMoELLM, FixedSparseMoELLM, check_plain_dsa
from config import QUICK_WIDTHS, DataConfig, ModelConfig, TrainConfig, build_configs, fingerprint_fields
from dsa_lab.training.data import STREAM_TRAIN, STREAM_WARMUP, load_corpus
from dsa_lab.experiments.tasks import LMTask, branch_point
from models import ClassicAttentionMoELLM
from dsa_lab.common.results_io import mean_ci95, read_json
from sparse_attention import DENSE
from adaptive_selection import AdaptiveKConfig
from dsa_lab.training.train import (Execution, classic_from_state, dense_stage, eval_batches, run_stage, sparse_from_state, sparse_stage,
                   state_of, warmup_indexer)

FIXED = {"fixed25": 0.25, "fixed50": 0.5, "fixed75": 0.75}
MODELS = ("dense", *FIXED, "adaptive", "matched")  # run in this order: matched needs adaptive's budget
WARMUP_SHARE = 0.5  # the selector of the shared warm-up (it only shapes the warm-up's recall figures)

# Calibration (this 2-core CPU, shared, one torch thread; quick widths, batch 4, gather backend, forward + backward
# alone, a lightly loaded machine):
# L=256: dense ~0.12 s, sparse 0.22-0.38 s per step; L=1024: dense ~0.8 s (MLA ~1.6 s), fixed25 ~2.5-2.9 s,
# fixed75 / adaptive ~3.9-4.5 s per step (per-row top-k over full index scores ~20 %, gather attention over up to
# 0.75 L keys ~40 % of a sparse step: on CPU every sparse model is slower per step than dense).
PRESETS = {
    "quick": dict(  # a small view: L 256, 3 seeds, short stages (~6 min here; the README has the measured time)
        seq_lens=[256], seeds=[42, 43, 44], **QUICK_WIDTHS, batch_size=4, dense_steps=60, warmup_steps=20, steps=30,
        learning_rate=3e-3, eval_every=15, eval_windows=16),
    "cpu": dict(  # L 256 and 1024, 3 seeds, ~30 min per attention type on this loaded CPU (run it in the background;
        # it resumes). Budget per seed at L=1024, measured under load (~half a core): steps 0.8 s dense, ~2 s
        # warm-up, ~4 s sparse; an evaluation of 8 windows with recall ~5 s, k profile ~4 s, the CPU peak-memory
        # probe ~20 s per model (first seed only): 40 + 16 x 2 + 16 x 0.8 + 5 models x (16 x 4 + 2 evals + k) ~ 8 min,
        # x 3 seeds ~ 25 min, plus L=256 ~ 4 min
        seq_lens=[256, 1024], seeds=[42, 43, 44], **QUICK_WIDTHS, batch_size=4, dense_steps=40, warmup_steps=16,
        steps=16, learning_rate=3e-3, eval_every=8, eval_windows=8),
    "default": dict(  # the GPU-box preset: the research plan's widths and lengths
        seq_lens=[64, 128, 256, 512, 1024, 2048], seeds=[42, 43, 44], d_model=256, n_heads=8, n_layers=4, d_ff=512,
        num_experts=4, expert_top_k=2, indexer_heads=4, indexer_dim=64, indexer_rope_dim=32, batch_size=8,
        dense_steps=1000, warmup_steps=1000, steps=1000, learning_rate=1e-3, eval_every=250, eval_windows=32),
}
ADAPTIVE_KEYS = {f.name for f in dataclasses.fields(AdaptiveKConfig)}


@dataclasses.dataclass
class Settings:
    model: ModelConfig  # max_seq_len = the largest L; set per L in the run
    train: TrainConfig
    data: DataConfig
    seq_lens: list[int]
    seeds: list[int]
    k_config: AdaptiveKConfig


def experiment_settings(preset: str, overrides: dict) -> Settings:
    """The preset's settings, then `overrides` (CONFIG keys, CLI flags, and AdaptiveKConfig fields)."""
    for key in ("top_k", "top_k_ratio", "sparse_top_k"):
        if key in overrides:
            raise ValueError(f"{key} does not apply to adaptive_sparsity (k is a share of the prefix or set by the "
                             f"controller); drop it, or set the controller's k_min / k_max / min_fraction / "
                             f"max_fraction in CONFIG")
    merged = experiment.preset_settings(PRESETS, preset, "adaptive_sparsity", overrides)
    k_config = AdaptiveKConfig(**{k: merged.pop(k) for k in list(merged) if k in ADAPTIVE_KEYS})
    k_config.validate()
    merged.setdefault("attention_backend", "gather")  # token-level attention over exactly the selected keys
    model, train, data, exp = build_configs(merged)
    return Settings(model, train, data, list(exp.seq_lens), list(exp.seeds), k_config)


def check_models(models: list[str]) -> list[str]:
    """The asked models in run order, dense always included (every difference is paired against it)."""
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"unknown model(s) {bad} for adaptive_sparsity; choose from {', '.join(MODELS)}")
    if "matched" in models and "adaptive" not in models:
        raise ValueError("model 'matched' takes its budget from 'adaptive': add adaptive to --models")
    return [m for m in MODELS if m in models or m == "dense"]


# ----------------------------------------------------------------------------- one (L, seed)
def builder(name: str, k_config: AdaptiveKConfig, budget: float | None = None):
    """cfg -> the model of a compared name (dense: the classic model)."""
    if name == "dense":
        return ClassicAttentionMoELLM
    if name == "adaptive":
        return lambda cfg: AdaptiveMoELLM(cfg, k_config)
    if name == "matched":
        return lambda cfg: FixedSparseMoELLM(cfg, mean_keys=budget)
    return lambda cfg: FixedSparseMoELLM(cfg, fraction=FIXED[name])


def warm_start(task, cfg: ModelConfig, tcfg: TrainConfig, branch: dict, seed: int, device, folder: Path,
               key: str, run: Execution = Execution()) -> dict:
    """Stage 1, shared by every sparse model of this (L, seed): the indexers warmed up (dense KL, main model
    frozen) on the seed's STREAM_WARMUP. Cached as folder/warmup.pt + warmup.json (its record)."""
    def compute():
        model = sparse_from_state(cfg, branch, seed, builder(f"fixed{round(100 * WARMUP_SHARE)}", None)).to(device)
        record = warmup_indexer(model, task.stream(seed, STREAM_WARMUP), task.val, tcfg, device,
                                f"L={cfg.max_seq_len} seed={seed} indexer warm-up", run=run.named("warmup"))
        return state_of(model), {"seq_len": cfg.max_seq_len, "seed": seed, "selector_share": WARMUP_SHARE, **record}
    return experiment.cached_state(folder / "warmup.pt", key, compute, device)


@torch.no_grad()
def k_profile(model, val: torch.Tensor, batch_size: int, device) -> dict:
    """The chosen k on the held-out windows (read from each layer's selected slots): mean and spread of k_t over
    every query of every layer, mean per layer, and mean and spread of the share k_t / (t+1) over the second half
    of each window (where a share is not forced by the bounds: its spread is what adapts); for the adaptive model
    also one (complexity, entropy, mean k) point per window (means over positions and layers, from its log)."""
    was_training = model.training
    model.eval()
    ks, shares, by_layer, points = [], [], [], []
    for inputs, _ in eval_batches(val, batch_size):
        recording = model.recording_k() if isinstance(model, AdaptiveMoELLM) else contextlib.nullcontext({})
        with recording as log:
            _, aux = model(inputs.to(device), return_aux=True)
        k = torch.stack([(layer.selected_idx >= 0).sum(-1) for layer in aux.layers]).float()  # (layers, B, L)
        ks.append(k.flatten(1))
        L = k.shape[-1]
        shares.append((k / torch.arange(1, L + 1, device=k.device))[..., L // 2:].flatten(1))
        by_layer.append(k.mean((1, 2)))
        if log:
            records = [log[layer][0] for layer in sorted(log)]
            for b in range(inputs.shape[0]):
                points.append([sum(r[f][b] for r in records) / len(records) for f in ("complexity", "entropy", "k_mean")])
    model.train(was_training)
    k, share = torch.cat(ks, 1), torch.cat(shares, 1)
    result = {"k_mean": float(k.mean()), "k_std": float(k.std()), "k_by_layer": torch.stack(by_layer).mean(0).tolist(),
              "share_mean": float(share.mean()), "share_std": float(share.std())}
    if points:
        result["k_vs_complexity"] = points
    return result


def train_model_record(name: str, task, cfg: ModelConfig, tcfg: TrainConfig, branch: dict, warm: dict | None,
                       seed: int, device, k_config: AdaptiveKConfig, budget: float | None, memory: bool = True,
                       run: Execution = Execution()) -> dict:
    """Train one compared model from the branch point (sparse: from the shared warm-up, no warm-up of its own) and
    measure it -> its record body: final metrics, curves, k profile, FLOPs, step peak memory, the adaptive model's
    budget. `memory`: measure the step peak memory (NaN otherwise: on CPU the profiler that measures it costs more
    than the step); `run`: precision, compile, resume checkpoints."""
    L = cfg.max_seq_len
    build = builder(name, k_config, budget)
    if name == "dense":
        model = classic_from_state(cfg, branch, seed, build).to(device)
        stage, mode = dense_stage(tcfg), DENSE
    else:
        model = sparse_from_state(cfg, warm, seed, build).to(device)
        stage, mode = sparse_stage(tcfg), None
    result = run_stage(model, stage, task.stream(seed, STREAM_TRAIN), task.val, tcfg, device,
                       f"L={L} seed={seed} {name}", run=run.named("train"))
    final = result["final"]
    batch = task.windows.train[:tcfg.batch_size]
    final["step_peak_memory_mb"] = (step_peak_memory_mb(model, batch[:, :-1], batch[:, 1:], device, mode)
                                    if memory else math.nan)
    record = {"final": final, "curves": result["curves"]}
    if name == "dense":
        keys = (L + 1) / 2
        final.update(k_mean=keys, k_std=float(torch.arange(1.0, L + 1).std()), share_mean=1.0, share_std=0.0,
                     indexer_flops_per_token=0.0)
    else:
        record["k"] = k_profile(model, task.val, tcfg.batch_size, device)
        keys = record["k"]["k_mean"]
        final.update(indexer_flops_per_token=indexer_flops_per_token(cfg, L),
                     **{m: record["k"][m] for m in ("k_mean", "k_std", "share_mean", "share_std")})
    final.update(kept_pair_fraction=keys / ((L + 1) / 2), attention_flops_per_token=attention_flops_per_token(cfg, keys))
    final["total_flops_per_token"] = final["attention_flops_per_token"] + final["indexer_flops_per_token"]
    if name == "adaptive":  # the budget the matched model is given: keys per query over the sparse stage
        record["budget_keys"] = sum(result["curves"]["mean_selected_keys"]) / len(result["curves"]["mean_selected_keys"])
    if name == "matched":
        record.update(target_mean_keys=budget, fraction=model.fraction)
    return record


# ----------------------------------------------------------------------------- the experiment
def run_adaptive_sparsity(preset: str, models: list[str], overrides: dict, out: Path, overwrite: bool,
                          run: Execution = Execution()) -> dict:
    """Every (L, seed, model) run (read back when finished), then summary.json, the figure and REPORT.md.
    `run`: precision, compile and resume checkpoints (records/L<L>/seed<S>/resume/<model>/)."""
    if distributed.world_size() > 1:
        raise ValueError("adaptive_sparsity runs in one process; start it with python, not torchrun")
    models = check_models(models)
    st = experiment_settings(preset, overrides)
    check_plain_dsa(st.model, "adaptive_sparsity")  # refuse a config these models cannot run, before any work
    device, run = experiment.prepare(st.train.device, run, [st.model.attention_backend], [])
    corpus = load_corpus(st.data)
    base = dataclasses.replace(st.model, vocab_size=corpus.tokenizer.vocab_size)
    keyed = {L: experiment.config_key({"model": fingerprint_fields(dataclasses.replace(base, max_seq_len=L)),
                                       "train": dataclasses.asdict(st.train),
                                       "adaptive": dataclasses.asdict(st.k_config),
                                       "corpus": corpus.describe(), "dataset": st.data.dataset,
                                       "tokenizer": st.data.tokenizer}, device, run)
             for L in st.seq_lens}
    experiment.clear_stale(out, {p: keyed[L][1] for L in st.seq_lens
                                 for p in sorted((out / "records" / f"L{L}").glob("seed*/*.json"))},
                           overwrite, folder_of=lambda record: record.parent)  # (L, seed): runs, branch, warm-up
    started = time.perf_counter()
    records: dict = {}
    for L, seed in tqdm([(L, s) for L in st.seq_lens for s in st.seeds], desc="adaptive sparsity (L, seed)"):
        for name, record in run_group(L, seed, models, st, corpus, base, keyed[L], out, overwrite, run, device).items():
            records.setdefault(L, {}).setdefault(name, {})[seed] = record
    summary = {**experiment.summary_head("adaptive_sparsity", {str(L): keyed[L][0] for L in st.seq_lens}, st.seeds,
                                         device, started), **summarise(records, st, models)}

    def figures(summary_json):
        from dsa_lab.experiments import plots
        plots.adaptive_sparsity(summary_json, models, out / "adaptive_sparsity.png")
        return ["adaptive_sparsity.png"]
    return experiment.finish(out, summary, figures, lambda s: reports.adaptive_sparsity_report(s, models),
                             lambda s: reports.adaptive_sparsity_tables(s, models) + "\n\n"
                             + reports.adaptive_sparsity_significance(s))


def run_group(L: int, seed: int, models: list[str], st: Settings, corpus, base: ModelConfig, keyed: tuple, out: Path,
              overwrite: bool, run: Execution, device) -> dict:
    """Every model of one (L, seed): the branch point and the shared warm-up (only when a model is still to run),
    then each model -> {model: its record, "_warmup": the warm-up record when there is one}."""
    (config, key), cfg = keyed, dataclasses.replace(base, max_seq_len=L)
    folder = out / "records" / f"L{L}" / f"seed{seed}"
    todo = [m for m in models if not (folder / f"{m}.json").exists()]
    task = branch = warm = None
    if todo:
        task = LMTask(corpus, L, st.train)
        with experiment.checkpointing(run, folder / "resume" / "branch", key, overwrite) as branch_run:
            branch = branch_point(task, cfg, st.train, seed, device, folder / "branch.pt", key, run=branch_run)
            warm = (warm_start(task, cfg, st.train, branch, seed, device, folder, key, branch_run)
                    if todo != ["dense"] else None)
    group = {}
    for name in models:
        def compute(this_run, name=name):
            budget = group["adaptive"]["budget_keys"] if name == "matched" else None
            memory = device.type == "cuda" or seed == st.seeds[0]  # a property of the shapes: once on CPU
            return train_model_record(name, task, cfg, st.train, branch, warm, seed, device, st.k_config, budget,
                                      memory, this_run)
        group[name] = experiment.run_record(folder / f"{name}.json", key, {"seq_len": L, "seed": seed, "model": name},
                                            compute, run, folder / "resume" / name, overwrite, config, device)
    if (folder / "warmup.json").exists():
        group["_warmup"] = read_json(folder / "warmup.json")
    return group


# every model and L in summary.json: each {"mean", "ci95", "per_seed"} over seeds
METRICS = ("val_loss", "val_accuracy", "val_perplexity", "avg_time_per_step", "tokens_per_s", "step_peak_memory_mb",
           "peak_memory_mb", "process_peak_rss_mb", "k_mean", "k_std", "share_mean", "share_std", "kept_pair_fraction",
           "attention_flops_per_token", "indexer_flops_per_token", "total_flops_per_token", "indexer_recall",
           "random_recall", "local_recall")


def summarise(records: dict, st: Settings, models: list[str]) -> dict:
    """Per L and model: every metric and the paired differences as mean ± 95 % CI over seeds; adaptive's k over
    training and k vs complexity; the significance tests of adaptive vs the best fixed share and vs matched."""
    results = {}
    for L, by_model in sorted(records.items()):
        entry = {name: model_metrics(by_model, name, st.seeds) for name in models}
        if "_warmup" in by_model:
            warm = [by_model["_warmup"][s] for s in st.seeds if s in by_model["_warmup"]]
            entry["warmup"] = {k: mean_ci95([w[k] for w in warm]) for k in ("recall_before", "recall_after",
                                                                            "random_recall", "local_recall")}
            entry["warmup_plateau"] = {str(s): by_model["_warmup"][s].get("plateau") for s in st.seeds
                                       if s in by_model["_warmup"]}
        results[str(L)] = entry
    return {"models": models, "results": results, "significance": significance_tests(records, st.seeds, models)}


def model_metrics(by_model: dict, name: str, seeds: list[int]) -> dict:
    """One model at one L: its metrics over seeds, paired differences vs dense and matched, its k profile."""
    finals = [by_model[name][s]["final"] for s in seeds]
    metrics = {m: mean_ci95([f.get(m) for f in finals]) for m in METRICS if m in finals[0]}
    for other in ("dense", "matched"):
        if other in by_model:
            metrics.update(experiment.paired_differences(finals, [by_model[other][s]["final"] for s in seeds], other))
    runs = [by_model[name][s] for s in seeds]
    if "k" in runs[0]:
        metrics["k_by_layer"] = [sum(v) / len(v) for v in zip(*[r["k"]["k_by_layer"] for r in runs])]
        curves = [r["curves"] for r in runs]
        metrics["k_curve"] = {"steps": curves[0]["steps"],
                              "k_mean": [sum(v) / len(v) for v in zip(*[c["mean_selected_keys"] for c in curves])]}
    if name == "adaptive":
        metrics["budget_keys"] = mean_ci95([r["budget_keys"] for r in runs])
        metrics["k_vs_complexity"] = [p for r in runs for p in r["k"]["k_vs_complexity"]]
    if name == "matched":
        metrics["fraction"] = mean_ci95([r["fraction"] for r in runs])
        metrics["target_mean_keys"] = mean_ci95([r["target_mean_keys"] for r in runs])
    return metrics


def significance_tests(records: dict, seeds: list[int], models: list[str]) -> dict:
    """Paired t-tests (per-seed val-loss differences) of adaptive vs the best fixed share (lowest mean val loss at
    that L) and vs matched, at every L; Holm-Bonferroni corrected across all of them (experiment.significance)."""
    comparisons = []
    for L, by_model in sorted(records.items()) if "adaptive" in models else ():
        loss = {name: [by_model[name][s]["final"]["val_loss"] for s in seeds] for name in models}
        fixed = [n for n in FIXED if n in models]
        rivals = [("best_fixed", min(fixed, key=lambda n: sum(loss[n]) / len(seeds)))] if fixed else []
        rivals += [("matched", "matched")] if "matched" in models else []
        comparisons += [{"L": L, "vs": role, "rival": rival, "metric": "val_loss", "lower_is_better": True,
                         "differences": [a - b for a, b in zip(loss["adaptive"], loss[rival])]}
                        for role, rival in rivals]
    return experiment.significance(comparisons)
