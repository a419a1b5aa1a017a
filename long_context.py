"""The long-context study: does DSA keep dense quality when k << L, and does the indexer find what matters?

    python run_experiment.py --experiment long_context [--preset quick|cpu|default] [--task lm mqar]
        [--seq-lens ...] [--top-k 64] [--models dense dsa local random block] [--seeds ...]

A fixed budget of k keys per query at every length. Per task, length and seed, every model starts from the
same dense branch point and sees the same batches in the same order:
  dense   the classic model continues dense training
  dsa     token-level DSA: indexer warm-up (dense KL), then sparse training (the paper's two stages)
  local   each query keeps its last k tokens (no indexer)        \\ controls that need no indexer,
  random  k random past tokens, redrawn every step (no indexer)  /  trained the same way
  block   our query-block-shared variant (blocks of queries share one selected set)
Tasks: `lm` (real text, windows inside documents) and `mqar` (multi-query associative recall, mqar.py: a dense
model solves it, a window of k cannot once the pairs sit further back than k).
Writes OUT/summary.json, records/ (one per task, length, seed and model: resumable), long_context.png,
mqar_accuracy_by_distance.png and REPORT.md.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import mqar
import plots
import reports
from config import DataConfig, ModelConfig, TrainConfig, build_configs
from data import BatchStream, build_windows, eval_subset, load_corpus
from results_io import (atomic_save_torch, atomic_write_json, atomic_write_text, check_stale, fingerprint, load_torch,
                        machine_key, mean_ci95, read_json, run_environment)
from sparse_attention import AttentionMode, kept_pair_fraction
import distributed
from train import (Execution, check_backend_device, checkpointed, classic_from_state, dense_stage,
                   discard_checkpoints, evaluate, pick_device, run_stage, sparse_from_state, sparse_stage, warmup_stage)

TASKS = ("lm", "mqar")
MODELS = ("dense", "dsa", "local", "random", "block")
DEFAULT_MODELS = ("dense", "dsa", "local", "random")

# Per preset and task: model widths and an explicit step budget per stage (the same at every length).
# CPU calibration (this 2-core machine): a quick-width classic model at L=1024 takes ~0.55 s per step at batch 8.
_LM_WIDTHS = dict(d_model=64, n_heads=4, n_layers=2, d_ff=128, num_experts=4, expert_top_k=2,
                  indexer_heads=2, indexer_dim=16, indexer_rope_dim=8)
# MQAR (calibrated: d 64 / 2 heads solves 4 pairs after a short-L curriculum; loss on answers only)
_MQAR_WIDTHS = dict(d_model=64, n_heads=2, n_layers=2, d_ff=128, num_experts=1, expert_top_k=1, num_shared_experts=0,
                    indexer_heads=2, indexer_dim=16, indexer_rope_dim=8)
# The curriculum (L=32) runs in rounds until its held-out accuracy reaches `curriculum_target` (at most
# curriculum_steps); it is shared by every length of a seed, and each length's dense stage continues from the
# previous length's branch point (32 -> 256 -> 512 ...), so the longest length gets every shorter one's training.
# Rounds of 1200 steps: with 400-step rounds (a fresh AdamW and lr schedule each) seeds 42 and 43 stayed at
# accuracy 0.34-0.36 for 2400 steps; seed 42 in 1200-step rounds: 0.58 after one round, 1.00 after two.
# Some initialisations never make the jump (seed 43: 0.35 / 0.34 / 0.37 after 1200 / 2400 / 3600 steps): a
# curriculum that ends below the target restarts from a fresh initialisation (torch seed + 1000 * attempt), at most
# CURRICULUM_RESTARTS times; curriculum.json records every attempt's rounds. Every compared model of the seed still
# starts from the one branch point, so the comparison stays paired.
CURRICULUM_RESTARTS = 2
_MQAR_TASK = dict(num_pairs=4, vocab_size=256, num_keys=16, num_values=16, curriculum_len=32, curriculum_round=1200,
                  curriculum_target=0.95)
PRESETS = {
    "quick": {  # a small view, <= 20 min on 2 CPU cores
        "seeds": [42, 43, 44], "top_k": 64,
        "lm": dict(seq_lens=[256, 1024], **_LM_WIDTHS, batch_size=4, dense_steps=60, warmup_steps=40, steps=60,
                   learning_rate=3e-3, eval_every=60, eval_windows=16),
        "mqar": dict(seq_lens=[256], **_MQAR_WIDTHS, **_MQAR_TASK, batch_size=32, curriculum_steps=2400,
                     dense_steps=100, warmup_steps=60, steps=100, learning_rate=3e-3, eval_every=100,
                     eval_windows=128),
    },
    "cpu": {  # the full CPU study: L 256..2048, 3 seeds, both tasks (resumable; run it in the background)
        # measured on 2 cores at L=2048, batch 4: dense 0.55 s/step, dsa 0.87, local 0.57, random 0.74;
        # mqar batches hold batch_tokens tokens (8 sequences at 256 ... 2 at 1024 and 2048) so a step costs about the same
        "seeds": [42, 43, 44], "top_k": 64,
        "lm": dict(seq_lens=[256, 512, 1024, 2048], **_LM_WIDTHS, batch_size=4, dense_steps=120, warmup_steps=60,
                   steps=100, learning_rate=3e-3, eval_every=50, eval_windows=16),
        "mqar": dict(seq_lens=[256, 512, 1024, 2048], **_MQAR_WIDTHS, **_MQAR_TASK, batch_size=32, batch_tokens=2048,
                     curriculum_steps=3600, dense_steps=80, warmup_steps=40, steps=80, learning_rate=3e-3,
                     eval_every=100, eval_windows=128),
    },
    "default": {  # the GPU-box preset: the research plan's widths, L up to 8192
        "seeds": [42, 43, 44], "top_k": 256,
        "lm": dict(seq_lens=[1024, 2048, 4096, 8192], d_model=256, n_heads=8, n_layers=4, d_ff=512, num_experts=4,
                   expert_top_k=2, indexer_heads=4, indexer_dim=64, indexer_rope_dim=32, batch_size=8,
                   dense_steps=1000, warmup_steps=300, steps=1000, learning_rate=1e-3, eval_every=250,
                   eval_windows=32),
        "mqar": dict(seq_lens=[1024, 2048, 4096, 8192], **_MQAR_WIDTHS, **_MQAR_TASK, batch_size=32,
                     curriculum_steps=3000, dense_steps=500, warmup_steps=200, steps=500, learning_rate=3e-3,
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


def task_settings(preset: str, task: str, overrides: dict) -> TaskSettings:
    """One task's settings: the preset's, then `overrides` (CONFIG keys and CLI flags)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is unknown for long_context; choose one of {', '.join(PRESETS)}")
    merged = {**PRESETS[preset][task], "seeds": PRESETS[preset]["seeds"], **overrides}
    options = {k: merged.pop(k) for k in _TASK_KEYS if k in merged}
    top_k = merged.pop("top_k", PRESETS[preset]["top_k"])
    merged.setdefault("attention_backend", "gather")  # the fastest faithful token-level path on CPU and GPU
    model, train, _, exp = build_configs({**merged, "seq_lens": options["seq_lens"], "sparse_top_k": top_k,
                                          "max_seq_len": max(options["seq_lens"])})
    options["vocab_size"] = model.vocab_size
    return TaskSettings(options, model, train, list(exp.seeds))


# ----------------------------------------------------------------------------- tasks
class TaskStream:
    """MQAR batches as the trainer wants them: next() -> inputs (B, L), targets (B, L) (-100 = not scored)."""

    def __init__(self, stream: mqar.MQARStream):
        self.stream, self.step = stream, 0

    def next(self):
        batch = self.stream.batch(self.step)
        self.step += 1
        return batch.inputs, batch.targets

    def state_dict(self) -> dict:
        return {"step": self.step}  # a batch is a pure function of (seed, step)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class LMTask:
    name = "lm"

    def __init__(self, corpus, L: int, tcfg: TrainConfig):
        self.windows = build_windows(corpus, L)
        self.val = eval_subset(self.windows.val, tcfg.eval_windows)
        self.batch_size = tcfg.batch_size

    def stream(self, seed: int, purpose: int):
        return BatchStream(self.windows.train, self.batch_size, seed * 1000 + purpose)

    def extra_metrics(self, model, device) -> dict:
        return {}


class MQARTask:
    name = "mqar"

    def __init__(self, options: dict, L: int, tcfg: TrainConfig):
        self.options = {k: options[k] for k in ("num_keys", "num_values") if k in options}
        self.pairs, self.vocab, self.L, self.batch_size = options["num_pairs"], options["vocab_size"], L, tcfg.batch_size
        held = mqar.MQARStream(L, self.pairs, self.vocab, tcfg.batch_size, seed=0, **self.options).held_out(
            tcfg.eval_windows)
        self.held_out = held
        self.val = (held.inputs, held.targets)

    def stream(self, seed: int, purpose: int, L: int | None = None):
        return TaskStream(mqar.MQARStream(L or self.L, self.pairs, self.vocab, self.batch_size,
                                          seed=seed * 1000 + purpose, **self.options))

    @torch.no_grad()
    def extra_metrics(self, model, device) -> dict:
        """Accuracy by query-key distance on the held-out set."""
        model.eval()
        logits = torch.cat([model(self.held_out.inputs[i: i + 32].to(device)).float().cpu()
                            for i in range(0, len(self.held_out), 32)])
        result = mqar.accuracy(logits, self.held_out)
        return {"accuracy": result["accuracy"], "accuracy_by_distance": result["by_distance"]}


# ----------------------------------------------------------------------------- one (task, L, seed)
def model_config(base: ModelConfig, name: str) -> ModelConfig:
    """The config of one compared model (dense uses the classic model; the rest the sparse one)."""
    if name == "local" or name == "random":
        return dataclasses.replace(base, selection_source=name)
    if name == "block":
        return dataclasses.replace(base, attention_backend="block")
    return base


def branch_point(task, cfg: ModelConfig, tcfg: TrainConfig, seed: int, device, path: Path, fingerprint_: str,
                 start: dict | None = None, run: Execution = Execution()) -> dict:
    """Stage 0, shared by every model of this (task, L, seed): dense training of the classic model, from `start`
    (MQAR: the curriculum, or the previous length's branch point) or from scratch. Cached in `path` so a
    resumed run branches from the same weights (branch.json beside it carries the config fingerprint, so a
    branch point left by a killed run with another config is found stale); `run` may checkpoint it on the way."""
    if path.exists():
        return load_torch(path, device, fix="delete it (the branch point is retrained)")
    from models import ClassicAttentionMoELLM
    torch.manual_seed(seed)
    classic = ClassicAttentionMoELLM(cfg).to(device)
    if start is not None:
        classic.load_state_dict(start)
    if tcfg.dense_steps:
        run_stage(classic, dense_stage(tcfg, tcfg.dense_steps), task.stream(seed, 3), task.val, tcfg, device,
                  f"{task.name} L={cfg.max_seq_len} seed={seed} dense pre-training",
                  run=run.named(f"pretrain_L{cfg.max_seq_len}"))
    state = {k: v.detach().clone() for k, v in classic.state_dict().items()}
    atomic_save_torch(state, path)
    atomic_write_json(path.with_suffix(".json"), {"config_fingerprint": fingerprint_, "seed": seed})
    return state


def mqar_curriculum(cfg: ModelConfig, tcfg: TrainConfig, options: dict, seed: int, device, folder: Path,
                    fingerprint_: str, run: Execution = Execution()) -> dict:
    """The MQAR curriculum of one seed (shared by every length): dense training at L = curriculum_len in rounds
    of curriculum_round steps until the held-out answer accuracy reaches curriculum_target or curriculum_steps
    have run (then a fresh initialisation, up to CURRICULUM_RESTARTS times). Cached in `folder` (curriculum.pt +
    curriculum.json with the accuracy after every round of every attempt)."""
    if (folder / "curriculum.pt").exists() and (folder / "curriculum.json").exists():
        return load_torch(folder / "curriculum.pt", device, fix="delete it (the curriculum is retrained)")
    from models import ClassicAttentionMoELLM
    short = options["curriculum_len"]
    short_cfg = dataclasses.replace(cfg, max_seq_len=short)
    short_task = MQARTask(options, short, tcfg)
    stream, rounds = short_task.stream(seed, 4), []
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
            if rounds[-1]["accuracy"] >= options.get("curriculum_target", 1.0):
                break
        if rounds[-1]["accuracy"] >= options.get("curriculum_target", 1.0):
            break
    state = {k: v.detach().clone() for k, v in classic.state_dict().items()}
    atomic_save_torch(state, folder / "curriculum.pt")
    atomic_write_json(folder / "curriculum.json", {"config_fingerprint": fingerprint_, "seed": seed,
                                                   "curriculum_len": short, "rounds": rounds})
    return state


def mqar_branch(L: int, seed: int, settings: "TaskSettings", device, folder: Path, fingerprint_: str,
                run: Execution = Execution()) -> dict:
    """The MQAR branch point at length L: dense training from the branch point of the next shorter length of
    the sweep (built first if missing), the shortest from the seed's curriculum (none when curriculum_steps=0)."""
    path = folder / f"L{L}" / f"seed{seed}" / "branch.pt"
    if path.exists():
        return load_torch(path, device, fix="delete it (the branch point is retrained)")
    options = settings.options
    cfg = dataclasses.replace(settings.model, max_seq_len=L)
    tcfg = task_train_config(settings.train, options, L)
    shorter = [length for length in options["seq_lens"] if length < L]
    if shorter:
        start = mqar_branch(max(shorter), seed, settings, device, folder, fingerprint_, run)
    elif options.get("curriculum_steps"):
        start = mqar_curriculum(cfg, settings.train, options, seed, device, folder / "curriculum" / f"seed{seed}",
                                fingerprint_, run)
    else:
        start = None
    return branch_point(MQARTask(options, L, tcfg), cfg, tcfg, seed, device, path, fingerprint_, start, run)


def task_train_config(tcfg: TrainConfig, options: dict, L: int) -> TrainConfig:
    """MQAR with `batch_tokens`: batches of about batch_tokens tokens at every length (2 .. batch_size sequences)."""
    if not options.get("batch_tokens"):
        return tcfg
    return dataclasses.replace(tcfg, batch_size=min(tcfg.batch_size, max(2, options["batch_tokens"] // L)))


def train_model(name: str, task, cfg: ModelConfig, tcfg: TrainConfig, branch: dict, seed: int, device,
                run: Execution = Execution()) -> dict:
    """One compared model from the branch point -> {"final", "curves", "warmup"}: stage 2 uses the seed's
    stream 1 (the same batches for every model). `run`: precision, compile, checkpoints ('warmup', 'train')."""
    desc = f"{task.name} L={cfg.max_seq_len} seed={seed} {name}"
    if name == "dense":
        model = classic_from_state(cfg, branch, seed).to(device)
        stage, warmup = dense_stage(tcfg), None
    else:
        model = sparse_from_state(model_config(cfg, name), branch, seed).to(device)
        if name in ("local", "random"):  # no indexer: no warm-up, no KL
            stage = dataclasses.replace(sparse_stage(tcfg), mode=AttentionMode(sparse=True), indexer_lr=None)
            warmup = None
        else:
            stage = sparse_stage(tcfg)
            warm = run_stage(model, warmup_stage(tcfg), task.stream(seed, 2), task.val, tcfg, device,
                             desc + " indexer warm-up", run=run.named("warmup"))
            warmup = {"indexer_kl": warm["step_indexer_kl"], "recall_before": warm["before"]["indexer_recall"],
                      "recall_after": warm["final"]["indexer_recall"], "random_recall": warm["final"]["random_recall"],
                      "local_recall": warm["final"]["local_recall"]}
    result = run_stage(model, stage, task.stream(seed, 1), task.val, tcfg, device, desc, run=run.named("train"))
    final = result["final"]
    if name != "dense":  # recall by distance (and per layer) on the held-out set, with the trained selection
        stats = evaluate(model, task.val, tcfg.batch_size, device, recall=True)
        final["recall_by_distance"] = stats["recall_by_distance"]
    final.update(task.extra_metrics(model, device))
    return {"final": final, "curves": result["curves"], "warmup": warmup}


# ----------------------------------------------------------------------------- the experiment
def run_long_context(preset: str, tasks: list[str], models: list[str], overrides: dict, out: Path,
                     overwrite: bool, run: Execution = Execution()) -> dict:
    """Every (task, L, seed, model) run (read back when finished), then summary.json, plots, REPORT.md. `run`:
    precision, compile, and resume checkpoints (records/<task>/L<L>/seed<S>/resume/<model>/)."""
    bad = [t for t in tasks if t not in TASKS] + [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"unknown task/model {bad}; tasks: {', '.join(TASKS)}; models: {', '.join(MODELS)}")
    if "dense" not in models:
        models = ["dense", *models]  # every difference is paired against it
    settings = {t: task_settings(preset, t, overrides) for t in tasks}
    device = pick_device(settings[tasks[0]].train.device)
    for task_settings_ in settings.values():
        check_backend_device(task_settings_.model.attention_backend, device)
        distributed.check_batch(task_settings_.train.batch_size)
    run.validate(device)
    if "lm" in tasks:
        data_keys = {f.name for f in dataclasses.fields(DataConfig)}
        with distributed.main_first():  # rank 0 builds the caches, the others read them
            corpus = load_corpus(DataConfig(**{k: v for k, v in overrides.items() if k in data_keys}))
        settings["lm"].model = dataclasses.replace(settings["lm"].model, vocab_size=corpus.tokenizer.vocab_size)
    config_key = {t: {"options": st.options, "model": dataclasses.asdict(st.model), "train": dataclasses.asdict(st.train),
                      "seeds": st.seeds, **machine_key(device),
                      "corpus": corpus.describe() if t == "lm" else None}
                  for t, st in settings.items()}
    if run.dtype != "fp32":  # a bf16 run is not an fp32 run (fp32 keeps the fingerprints runs on disk carry)
        for key in config_key.values():
            key["dtype"] = run.dtype
    expected = {}
    for t in tasks:
        key = fingerprint(config_key[t])
        expected.update({p: key for p in sorted((out / "records" / t).glob("*/*/*.json"))})
    with distributed.main_first():  # rank 0 clears stale runs before the others look
        for stale in check_stale(out, expected, overwrite):
            if distributed.is_main():
                shutil.rmtree(stale.parent, ignore_errors=True)  # that (task, L, seed) folder: runs, branch point
    t0 = time.perf_counter()
    records: dict = {}
    jobs = [(t, L, s) for t in tasks for L in sorted(settings[t].options["seq_lens"]) for s in settings[t].seeds]
    for task_name, L, seed in tqdm(jobs, desc="long context (task, L, seed)"):
        options = settings[task_name].options
        tcfg = task_train_config(settings[task_name].train, options, L)
        cfg = dataclasses.replace(settings[task_name].model, max_seq_len=L)
        folder = out / "records" / task_name / f"L{L}" / f"seed{seed}"
        todo = [m for m in models if not (folder / f"{m}.json").exists()]
        if todo:
            task = LMTask(corpus, L, tcfg) if task_name == "lm" else MQARTask(options, L, tcfg)
            key = fingerprint(config_key[task_name])
            branch_run = checkpointed(run, folder / "resume" / "branch", key, overwrite)
            if task_name == "mqar":
                branch = mqar_branch(L, seed, settings["mqar"], device, out / "records" / "mqar", key, branch_run)
            else:
                branch = branch_point(task, cfg, tcfg, seed, device, folder / "branch.pt", key, run=branch_run)
            discard_checkpoints(branch_run)
            for name in todo:
                started = time.perf_counter()
                model_run = checkpointed(run, folder / "resume" / name, key, overwrite)
                result = train_model(name, task, cfg, tcfg, branch, seed, device, run=model_run)
                atomic_write_json(folder / f"{name}.json", {"config_fingerprint": fingerprint(config_key[task_name]),
                                                            "task": task_name, "seq_len": L, "seed": seed,
                                                            "batch_size": tcfg.batch_size, "model": name, **result,
                                                            "wall_time_s": time.perf_counter() - started,
                                                            "config": config_key[task_name],
                                                            "environment": run_environment(device)})
                discard_checkpoints(model_run)
            distributed.barrier()  # the others read what rank 0 wrote
        for name in models:
            records.setdefault(task_name, {}).setdefault(L, {}).setdefault(name, {})[seed] = \
                read_json(folder / f"{name}.json")
    if not distributed.is_main():  # the others trained in lockstep; rank 0 summarises, plots and reports
        return {}
    summary = summarise(records, settings, models, config_key)
    curricula = sorted((out / "records" / "mqar" / "curriculum").glob("seed*/curriculum.json"))
    if "mqar" in tasks and curricula:
        summary["mqar_curriculum"] = {c.parent.name: read_json(c)["rounds"] for c in curricula}
    summary["wall_time_s"] = time.perf_counter() - t0
    summary["environment"] = run_environment(device)
    atomic_write_json(out / "summary.json", summary)
    summary = read_json(out / "summary.json")
    plots.long_context(summary, models, out / "long_context.png")
    if "mqar" in summary["results"]:
        plots.mqar_accuracy_by_distance(summary, models, out / "mqar_accuracy_by_distance.png")
    atomic_write_text(out / "REPORT.md", reports.long_context_report(summary, models))
    print("\n" + reports.long_context_tables(summary, models))
    print(f"\nwrote {out}/summary.json, long_context.png, REPORT.md")
    return summary


METRICS = ("val_loss", "val_accuracy", "avg_time_per_step", "tokens_per_s", "model_flops_utilization", "indexer_recall",
           "random_recall", "local_recall", "mean_selected_keys", "accuracy", "peak_memory_mb", "process_peak_rss_mb")


def summarise(records: dict, settings: dict, models: list[str], config_key: dict) -> dict:
    """Per task, L and model: every metric as mean ± 95 % CI over seeds, and paired differences vs dense."""
    results = {}
    for task_name, by_L in records.items():
        seeds, top_k = settings[task_name].seeds, settings[task_name].model.sparse_top_k
        results[task_name] = {}
        for L, by_model in sorted(by_L.items()):
            entry = {"top_k": top_k, "kept_pair_fraction": kept_pair_fraction(L, top_k)}
            dense = [by_model["dense"][s]["final"] for s in seeds]
            for name in models:
                finals = [by_model[name][s]["final"] for s in seeds]
                metrics = {m: mean_ci95([f.get(m) for f in finals]) for m in METRICS if finals[0].get(m) is not None}
                metrics["delta_val_loss_vs_dense"] = mean_ci95([f["val_loss"] - d["val_loss"] for f, d in zip(finals, dense)])
                if task_name == "mqar":
                    metrics["delta_accuracy_vs_dense"] = mean_ci95([f["accuracy"] - d["accuracy"]
                                                                    for f, d in zip(finals, dense)])
                    metrics["accuracy_by_distance"] = _mean_by_key([f["accuracy_by_distance"] for f in finals])
                if "recall_by_distance" in finals[0]:
                    metrics["recall_by_distance"] = [_nanmean(v) for v in zip(*[f["recall_by_distance"] for f in finals])]
                warm = [by_model[name][s].get("warmup") for s in seeds]
                if warm[0]:
                    metrics["warmup_recall_after"] = mean_ci95([w["recall_after"] for w in warm])
                    metrics["warmup_kl_curve"] = [_nanmean(v) for v in zip(*[w["indexer_kl"] for w in warm])]
                entry[name] = metrics
            results[task_name][str(L)] = entry
    return {"experiment": "long_context", "config": config_key, "seeds": {t: settings[t].seeds for t in records},
            "results": results}


def _nanmean(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _mean_by_key(dicts: list[dict]) -> dict:
    keys = sorted({k for d in dicts for k in d}, key=lambda k: int(k.split("-")[0]))
    return {k: _nanmean([d[k]["accuracy"] for d in dicts if k in d]) for k in keys}
