"""The adaptive-sparsity experiment (seed "Experiment 3"): does a k chosen from what the sequence is like beat a
fixed share of the prefix, at the same number of selected keys?

    python run_experiment.py --experiment adaptive_sparsity [--preset quick|cpu|default] [--seq-lens ...]
        [--seeds ...] [--attention-type mha|mla] [--models ...] [--out results/adaptive_sparsity/<mha|mla>]

Per length L and seed every model starts from the same dense branch point and sees the same batches in the same
order (stage 2: the seed's stream 1):
  dense      the classic model continues dense training
  fixed25/50/75  DSA keeping k_t = ceil(f (t+1)) keys, f = 25 / 50 / 75 % of the causal prefix
  adaptive   DSA with k_t from the DynamicSparsityController (sparsity_control.py: prefix complexity and the
             entropy of the indexer's scores, causal)
  matched    DSA keeping a fixed share r of the prefix, r chosen so that its mean keys per query at L equals the
             adaptive model's measured mean of the same seed (the mean of its mean_selected_keys over the sparse
             stage's evaluations): the budget-matched comparison
Sparse models: indexer warm-up (dense KL, main model frozen), then sparse training (the paper's two stages). The
warm-up does not depend on the selector (dense attention, dense KL), so it runs once per (L, seed) and every sparse
model starts from its weights (a test checks that two selectors warm up to the same indexer).
Writes OUT/summary.json, records/L<L>/seed<S>/ (branch.pt, warm.pt, warmup.json, <model>.json: resumable),
adaptive_sparsity.png and REPORT.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import distributed
import plots
import reports
from ablations import attention_flops_per_token, indexer_flops_per_token, step_peak_memory_mb
from adaptive_models import AdaptiveMoELLM, FixedSparseMoELLM, check_plain_dsa
from config import DataConfig, ModelConfig, TrainConfig, build_configs
from data import load_corpus
from long_context import LMTask, branch_point
from models import ClassicAttentionMoELLM
from results_io import (atomic_save_torch, atomic_write_json, atomic_write_text, check_stale, fingerprint, holm,
                        load_torch, machine_key, mean_ci95, paired_t_pvalue, read_json, run_environment)
from sparse_attention import DENSE
from sparsity_control import AdaptiveKConfig
from train import (Execution, check_backend_device, checkpointed, classic_from_state, dense_stage, discard_checkpoints,
                   eval_batches, pick_device, run_stage, sparse_from_state, sparse_stage, warmup_stage)

FIXED = {"fixed25": 0.25, "fixed50": 0.5, "fixed75": 0.75}
MODELS = ("dense", *FIXED, "adaptive", "matched")  # run in this order: matched needs adaptive's budget
WARMUP_SHARE = 0.5  # the selector of the shared warm-up (it only shapes the warm-up's recall figures)

_WIDTHS = dict(d_model=64, n_heads=4, n_layers=2, d_ff=128, num_experts=4, expert_top_k=2, indexer_heads=2,
               indexer_dim=16, indexer_rope_dim=8)
# Calibration (this 2-core CPU, shared, one torch thread; quick widths, batch 4, gather backend, forward + backward
# alone, a lightly loaded machine):
# L=256: dense ~0.12 s, sparse 0.22-0.38 s per step; L=1024: dense ~0.8 s (MLA ~1.6 s), fixed25 ~2.5-2.9 s,
# fixed75 / adaptive ~3.9-4.5 s per step (per-row top-k over full index scores ~20 %, gather attention over up to
# 0.75 L keys ~40 % of a sparse step: on CPU every sparse model is slower per step than dense).
PRESETS = {
    "quick": dict(  # a small view: L 256, 3 seeds, short stages (~6 min here; the README has the measured time)
        seq_lens=[256], seeds=[42, 43, 44], **_WIDTHS, batch_size=4, dense_steps=60, warmup_steps=20, steps=30,
        learning_rate=3e-3, eval_every=15, eval_windows=16),
    "cpu": dict(  # L 256 and 1024, 3 seeds, ~30 min per attention type on this loaded CPU (run it in the background;
        # it resumes). Budget per seed at L=1024, measured under load (~half a core): steps 0.8 s dense, ~2 s
        # warm-up, ~4 s sparse; an evaluation of 8 windows with recall ~5 s, k profile ~4 s, the CPU peak-memory
        # probe ~20 s per model (first seed only): 40 + 16 x 2 + 16 x 0.8 + 5 models x (16 x 4 + 2 evals + k) ~ 8 min,
        # x 3 seeds ~ 25 min, plus L=256 ~ 4 min
        seq_lens=[256, 1024], seeds=[42, 43, 44], **_WIDTHS, batch_size=4, dense_steps=40, warmup_steps=16,
        steps=16, learning_rate=3e-3, eval_every=8, eval_windows=8),
    "default": dict(  # the GPU-box preset: the research plan's widths and lengths
        seq_lens=[64, 128, 256, 512, 1024, 2048], seeds=[42, 43, 44], d_model=256, n_heads=8, n_layers=4, d_ff=512,
        num_experts=4, expert_top_k=2, indexer_heads=4, indexer_dim=64, indexer_rope_dim=32, batch_size=8,
        dense_steps=1000, warmup_steps=300, steps=1000, learning_rate=1e-3, eval_every=250, eval_windows=32),
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
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is unknown for adaptive_sparsity; choose one of {', '.join(PRESETS)}")
    for key in ("top_k", "top_k_ratio", "sparse_top_k"):
        if key in overrides:
            raise ValueError(f"{key} does not apply to adaptive_sparsity (k is a share of the prefix or set by the "
                             f"controller); drop it, or set the controller's k_min / k_max / min_fraction / "
                             f"max_fraction in CONFIG")
    merged = {**PRESETS[preset], **overrides}
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
    frozen) on the seed's stream 2. Cached in folder/warm.pt (+ warmup.json, its record)."""
    path = folder / "warm.pt"
    if path.exists():
        return load_torch(path, device, fix="delete it (the warm-up is redone)")
    model = sparse_from_state(cfg, branch, seed, builder(f"fixed{round(100 * WARMUP_SHARE)}", None)).to(device)
    warm = run_stage(model, warmup_stage(tcfg), task.stream(seed, 2), task.val, tcfg, device,
                     f"L={cfg.max_seq_len} seed={seed} indexer warm-up", run=run.named("warmup"))
    atomic_write_json(folder / "warmup.json", {
        "config_fingerprint": key, "seq_len": cfg.max_seq_len, "seed": seed, "selector_share": WARMUP_SHARE,
        "indexer_kl": warm["step_indexer_kl"], "recall_before": warm["before"]["indexer_recall"],
        "recall_after": warm["final"]["indexer_recall"], "random_recall": warm["final"]["random_recall"],
        "local_recall": warm["final"]["local_recall"]})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atomic_save_torch(state, path)
    return state


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


def train_model(name: str, task, cfg: ModelConfig, tcfg: TrainConfig, branch: dict, warm: dict | None, seed: int,
                device, k_config: AdaptiveKConfig, budget: float | None, memory: bool = True,
                run: Execution = Execution()) -> dict:
    """One compared model from the branch point (sparse: from the warm-up) -> its record body. `memory`: measure
    the step peak memory (NaN otherwise: on CPU the profiler that measures it costs more than the step); `run`:
    precision, compile, resume checkpoints."""
    L = cfg.max_seq_len
    build = builder(name, k_config, budget)
    if name == "dense":
        model = classic_from_state(cfg, branch, seed, build).to(device)
        stage, mode = dense_stage(tcfg), DENSE
    else:
        model = sparse_from_state(cfg, warm, seed, build).to(device)
        stage, mode = sparse_stage(tcfg), None
    result = run_stage(model, stage, task.stream(seed, 1), task.val, tcfg, device, f"L={L} seed={seed} {name}",
                       run=run.named("train"))
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
    device = pick_device(st.train.device)
    check_backend_device(st.model.attention_backend, device)
    run.validate(device)
    corpus = load_corpus(st.data)
    base = dataclasses.replace(st.model, vocab_size=corpus.tokenizer.vocab_size)
    env = {**machine_key(device), "corpus": corpus.describe(),
           "dataset": st.data.dataset, "tokenizer": st.data.tokenizer}
    config_key = {L: {"model": dataclasses.asdict(dataclasses.replace(base, max_seq_len=L)),
                      "train": dataclasses.asdict(st.train), "adaptive": dataclasses.asdict(st.k_config), **env}
                  for L in st.seq_lens}
    if run.dtype != "fp32":  # a bf16 run is not an fp32 run (fp32 keeps the fingerprints runs on disk carry)
        for key in config_key.values():
            key["dtype"] = run.dtype
    expected = {}
    for L in st.seq_lens:
        key = fingerprint(config_key[L])
        expected.update({p: key for p in sorted((out / "records" / f"L{L}").glob("seed*/*.json"))})
    for stale in check_stale(out, expected, overwrite):
        shutil.rmtree(stale.parent, ignore_errors=True)  # that (L, seed) folder: its runs, branch and warm-up
    t0 = time.perf_counter()
    records: dict = {}
    jobs = [(L, s) for L in st.seq_lens for s in st.seeds]
    for L, seed in tqdm(jobs, desc="adaptive sparsity (L, seed)"):
        cfg, key = dataclasses.replace(base, max_seq_len=L), fingerprint(config_key[L])
        folder = out / "records" / f"L{L}" / f"seed{seed}"
        todo = [m for m in models if not (folder / f"{m}.json").exists()]
        if todo:
            task = LMTask(corpus, L, st.train)
            branch_run = checkpointed(run, folder / "resume" / "branch", key, overwrite)
            branch = branch_point(task, cfg, st.train, seed, device, folder / "branch.pt", key, run=branch_run)
            warm = (warm_start(task, cfg, st.train, branch, seed, device, folder, key, branch_run)
                    if todo != ["dense"] else None)
            discard_checkpoints(branch_run)
            for name in todo:
                budget = read_json(folder / "adaptive.json")["budget_keys"] if name == "matched" else None
                memory = device.type == "cuda" or seed == st.seeds[0]  # a property of the shapes: once on CPU
                started, model_run = time.perf_counter(), checkpointed(run, folder / "resume" / name, key, overwrite)
                result = train_model(name, task, cfg, st.train, branch, warm, seed, device, st.k_config, budget,
                                     memory, model_run)
                atomic_write_json(folder / f"{name}.json", {"config_fingerprint": key, "seq_len": L, "seed": seed,
                                                            "model": name, **result,
                                                            "wall_time_s": time.perf_counter() - started,
                                                            "config": config_key[L],
                                                            "environment": run_environment(device)})
                discard_checkpoints(model_run)
        for name in models:
            records.setdefault(L, {}).setdefault(name, {})[seed] = read_json(folder / f"{name}.json")
        warmup = folder / "warmup.json"
        if warmup.exists():
            records[L].setdefault("_warmup", {})[seed] = read_json(warmup)
    summary = summarise(records, st, models, config_key)
    summary["wall_time_s"] = time.perf_counter() - t0
    summary["environment"] = run_environment(device)
    atomic_write_json(out / "summary.json", summary)
    summary = read_json(out / "summary.json")
    plots.adaptive_sparsity(summary, models, out / "adaptive_sparsity.png")
    atomic_write_text(out / "REPORT.md", reports.adaptive_sparsity_report(summary, models))
    print("\n" + reports.adaptive_sparsity_tables(summary, models))
    print("\n" + reports.adaptive_sparsity_significance(summary))
    print(f"\nwrote {out}/summary.json, adaptive_sparsity.png, REPORT.md")
    return summary


# every model and L in summary.json: each {"mean", "ci95", "per_seed"} over seeds
METRICS = ("val_loss", "val_accuracy", "val_perplexity", "avg_time_per_step", "tokens_per_s", "step_peak_memory_mb",
           "peak_memory_mb", "process_peak_rss_mb", "k_mean", "k_std", "share_mean", "share_std", "kept_pair_fraction",
           "attention_flops_per_token", "indexer_flops_per_token", "total_flops_per_token", "indexer_recall",
           "random_recall", "local_recall")
PAIRED = ("delta_val_loss_vs_dense", "delta_val_loss_vs_matched", "time_ratio_vs_dense", "time_ratio_vs_matched")


def summarise(records: dict, st: Settings, models: list[str], config_key: dict) -> dict:
    """Per L and model: every metric and the paired differences as mean ± 95 % CI over seeds; adaptive's k over
    training and k vs complexity; the significance tests of adaptive vs the best fixed share and vs matched."""
    results = {}
    for L, by_model in sorted(records.items()):
        seeds = st.seeds
        entry = {}
        for name in models:
            finals = [by_model[name][s]["final"] for s in seeds]
            metrics = {m: mean_ci95([f.get(m) for f in finals]) for m in METRICS if m in finals[0]}
            for other in ("dense", "matched"):
                if other in by_model:
                    ref = [by_model[other][s]["final"] for s in seeds]
                    metrics[f"delta_val_loss_vs_{other}"] = mean_ci95([f["val_loss"] - r["val_loss"]
                                                                       for f, r in zip(finals, ref)])
                    metrics[f"time_ratio_vs_{other}"] = mean_ci95([f["avg_time_per_step"] / r["avg_time_per_step"]
                                                                   for f, r in zip(finals, ref)])
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
            entry[name] = metrics
        if "_warmup" in by_model:
            warm = [by_model["_warmup"][s] for s in seeds if s in by_model["_warmup"]]
            entry["warmup"] = {k: mean_ci95([w[k] for w in warm]) for k in ("recall_before", "recall_after",
                                                                            "random_recall", "local_recall")}
        results[str(L)] = entry
    return {"experiment": "adaptive_sparsity", "config": {str(L): c for L, c in config_key.items()}, "seeds": st.seeds,
            "models": models, "results": results, "significance": significance_tests(records, st.seeds, models)}


def significance_tests(records: dict, seeds: list[int], models: list[str]) -> dict:
    """Paired t-tests (per-seed val-loss differences) of adaptive vs the best fixed share (lowest mean val loss at
    that L) and vs matched, at every L; Holm-Bonferroni corrected across all of them."""
    if "adaptive" not in models:
        return {"tests": [], "n_tests": 0, "correction": "holm", "alpha": reports.ALPHA}
    tests = []
    for L, by_model in sorted(records.items()):
        loss = {name: [by_model[name][s]["final"]["val_loss"] for s in seeds] for name in models}
        fixed = [n for n in FIXED if n in models]
        rivals = []
        if fixed:
            rivals.append(("best_fixed", min(fixed, key=lambda n: sum(loss[n]) / len(seeds))))
        if "matched" in models:
            rivals.append(("matched", "matched"))
        for role, rival in rivals:
            diffs = [a - b for a, b in zip(loss["adaptive"], loss[rival])]
            tests.append({"L": L, "vs": role, "rival": rival, "delta_val_loss": mean_ci95(diffs),
                          "p": paired_t_pvalue(diffs)})
    adjusted = holm({i: t["p"] for i, t in enumerate(tests) if t["p"] is not None})
    for i, t in enumerate(tests):
        t["p_holm"] = adjusted.get(i)
        t["verdict"] = ("untestable (1 seed)" if t["p_holm"] is None else "n.s." if t["p_holm"] >= reports.ALPHA
                        else "adaptive better" if t["delta_val_loss"]["mean"] < 0 else "adaptive worse")
    return {"tests": tests, "n_tests": len(adjusted), "correction": "holm", "alpha": reports.ALPHA}
