"""The long-context study: does DSA keep dense quality when k << L, and does the indexer find what matters?

    python run_experiment.py --experiment long_context [--preset quick|cpu|default] [--task lm mqar]
        [--seq-lens ...] [--top-k 64] [--models dense dsa local random block dsa_levers] [--seeds ...]
        [--levers structure head_max]

A fixed budget of k keys per query at every length. Per task, length and seed, every model starts from the
same dense branch point and sees the same batches in the same order:
  dense   the classic model continues dense training
  dsa     token-level DSA: indexer warm-up (dense KL), then sparse training (the paper's two stages)
  local   each query keeps its last k tokens (no indexer)        \\ controls that need no indexer,
  random  k random past tokens, redrawn every step (no indexer)  |  trained the same way
  oracle  top-k of the layer's true head-summed attention       /  (the ceiling of any shared index set at k)
  block   our query-block-shared variant (blocks of queries share one selected set)
  dsa_levers  dsa with the retrieval levers of `--levers` (default: structure head_max, the retrofit presets'
          adopted levers):
          structure keeps the first 4 and last 16 tokens in every row, group_max / head_max change the warm-up's target
Tasks: `lm` (real text, windows inside documents) and `mqar` (multi-query associative recall, dsa_lab/experiments/mqar.py: a dense
model solves it, a window of k cannot once the pairs sit further back than k).
Writes OUT/summary.json, records/ (one per task, length, seed and model: resumable), long_context.png, warmup_kl.png,
mqar_accuracy_by_distance.png and REPORT.md.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dsa_lab.experiments import skeleton as experiment
from dsa_lab.experiments import reports
from config import QUICK_WIDTHS, DataConfig, ModelConfig, TrainConfig, build_configs, fingerprint_fields
from dsa_lab.training.data import STREAM_CURRICULUM, STREAM_TRAIN, STREAM_WARMUP, load_corpus
from dsa_lab.common.results_io import load_torch, mean_ci95, read_json
from sparse_attention import AttentionMode, kept_pair_fraction
from dsa_lab.common import distributed
from dsa_lab.experiments.tasks import LMTask, MQARTask, branch_point
from dsa_lab.training.train import (Execution, classic_from_state, dense_stage, evaluate, run_stage, sparse_from_state,
                            sparse_stage, state_of, warmup_indexer)

TASKS = ("lm", "mqar")
MODELS = ("dense", "dsa", "local", "random", "oracle", "block", "dsa_levers")
INDEXED = ("dsa", "dsa_levers")  # the models whose lightning indexer is warmed up and compared with the oracle
# `--levers NAME ...` for dsa_levers: ModelConfig's lever fields (config.ADDED_DEFAULTS), applied in order; the names
# and settings are the retrofit's (dsa_lab/experiments/retrofit.py LEVERS) for the levers a toy model has
LEVERS = {"paper": dict(structure_window=0, warmup_target="sum", warmup_row_weight=0.0, warmup_rank_weight=0.0),
          "structure": dict(structure_window=16),
          "group_max": dict(warmup_target="group_max"), "head_max": dict(warmup_target="head_max"),
          "far_rows": dict(warmup_row_weight=0.5), "rank": dict(warmup_rank_weight=0.1),  # the loss levers
          "heads8": dict(indexer_heads=8), "heads16": dict(indexer_heads=16),
          # quick/cpu widths' 16 dims (8 with RoPE) -> 64 (56 position-free): match by content (the default preset's lm
          # indexer has 64 dims already: there it changes nothing)
          "dim64": dict(indexer_dim=64),
          "wide": dict(indexer_heads=32, indexer_dim=128)}  # the last four: capacity
# dsa_levers without `--levers`, per task: what closed each task's gap (issue 30). Text: the retrofit's structure and
# per-head target (retrofit.ADOPTED_LEVERS; its capacity lever is SmolLM2's, untested on the toy text models); MQAR:
# capacity, 16 heads of 64 dims (structure and head_max changed nothing there; docs/experiments.md)
DEFAULT_LEVERS = {"lm": ("structure", "head_max"), "mqar": ("heads16", "dim64")}
DEFAULT_MODELS = ("dense", "dsa", "local", "random", "oracle")

# Per preset and task: model widths and an explicit step budget per stage (the same at every length).
# CPU calibration (this 2-core machine): a quick-width classic model at L=1024 takes ~0.55 s per step at batch 8.
# MQAR (calibrated: d 64 / 2 heads solves 4 pairs after a short-L curriculum; loss on answers only)
_MQAR_WIDTHS = dict(d_model=64, n_heads=2, n_layers=2, d_ff=128, num_experts=1, expert_top_k=1, num_shared_experts=0,
                    indexer_heads=2, indexer_dim=16, indexer_rope_dim=8)
# The curriculum (L=32) runs in rounds until its held-out accuracy reaches `curriculum_target` (at most
# curriculum_steps); it is shared by every length of a seed, and each length's dense stage continues from the
# previous length's branch point (32 -> 256 -> 512 ...), so the longest length gets every shorter one's training.
# The batch decides whether the jump comes (2026-12-02, this CPU): at batch 32, 400-step rounds (a fresh AdamW and
# lr schedule each) left seeds 42 and 43 at accuracy 0.34-0.36 for 2400 steps and seed 43 never jumped in 1200-step
# rounds (0.35 / 0.34 / 0.37 after 1200 / 2400 / 3600); at batch 128 seeds 42, 43 and 44 reach 0.996 / 1.0 / 1.0
# after one 400-step round (~21 s each; 2 pairs at batch 32 stay at ~0.5 for 1200 steps). The cpu and quick
# presets curriculum at batch 128 (batch_tokens keeps the long-L batches small); the default preset keeps batch 32
# in 1200-step rounds. A curriculum that ends below the target restarts from a fresh initialisation (torch seed + 1000 * attempt), at most
# CURRICULUM_RESTARTS times; curriculum.json records every attempt's rounds. Every compared model of the seed still
# starts from the one branch point, so the comparison stays paired.
CURRICULUM_RESTARTS = 2
_MQAR_TASK = dict(num_pairs=4, vocab_size=256, num_keys=16, num_values=16, curriculum_len=32, curriculum_target=0.95)
PRESETS = {
    "quick": {  # a small view in <= 10 min on 2 CPU cores: L <= 512 on the masked reference (faster than gather there),
        # short stages (warm-ups end at their 40/60-step caps, short of the plateau: the report says step_cap)
        "seeds": [42, 43, 44], "top_k": 64,
        "lm": dict(seq_lens=[256, 512], **QUICK_WIDTHS, batch_size=4, dense_steps=40, warmup_steps=40, steps=40,
                   learning_rate=3e-3, eval_every=40, eval_windows=16, attention_backend="masked"),
        # the curriculum's batches are batch_size (128) sequences at L=32; at L=256 batch_tokens makes them 16
        "mqar": dict(seq_lens=[256], **_MQAR_WIDTHS, **_MQAR_TASK, batch_size=128, batch_tokens=4096,
                     curriculum_steps=1200, curriculum_round=400, dense_steps=60, warmup_steps=60, steps=60, learning_rate=3e-3,
                     eval_every=60, eval_windows=64, attention_backend="masked"),
    },
    "cpu": {  # the full CPU study: L 256..2048, 3 seeds, both tasks (resumable; run it in the background)
        # measured on 2 cores at L=2048, batch 4: dense 0.55 s/step, dsa 0.87, local 0.57, random 0.74;
        # mqar batches hold batch_tokens tokens (8 sequences at 256 ... 2 at 1024 and 2048) so a step costs about the same
        "seeds": [42, 43, 44], "top_k": 64,
        # warm-up caps of 600: the plateau rule (TrainConfig.warmup_until_plateau), not the cap, should end them
        # (measured on main: MQAR L=1024 plateaus from ~300 steps; the quick sweep at L=256 stopped at 380)
        "lm": dict(seq_lens=[256, 512, 1024, 2048], **QUICK_WIDTHS, batch_size=4, dense_steps=120, warmup_steps=600,
                   steps=100, learning_rate=3e-3, eval_every=50, eval_windows=16),
        "mqar": dict(seq_lens=[256, 512, 1024, 2048], **_MQAR_WIDTHS, **_MQAR_TASK, batch_size=128, batch_tokens=2048,
                     curriculum_steps=2400, curriculum_round=400, dense_steps=80, warmup_steps=600, steps=80, learning_rate=3e-3,
                     eval_every=100, eval_windows=128),
    },
    "default": {  # the GPU-box preset: the research plan's widths, L up to 8192
        "seeds": [42, 43, 44], "top_k": 256,
        "lm": dict(seq_lens=[1024, 2048, 4096, 8192], d_model=256, n_heads=8, n_layers=4, d_ff=512, num_experts=4,
                   expert_top_k=2, indexer_heads=4, indexer_dim=64, indexer_rope_dim=32, batch_size=8,
                   dense_steps=1000, warmup_steps=1000, steps=1000, learning_rate=1e-3, eval_every=250,
                   eval_windows=32),
        "mqar": dict(seq_lens=[1024, 2048, 4096, 8192], **_MQAR_WIDTHS, **_MQAR_TASK, batch_size=32,
                     curriculum_steps=3000, curriculum_round=1200, dense_steps=500, warmup_steps=1000, steps=500, learning_rate=3e-3,
                     eval_every=250, eval_windows=256),
    },
}
_TASK_KEYS = ("num_pairs", "num_keys", "num_values", "curriculum_len", "curriculum_steps", "curriculum_round",
              "curriculum_target", "batch_tokens", "seq_lens")


@dataclasses.dataclass
class TaskSettings:
    options: dict  # task options (seq_lens, MQAR's pairs/vocab/curriculum)
    model: ModelConfig
    train: TrainConfig
    seeds: list[int]
    levers: dict = dataclasses.field(default_factory=dict)  # dsa_levers' ModelConfig fields (lever_settings)


def task_settings(preset: str, task: str, overrides: dict) -> TaskSettings:
    """One task's settings: the preset's, then `overrides` (CONFIG keys and CLI flags)."""
    presets = {name: {**p[task], "seeds": p["seeds"], "top_k": p["top_k"]} for name, p in PRESETS.items()}
    overrides = dict(overrides)
    lever_names = overrides.pop("levers", None)  # dsa_levers' levers (not a config key)
    merged = experiment.preset_settings(presets, preset, "long_context", overrides)
    options = {k: merged.pop(k) for k in _TASK_KEYS if k in merged}
    top_k = merged.pop("top_k")
    merged.setdefault("attention_backend", "gather")  # the fastest faithful token-level path on CPU and GPU
    model, train, _, exp = build_configs({**merged, "seq_lens": options["seq_lens"], "sparse_top_k": top_k,
                                          "max_seq_len": max(options["seq_lens"])})
    options["vocab_size"] = model.vocab_size
    ladder = branch_ladder(presets[preset]["seq_lens"], options["seq_lens"])
    if task == "mqar" and ladder:  # only then: a full-ladder run keeps its fingerprint
        options["branch_ladder"] = ladder
    return TaskSettings(options, model, train, list(exp.seeds), lever_settings(lever_names, task))


def lever_settings(names, task: str) -> dict:
    """`--levers` names (None: the task's DEFAULT_LEVERS) -> dsa_levers' ModelConfig fields."""
    out = {}
    for name in names or DEFAULT_LEVERS[task]:
        if name not in LEVERS:
            raise ValueError(f"--levers {name!r} is not a lever of the long-context study's models; choose from "
                             f"{', '.join(LEVERS)}")
        out.update(LEVERS[name])
    return out


# ----------------------------------------------------------------------------- one (task, L, seed)
def model_config(base: ModelConfig, name: str, levers: dict | None = None) -> ModelConfig:
    """The config of one compared model (dense uses the classic model; the rest the sparse one)."""
    if name == "dsa_levers":
        return dataclasses.replace(base, **(levers or {}))
    if name in ("local", "random", "oracle"):
        return dataclasses.replace(base, selection_source=name)
    if name == "block":
        return dataclasses.replace(base, attention_backend="block")
    return base


def mqar_curriculum(cfg: ModelConfig, tcfg: TrainConfig, options: dict, seed: int, device, folder: Path,
                    fingerprint_: str, run: Execution = Execution()) -> dict:
    """The MQAR curriculum of one seed (shared by every length): dense training at L = curriculum_len in rounds
    of curriculum_round steps until the held-out answer accuracy reaches curriculum_target or curriculum_steps
    have run (then a fresh initialisation, up to CURRICULUM_RESTARTS times). Cached as folder/curriculum.pt +
    curriculum.json (with the accuracy after every round of every attempt)."""
    def compute():
        state, rounds = _curriculum(cfg, tcfg, options, seed, device, run)
        return state, {"seed": seed, "curriculum_len": options["curriculum_len"], "rounds": rounds}
    return experiment.cached_state(folder / "curriculum.pt", fingerprint_, compute, device)


def _curriculum(cfg: ModelConfig, tcfg: TrainConfig, options: dict, seed: int, device, run: Execution):
    """-> (the curriculum's final state, its rounds: attempt, steps so far, held-out accuracy)."""
    from models import ClassicAttentionMoELLM
    short = options["curriculum_len"]
    short_cfg = dataclasses.replace(cfg, max_seq_len=short)
    short_task = MQARTask(options, short, tcfg)
    stream, rounds = short_task.stream(seed, STREAM_CURRICULUM), []
    target = options.get("curriculum_target", 1.0)
    for attempt in range(CURRICULUM_RESTARTS + 1):
        torch.manual_seed(seed + 1000 * attempt)
        classic, done = ClassicAttentionMoELLM(short_cfg).to(device), 0
        while done < options["curriculum_steps"]:
            steps = min(options.get("curriculum_round") or options["curriculum_steps"], options["curriculum_steps"] - done)
            run_stage(classic, dense_stage(tcfg, steps), stream, short_task.val, tcfg, device,
                      f"mqar seed={seed} curriculum L={short} attempt {attempt} steps {done}-{done + steps}",
                      run=run.named(f"curriculum_{attempt}_{done}"))
            done += steps
            rounds.append({"attempt": attempt, "steps": done,
                           "accuracy": short_task.extra_metrics(classic, device)["accuracy"]})
            if rounds[-1]["accuracy"] >= target:
                break
        if rounds[-1]["accuracy"] >= target:
            break
    return state_of(classic), rounds


def mqar_branch(L: int, seed: int, settings: "TaskSettings", device, folder: Path, fingerprint_: str,
                run: Execution = Execution()) -> dict:
    """The MQAR branch point at length L: dense training from the branch point of the next shorter length of
    the sweep or of its branch_ladder (built first if missing), the shortest from the seed's curriculum (none when
    curriculum_steps=0)."""
    path = folder / f"L{L}" / f"seed{seed}" / "branch.pt"
    if path.exists():
        return load_torch(path, device, fix="delete it (the branch point is retrained)")
    options = settings.options
    cfg = dataclasses.replace(settings.model, max_seq_len=L)
    tcfg = task_train_config(settings.train, options, L)
    shorter = [length for length in options["seq_lens"] + options.get("branch_ladder", []) if length < L]
    if shorter:
        start = mqar_branch(max(shorter), seed, settings, device, folder, fingerprint_, run)
    elif options.get("curriculum_steps"):
        start = mqar_curriculum(cfg, settings.train, options, seed, device, folder / "curriculum" / f"seed{seed}",
                                fingerprint_, run)
    else:
        start = None
    return branch_point(MQARTask(options, L, tcfg), cfg, tcfg, seed, device, path, fingerprint_, start, run)


def branch_ladder(preset_lens: list[int], seq_lens: list[int]) -> list[int]:
    """The preset's lengths below the longest asked that were not asked: MQAR's dense stage climbs through them too
    (unevaluated), so `--seq-lens 2048` alone gets the branch the full sweep builds. Jumping from the curriculum's
    L 32 straight to 2048 left the cpu preset's dense model at accuracy 0.32 (seed 42; through 256 / 512 / 1024:
    0.83), and every comparison against it meaningless."""
    return sorted(length for length in preset_lens if length < max(seq_lens) and length not in seq_lens)


def task_train_config(tcfg: TrainConfig, options: dict, L: int) -> TrainConfig:
    """MQAR with `batch_tokens`: batches of about batch_tokens tokens at every length (2 .. batch_size sequences)."""
    if not options.get("batch_tokens"):
        return tcfg
    return dataclasses.replace(tcfg, batch_size=min(tcfg.batch_size, max(2, options["batch_tokens"] // L)))


def train_compared_model(name: str, task, cfg: ModelConfig, tcfg: TrainConfig, branch: dict, seed: int, device,
                         run: Execution = Execution(), levers: dict | None = None) -> dict:
    """Warm up (DSA variants with an indexer) and train one compared model from the branch point, then measure
    recall by distance and the task's metrics -> {"final", "curves", "warmup"}: stage 2 uses the seed's
    stream 1 (the same batches for every model). `run`: precision, compile, checkpoints ('warmup', 'train')."""
    desc = f"{task.name} L={cfg.max_seq_len} seed={seed} {name}"
    if name == "dense":
        model = classic_from_state(cfg, branch, seed).to(device)
        stage, warmup = dense_stage(tcfg), None
    else:
        model = sparse_from_state(model_config(cfg, name, levers), branch, seed).to(device)
        if name in ("local", "random", "oracle"):  # no indexer: no warm-up, no KL
            stage = dataclasses.replace(sparse_stage(tcfg), mode=AttentionMode(sparse=True), indexer_lr=None)
            warmup = None
        else:
            stage = sparse_stage(tcfg)
            warmup = warmup_indexer(model, task.stream(seed, STREAM_WARMUP), task.val, tcfg, device,
                                    desc + " indexer warm-up", run=run.named("warmup"))
    result = run_stage(model, stage, task.stream(seed, STREAM_TRAIN), task.val, tcfg, device, desc,
                       run=run.named("train"))
    final = result["final"]
    if name != "dense":  # recall by distance (and per layer) on the held-out set, with the trained selection
        stats = evaluate(model, task.val, tcfg.batch_size, device, recall=True)
        final["recall_by_distance"] = stats["recall_by_distance"]
        final.update(oracle_recall=stats["oracle_recall"], oracle_recall_by_distance=stats["oracle_recall_by_distance"],
                     recall_share_of_oracle=stats["indexer_recall"] / stats["oracle_recall"],  # the same evaluation
                     recall_share_of_oracle_by_distance=[r / o if o > 0 else math.nan for r, o in zip(
                         stats["recall_by_distance"], stats["oracle_recall_by_distance"])])
    final.update(task.extra_metrics(model, device))
    return {"final": final, "curves": result["curves"], "warmup": warmup}


# ----------------------------------------------------------------------------- the experiment
def check_models(tasks: list[str], models: list[str]) -> list[str]:
    """The asked models, dense first when missing (every difference is paired against it)."""
    bad = [t for t in tasks if t not in TASKS] + [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"unknown task/model {bad}; tasks: {', '.join(TASKS)}; models: {', '.join(MODELS)}")
    return models if "dense" in models else ["dense", *models]


def run_long_context(preset: str, tasks: list[str], models: list[str], overrides: dict, out: Path,
                     overwrite: bool, run: Execution = Execution()) -> dict:
    """Every (task, L, seed, model) run (read back when finished), then summary.json, plots, REPORT.md. `run`:
    precision, compile, and resume checkpoints (records/<task>/L<L>/seed<S>/resume/<model>/)."""
    models = check_models(tasks, models)
    settings = {t: task_settings(preset, t, overrides) for t in tasks}
    if "dsa_levers" in models:  # a lever the model cannot take: refused before any work
        for st in settings.values():
            model_config(st.model, "dsa_levers", st.levers).validate()
    device, run = experiment.prepare(settings[tasks[0]].train.device, run,
                                     [st.model.attention_backend for st in settings.values()],
                                     [st.train.batch_size for st in settings.values()])
    corpus = None
    if "lm" in tasks:
        data_keys = {f.name for f in dataclasses.fields(DataConfig)}
        with distributed.main_first():  # rank 0 builds the caches, the others read them
            corpus = load_corpus(DataConfig(**{k: v for k, v in overrides.items() if k in data_keys}))
        settings["lm"].model = dataclasses.replace(settings["lm"].model, vocab_size=corpus.tokenizer.vocab_size)
    keyed = {t: experiment.config_key({"options": st.options, "model": fingerprint_fields(st.model),
                                       "train": dataclasses.asdict(st.train), "seeds": st.seeds,
                                       "corpus": corpus.describe() if t == "lm" else None,
                                       **({"levers": st.levers} if "dsa_levers" in models else {})}, device, run)
             for t, st in settings.items()}
    expected = {p: keyed[t][1] for t in tasks for p in sorted((out / "records" / t).glob("*/*/*.json"))}
    experiment.clear_stale(out, expected, overwrite,
                           folder_of=lambda record: record.parent)  # (task, L, seed): its runs and branch point
    started = time.perf_counter()
    records: dict = {}
    jobs = [(t, L, s) for t in tasks for L in sorted(settings[t].options["seq_lens"]) for s in settings[t].seeds]
    for task_name, L, seed in tqdm(jobs, desc="long context (task, L, seed)"):
        by_model = run_group(task_name, L, seed, models, settings, corpus, keyed[task_name], out, overwrite, run,
                             device)
        for name, record in by_model.items():
            records.setdefault(task_name, {}).setdefault(L, {}).setdefault(name, {})[seed] = record
    if not distributed.is_main():  # the others trained in lockstep; rank 0 summarises, plots and reports
        return {}
    summary = {**experiment.summary_head("long_context", {t: keyed[t][0] for t in tasks},
                                         {t: settings[t].seeds for t in tasks}, device, started),
               **summarise(records, settings, models)}
    if "dsa_levers" in models:  # dsa_levers' ModelConfig lever fields (the same for every task)
        summary["levers"] = settings[tasks[0]].levers
    curricula = sorted((out / "records" / "mqar" / "curriculum").glob("seed*/curriculum.json"))
    if "mqar" in tasks and curricula:
        summary["mqar_curriculum"] = {c.parent.name: read_json(c)["rounds"] for c in curricula}
    return experiment.finish(out, summary, lambda s: figures(s, models, out),
                             lambda s: reports.long_context_report(s, models),
                             lambda s: reports.long_context_tables(s, models))


def run_group(task_name: str, L: int, seed: int, models: list[str], settings: dict, corpus, keyed: tuple, out: Path,
              overwrite: bool, run: Execution, device) -> dict:
    """Every model of one (task, L, seed) from its branch point (trained only when a model is still to run)
    -> {model: its record}."""
    options, (config, key) = settings[task_name].options, keyed
    tcfg = task_train_config(settings[task_name].train, options, L)
    cfg = dataclasses.replace(settings[task_name].model, max_seq_len=L)
    folder = out / "records" / task_name / f"L{L}" / f"seed{seed}"
    task = branch = None
    if any(not (folder / f"{m}.json").exists() for m in models):
        task = LMTask(corpus, L, tcfg) if task_name == "lm" else MQARTask(options, L, tcfg)
        with experiment.checkpointing(run, folder / "resume" / "branch", key, overwrite) as branch_run:
            if task_name == "mqar":
                branch = mqar_branch(L, seed, settings["mqar"], device, out / "records" / "mqar", key, branch_run)
            else:
                branch = branch_point(task, cfg, tcfg, seed, device, folder / "branch.pt", key, run=branch_run)
    labels = {"task": task_name, "seq_len": L, "seed": seed, "batch_size": tcfg.batch_size}
    return {name: experiment.run_record(folder / f"{name}.json", key, {**labels, "model": name},
                                        lambda this_run, name=name: train_compared_model(
                                            name, task, cfg, tcfg, branch, seed, device, run=this_run,
                                            levers=settings[task_name].levers),
                                        run, folder / "resume" / name, overwrite, config, device)
            for name in models}


def figures(summary: dict, models: list[str], out: Path) -> list[str]:
    """long_context.png; warmup_kl.png when DSA warmed up; mqar_accuracy_by_distance.png when MQAR ran."""
    from dsa_lab.experiments import plots
    plots.long_context(summary, models, out / "long_context.png")
    written = ["long_context.png"] + (["warmup_kl.png"] if plots.warmup_curves(summary, out / "warmup_kl.png") else [])
    if "mqar" in summary["results"]:
        plots.mqar_accuracy_by_distance(summary, models, out / "mqar_accuracy_by_distance.png")
        written.append("mqar_accuracy_by_distance.png")
    return written


METRICS = ("val_loss", "val_accuracy", "avg_time_per_step", "tokens_per_s", "model_flops_utilization", "indexer_recall",
           "random_recall", "local_recall", "mean_selected_keys", "accuracy", "peak_memory_mb", "process_peak_rss_mb",
           "oracle_recall", "recall_share_of_oracle")
QUALITY = {"lm": "val_loss", "mqar": "accuracy"}  # each task's quality metric (its paired tests compare it)


def summarise(records: dict, settings: dict, models: list[str]) -> dict:
    """Per task, L and model: every metric as mean ± 95 % CI over seeds and the paired differences vs dense (dsa also
    vs oracle); per task the paired tests of every model against dense and of dsa against oracle at every L on the
    task's quality metric (Holm over all of them)."""
    results, significance = {}, {}
    for task_name, by_L in records.items():
        seeds, top_k = settings[task_name].seeds, settings[task_name].model.sparse_top_k
        results[task_name] = {str(L): {"top_k": top_k, "kept_pair_fraction": kept_pair_fraction(L, top_k),
                                       **{name: model_metrics(task_name, by_model, name, seeds) for name in models}}
                              for L, by_model in sorted(by_L.items())}
        quality = QUALITY[task_name]
        pairs = [(name, "dense") for name in models if name != "dense"] + [
            (name, vs) for name in INDEXED for vs in ("oracle", "dsa")  # the indexer's own loss; the levers' effect
            if name != vs and {name, vs} <= set(models)]
        significance[task_name] = experiment.significance([
            {"L": int(L), "model": name, "vs": vs, "metric": quality, "lower_is_better": quality == "val_loss",
             "differences": entry[name][f"delta_{quality}_vs_{vs}"]["per_seed"]}
            for L, entry in results[task_name].items() for name, vs in pairs])
    return {"results": results, "significance": significance}


def model_metrics(task_name: str, by_model: dict, name: str, seeds: list[int]) -> dict:
    """One model at one (task, L): its metrics over seeds, paired differences vs dense, by-distance curves."""
    finals = [by_model[name][s]["final"] for s in seeds]
    metrics = {m: mean_ci95([f.get(m) for f in finals]) for m in METRICS if finals[0].get(m) is not None}
    quality = ("val_loss", "accuracy") if task_name == "mqar" else ("val_loss",)
    metrics.update(experiment.paired_differences(finals, [by_model["dense"][s]["final"] for s in seeds], "dense",
                                                 metrics=quality))
    for vs in ("oracle", "dsa"):  # what the indexer loses against the best shared set at k; what the levers change
        if name in INDEXED and name != vs and vs in by_model:
            metrics.update(experiment.paired_differences(finals, [by_model[vs][s]["final"] for s in seeds], vs,
                                                         metrics=quality, time=None))
    if task_name == "mqar":
        metrics["accuracy_by_distance"] = _mean_by_key([f["accuracy_by_distance"] for f in finals])
        if all("answer_hits" in f for f in finals):
            metrics["answer_hits"] = _mean_answer_hits([f["answer_hits"] for f in finals])
    for curve in ("recall_by_distance", "oracle_recall_by_distance", "recall_share_of_oracle_by_distance"):
        if curve in finals[0]:  # per distance bucket, mean over seeds
            metrics[curve] = [_nanmean(v) for v in zip(*[f[curve] for f in finals])]
    warm = [by_model[name][s].get("warmup") for s in seeds]
    if warm[0]:
        metrics["warmup_recall_after"] = mean_ci95([w["recall_after"] for w in warm])
        # per seed: the plateau rule ends each seed's warm-up at its own step (a mean over seeds would truncate)
        metrics["warmup_kl_curves"] = {str(s): w["indexer_kl"] for s, w in zip(seeds, warm)}
        metrics["warmup_plateau"] = {str(s): w.get("plateau") for s, w in zip(seeds, warm)}
    return metrics


def _nanmean(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _mean_by_key(dicts: list[dict], field: str | None = "accuracy") -> dict:
    keys = sorted({k for d in dicts for k in d}, key=lambda k: int(k.split("-")[0]))
    return {k: _nanmean([d[k][field] if field else d[k] for d in dicts if k in d]) for k in keys}


def _mean_answer_hits(per_seed: list[list[dict]]) -> list[dict]:
    """mqar.answer_hits of every seed -> per layer: key and value shares as mean ± CI over seeds, value share by
    distance bucket as the mean; the answer accuracy where the value is held / missed as the mean over the seeds
    that have such rows (records from before 2026-12-07 afternoon have neither)."""
    out = []
    for layer in zip(*per_seed):
        hits = {"key": mean_ci95([h["key"] for h in layer]), "value": mean_ci95([h["value"] for h in layer]),
                "value_by_distance": _mean_by_key([h["value_by_distance"] for h in layer], field=None)}
        if all("answered_if_held" in h for h in layer):
            hits.update({k: _nanmean([h[k] for h in layer]) for k in ("answered_if_held", "answered_if_missed")})
        out.append(hits)
    return out
