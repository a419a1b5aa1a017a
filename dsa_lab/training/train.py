"""Two-stage DSA training (DeepSeek-V3.2-Exp), the classic baseline, evaluation, timing, checkpoints.

Stage 1 (dense warm-up): main model frozen, dense attention, only the indexers train on
KL(p || softmax(I)) at lr `warmup_lr`. Stage 2 (sparse): everything trains; the main model sees only
the LM loss, each indexer only its sparse KL (its input is detached), in its own param group.
The classic baseline starts from the same shared weights and sees the same batches in the same order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import resource
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dsa_lab.common import distributed
from config import ModelConfig, TrainConfig
from dsa_lab.training.data import STREAM_PRETRAIN, STREAM_TRAIN, STREAM_WARMUP, BatchStream, Windows, eval_subset, stream_seed
from config import CPU_TRAINABLE_BACKENDS
from models import ClassicAttentionMoELLM, SparseAttentionMoELLM
from dsa_lab.common.plateau import PlateauRule, PlateauTracker
from dsa_lab.common.timing import cuda_mark
from dsa_lab.training.readback import Readback, readback_interval
from dsa_lab.common.results_io import atomic_save_torch, atomic_write_json, load_torch, read_json
from sparse_attention import DENSE, AttentionMode, SectionTimer, merge_recall_stats


class TrainingDiverged(RuntimeError):
    """A loss became NaN/inf; the message names the run and the step."""


def check_backend_device(backend: str, device: torch.device) -> None:
    """Refuse, before any training, a backend that cannot train on this device."""
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cpu" and backend not in CPU_TRAINABLE_BACKENDS and not interpreted:
        raise ValueError(f"attention_backend={backend!r} cannot train on CPU; use one of "
                         f"{', '.join(CPU_TRAINABLE_BACKENDS)} or --device cuda")


def pick_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> the device (under torchrun with CUDA: this rank's GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use --device cpu or auto")
    if name == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", torch.cuda.current_device())  # set per rank by distributed.init_from_env
    return torch.device(name)


# ----------------------------------------------------------------------------- how a run executes
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class Execution:
    """How stages run, not what they compute (so none of it is in a config fingerprint; a runner adds a non-fp32
    dtype to its own): `dtype` 'fp32' or 'bf16' (CUDA autocast of the forward, fp32 master weights and loss),
    `compile` (torch.compile of the model), resume checkpoints every `checkpoint_every` steps (0: none) kept in
    `folder` and tagged with the run's config fingerprint `key`, `resume` (continue from them), `name`, the
    stage's name inside its run (unique per run: it names the checkpoint files), and `readback_every`: the per-step
    losses, gradient norms, loads and times stay on the device and are read back every this many steps, and before
    every evaluation and checkpoint (0 = auto: every step on CPU, readback.CUDA_READBACK_EVERY on CUDA)."""
    dtype: str = "fp32"
    compile: bool = False
    checkpoint_every: int = 0
    resume: bool = False
    folder: Path | None = None
    key: str = ""
    name: str = ""
    readback_every: int = 0

    def validate(self, device: torch.device) -> None:
        """Refuse, before any work, what cannot run here (never silently ignored)."""
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        if self.dtype == "bf16" and device.type != "cuda":
            raise ValueError("--dtype bf16 runs CUDA autocast and needs a GPU; on CPU use --dtype fp32")
        if self.compile and device.type != "cuda":
            raise ValueError("--compile (torch.compile) is for CUDA runs; on CPU leave it out")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every={self.checkpoint_every!r} must be an integer >= 0 (0: no checkpoints)")
        if not isinstance(self.readback_every, int) or self.readback_every < 0:
            raise ValueError(f"readback_every={self.readback_every!r} must be an integer >= 0 (0: auto, every step "
                             f"on CPU)")

    def named(self, name: str) -> "Execution":
        return dataclasses.replace(self, name=name)


def checkpointed(run: Execution, folder: Path, key: str, overwrite: bool) -> Execution:
    """`run` keeping this run's resume checkpoints in `folder`, tagged with its config fingerprint `key`.
    Checkpoints an interrupted run left there are continued with `resume`, discarded with `overwrite`, and
    otherwise refused in one line (hours of training are never dropped silently); ones made with another
    config are never continued."""
    marker = folder / "run.json"
    with distributed.main_first():  # rank 0 clears a folder before the others look at it
        if marker.exists():
            found = read_json(marker, fix=f"delete the folder {folder} (that run restarts)").get("config_fingerprint")
            if found != key or not run.resume:
                if not overwrite:
                    what = "made with a different config" if found != key else "of an interrupted run"
                    hint = "pass --resume to continue it, or " if found == key else ""
                    raise ValueError(f"{folder} holds checkpoints {what}; {hint}pass --overwrite to start that run "
                                     f"again")
                if distributed.is_main():
                    shutil.rmtree(folder)
    if run.checkpoint_every:
        atomic_write_json(marker, {"config_fingerprint": key})
    return dataclasses.replace(run, folder=folder, key=key)


def discard_checkpoints(run: Execution) -> None:
    """A finished run (its record written) needs its resume checkpoints no more."""
    if run.folder is not None and distributed.is_main():
        shutil.rmtree(run.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            run.folder.parent.rmdir()  # the resume/ folder, once no run holds checkpoints in it


def classic_from_state(cfg: ModelConfig, state: dict, seed: int, build=ClassicAttentionMoELLM):
    """A dense model holding `state` (built after torch.manual_seed(seed), as every runner's dense model is)."""
    torch.manual_seed(seed)
    classic = build(cfg)
    classic.load_state_dict(state)
    return classic


def sparse_from_state(cfg: ModelConfig, state: dict, seed: int, build=SparseAttentionMoELLM) -> SparseAttentionMoELLM:
    """A sparse model holding every shared weight of `state`; its indexers get their own seeded init.
    `build(cfg)` makes the model (any SparseAttentionMoELLM subclass with its parameter names)."""
    torch.manual_seed(seed + 1_000_003)
    sparse = build(cfg)
    missing, unexpected = sparse.load_state_dict(state, strict=False)
    assert not unexpected and all(".indexer." in k for k in missing), (missing, unexpected)
    return sparse


def lr_multiplier(step: int, total: int, warmup_fraction: float, min_ratio: float) -> float:
    """Linear warm-up for warmup_fraction of the steps, then cosine decay to min_ratio."""
    warm = int(warmup_fraction * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(groups: list[dict], tcfg: TrainConfig, steps: int):
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, steps, tcfg.lr_warmup_fraction, tcfg.min_lr_ratio))
    return opt, sched


def peak_memory(step_peak: "StepPeak") -> dict:
    """{'peak_memory_mb': CUDA peak allocated over the stage's training steps (`step_peak`; evaluation is not
    counted; NaN on CPU), 'process_peak_rss_mb': the process's lifetime peak RSS — on CPU the only figure, and it
    never goes down, so runs later in a process inherit it}."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_memory_mb": step_peak.mb(), "process_peak_rss_mb": rss_mb}


class StepPeak:
    """Peak CUDA memory over training steps only: each step starts from a reset of the allocator's peak and its
    peak is kept after the step, before any evaluation (whose dense recall and full-batch forwards would
    otherwise count). On CPU nothing is measured (NaN)."""

    def __init__(self, device: torch.device, peak_bytes: int = 0):
        self.cuda, self.device, self.peak_bytes = device.type == "cuda", device, peak_bytes

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> None:
        if self.cuda:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))

    def mb(self) -> float:
        return self.peak_bytes / 2**20 if self.cuda else math.nan


def eval_batches(val, batch_size: int):
    """Held-out (inputs, targets) batches. `val` is either windows (N, L+1) (next-token targets) or a pair
    (inputs (N, L), targets (N, L)) whose ignored targets are -100 (a task scored at answer positions only)."""
    inputs, targets = (val[:, :-1], val[:, 1:]) if isinstance(val, torch.Tensor) else val
    for start in range(0, len(inputs), batch_size):
        yield inputs[start: start + batch_size], targets[start: start + batch_size]


@torch.no_grad()
def evaluate(model, val, batch_size: int, device: torch.device, recall: bool = False) -> dict:
    """Held-out loss, accuracy, perplexity in the model's own mode (targets of -100 are not scored); with
    recall=True (a model with indexers) also indexer recall."""
    was_training = model.training
    model.eval()
    mode = dataclasses.replace(model.default_mode, stats=recall)
    total_loss, correct, count, stats = 0.0, 0, 0, []
    for inputs, targets in eval_batches(val, batch_size):
        inputs, targets = inputs.to(device), targets.to(device)
        logits, aux = model(inputs, mode, return_aux=True)
        logits = logits.float()
        total_loss += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        scored = targets != -100
        correct += ((logits.argmax(-1) == targets) & scored).sum().item()
        count += scored.sum().item()
        stats += aux.stats
    model.train(was_training)
    loss = total_loss / count
    result = {"val_loss": loss, "val_accuracy": correct / count, "val_perplexity": math.exp(min(loss, 50))}
    if recall:
        result.update(merge_recall_stats(stats))
    return result


def _first_windows(val, n: int):
    """The first n held-out windows of `val` (windows, or an (inputs, targets) pair)."""
    return val[:n] if isinstance(val, torch.Tensor) else tuple(part[:n] for part in val)


@torch.no_grad()
def held_out_indexer_kl(model, val, batch_size: int, device: torch.device) -> float:
    """The warm-up loss on held-out windows: dense attention, KL(p || softmax(I)) summed over layers, mean over
    windows (what the plateau rule watches)."""
    was_training = model.training
    model.eval()
    mode = AttentionMode(sparse=False, indexer_loss="dense")
    total, windows = 0.0, 0
    for inputs, _ in eval_batches(val, batch_size):
        total += model(inputs.to(device), mode, return_aux=True)[1].indexer_loss.item() * len(inputs)
        windows += len(inputs)
    model.train(was_training)
    return total / windows


# ----------------------------------------------------------------------------- stages as data
@dataclass(frozen=True)
class Stage:
    """One training stage. `trains` 'all' or 'indexer' (main model frozen); `mode` what attention computes
    (sparse on/off, which indexer loss); `lm_loss` whether the LM loss (+ MoE balance loss) is optimised;
    `lr` the main (or, when only the indexer trains, the indexer) learning rate; `indexer_lr` the indexer
    group's lr when everything trains; `eval_every` None = evaluate only before and after."""
    name: str
    steps: int
    trains: str
    mode: AttentionMode
    lm_loss: bool
    lr: float
    indexer_lr: float | None = None
    weight_decay: float = 0.0
    recall: bool = False
    eval_every: int | None = None
    plateau: PlateauRule | None = None  # the warm-up's stopping rule (`steps` is its cap); None: a plain stage


def dense_stage(tcfg: TrainConfig, steps: int | None = None) -> Stage:
    """Dense training of every parameter with the LM loss (stage 0 and the classic continuation)."""
    return Stage("dense", tcfg.steps if steps is None else steps, "all", DENSE, lm_loss=True,
                 lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay, eval_every=tcfg.eval_every)


def warmup_stage(tcfg: TrainConfig) -> Stage:
    """Stage 1: dense attention, main model frozen, indexers trained on the dense KL at warmup_lr."""
    return Stage("warmup", tcfg.warmup_steps, "indexer", AttentionMode(sparse=False, indexer_loss="dense"),
                 lm_loss=False, lr=tcfg.warmup_lr, recall=True, plateau=warmup_rule(tcfg))


def warmup_rule(tcfg: TrainConfig) -> PlateauRule:
    """The warm-up's stopping rule from the config (warmup_steps is the cap; a fixed count when the rule is off)."""
    return PlateauRule(max_steps=tcfg.warmup_steps, eval_every=tcfg.warmup_eval_every,
                       window=tcfg.warmup_plateau_window, min_rel_improvement=tcfg.warmup_min_rel_improvement,
                       enabled=tcfg.warmup_until_plateau)


def _plateau_tracker(stage: Stage, log: dict) -> PlateauTracker | None:
    """The stage's tracker; its curve lives in `log` (so a resume checkpoint carries it)."""
    if stage.plateau is None:
        return None
    tracker = PlateauTracker(stage.plateau)
    state = log.setdefault("plateau", {"steps": [], "kl": []})
    tracker.steps, tracker.kl = state["steps"], state["kl"]
    return tracker


def _plateau_stop(tracker: PlateauTracker, model, val, tcfg: TrainConfig, device, step: int) -> bool:
    """At the rule's evaluation steps: measure the held-out KL; True when the warm-up is finished."""
    if not tracker.is_eval_step(step):
        return False
    kl = held_out_indexer_kl(model, _first_windows(val, tcfg.warmup_eval_windows), tcfg.batch_size, device)
    return tracker.update(step, kl)


def sparse_stage(tcfg: TrainConfig) -> Stage:
    """Stage 2: sparse attention; main model on the LM loss, indexers on the sparse KL in their own group."""
    return Stage("sparse", tcfg.steps, "all", AttentionMode(sparse=True, indexer_loss="sparse"), lm_loss=True,
                 lr=tcfg.learning_rate, indexer_lr=tcfg.indexer_lr, weight_decay=tcfg.weight_decay, recall=True,
                 eval_every=tcfg.eval_every)


def _param_groups(model, stage: Stage) -> list[dict]:
    if stage.trains == "indexer":
        return [{"params": model.indexer_parameters(), "lr": stage.lr, "weight_decay": 0.0}]
    if stage.indexer_lr is None:
        return [{"params": list(model.parameters()), "lr": stage.lr, "weight_decay": stage.weight_decay}]
    return [{"params": model.main_parameters(), "lr": stage.lr, "weight_decay": stage.weight_decay},
            {"params": model.indexer_parameters(), "lr": stage.indexer_lr, "weight_decay": 0.0}]


def _update(loss: torch.Tensor, opt, sched, grad_clip: float, desc: str, step: int,
            reported: torch.Tensor | None = None, check_now: bool = True) -> torch.Tensor:
    """One optimizer step, gradients clipped per param group (the indexer's KL never scales the main model's
    update) -> the groups' gradient norms (G,) before clipping. `check_now`: a NaN/inf loss (`reported`: the loss
    over all ranks, so every rank stops together), or a NaN/inf gradient under a finite loss, stops the run naming
    the step (before the optimizer touches a weight); else no host sync here, and the read-back checks both."""
    reported = loss if reported is None else reported
    if check_now and not torch.isfinite(reported):
        raise _loss_diverged(desc, reported.item(), step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norms = []
    for i, group in enumerate(opt.param_groups):
        try:
            norm = torch.nn.utils.clip_grad_norm_(group["params"], grad_clip, error_if_nonfinite=check_now)
        except RuntimeError as e:
            if "non-finite" not in str(e):
                raise
            raise _gradient_diverged(desc, i, loss.item(), step) from None
        norms.append(norm.to(loss.device))  # a group without gradients: a CPU zero
    opt.step()
    sched.step()
    return torch.stack(norms)


def _loss_diverged(desc: str, value: float, step: int) -> TrainingDiverged:
    return TrainingDiverged(f"{desc}: loss became {value} at step {step}; lower the learning rate")


def _gradient_diverged(desc: str, group: int, loss: float, step: int) -> TrainingDiverged:
    return TrainingDiverged(f"{desc}: non-finite gradient (param group {group}) with a finite loss {loss:.4g} at "
                            f"step {step}; lower the learning rate")


def _check_finite(row: dict, desc: str) -> None:
    """The NaN guard at a read-back: a step whose loss or a gradient norm is not finite stops the run, named."""
    if not math.isfinite(row["reported"]):
        raise _loss_diverged(desc, row["reported"], row["step"])
    for i, norm in enumerate(row["norms"].tolist()):
        if not math.isfinite(norm):
            raise _gradient_diverged(desc, i, row["loss"], row["step"])


def _read_back(readback: Readback, log: dict, timer: SectionTimer, desc: str) -> None:
    """Fold the steps held on the device into `log` in step order (one host sync), each checked by the NaN guard
    first; a profiled step (it has a forward span) keeps NaN as its step time."""
    for row in readback.read():
        _check_finite(row, desc)
        if "lm" in row:
            log["step_loss"].append(row["lm"])
        if "kl" in row:
            log["step_kl"].append(row["kl"])
        if "load" in row:
            log["load_sum"] = log["load_sum"] + row["load"]
        profiled = "forward" in row["spans"]
        if profiled:
            log["forward_time"].append(row["spans"]["forward"])
        log["step_time"].append(math.nan if profiled else row["spans"]["step"])
    timer.resolve()


def _name_earlier_divergence(readback: Readback, log: dict, timer: SectionTimer, desc: str, error: Exception) -> None:
    """A step failed while earlier ones were unread: if one of those diverged (its NaN weights the likely cause,
    e.g. of the NaN-score check of the next forward), raise that, naming its step; else the caller re-raises."""
    if isinstance(error, TrainingDiverged) or not readback.pending:
        return
    try:
        _read_back(readback, log, timer, desc)
    except TrainingDiverged as diverged:
        raise diverged from error
    except Exception:  # the read-back failed too (e.g. a broken CUDA context): the original error stands
        return


@contextlib.contextmanager
def _frozen_main(model, frozen: bool):
    """Main parameters need no gradient while only the indexers train."""
    params = model.main_parameters() if frozen else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def run_stage(model, stage: Stage, stream: BatchStream, val: torch.Tensor, tcfg: TrainConfig,
              device: torch.device, desc: str, run: Execution = Execution()) -> dict:
    """Train `model` through one stage (a fresh AdamW and lr schedule) -> {"curves", "final", "before"}.

    Curves at every evaluation: steps, train_loss (LM), val_loss, val_accuracy, val_perplexity,
    time_per_step; with an indexer loss also indexer_kl (per-step in `step_indexer_kl`); with recall also
    indexer_recall, random_recall, local_recall, mean_selected_keys. `before`: the evaluation before the first
    step of a stage that evaluates only at its ends. `final` also holds tokens_per_s (CUDA: MFU); a warm-up
    stage with a plateau rule stops where the rule says and records it in `plateau` (steps, KL curve, reason).

    `run` (Execution) says how: dtype, torch.compile, and resume checkpoints (`run.folder`): every
    `checkpoint_every` steps the whole training state (model, optimizer, schedule, stream position, every RNG,
    the curves so far) is saved atomically (newest two kept), and a finished stage leaves its result and end
    state; with `run.resume` the stage continues from there, to the bit the numbers an uninterrupted run gives.
    Under torchrun every rank trains on its slice of each global batch (distributed.shard) in
    DistributedDataParallel; the logged losses are the global-batch means, identical on every rank.
    """
    steps = stage.steps
    distributed.check_batch(tcfg.batch_size)
    saved = _resume_point(run, model, stream) if run.folder is not None and run.resume else None
    if saved is not None and saved.get("result") is not None:  # the stage finished before the interruption
        return saved["result"]
    opt, sched, log, first = _stage_start(model, stage, val, tcfg, device, saved)
    tracker = _plateau_tracker(stage, log)
    timer = SectionTimer(cuda=device.type == "cuda")
    timer.totals = log["timer"]
    profile_from = max(1, min(10, steps // 2))  # profile a few steps after the first ones settle (never step 0)
    profile = range(profile_from, min(steps, profile_from + tcfg.profile_steps))
    if stage.lm_loss:
        model.train()
    with _frozen_main(model, stage.trains == "indexer"):
        steps, seq_len = _train_steps(model, stage, stream, val, tcfg, device, desc, run, (opt, sched), log, tracker,
                                      timer, profile, first)
    if stage.trains == "indexer":  # routing seen while main was frozen must not feed the next balance update
        for block in model.blocks:
            block.ffn.load_counts.zero_()
    if stage.eval_every is None:
        _log_eval(log["curves"], model, val, tcfg, device, stage, steps, log["step_loss"], log["step_time"],
                  log["step_kl"])
    result = {"curves": log["curves"], "final": _final_metrics(model, stage, log, timer, profile, tcfg, seq_len, device),
              "before": log["before"], "step_indexer_kl": log["step_kl"]}
    result.update({"plateau": tracker.record()} if tracker is not None else {})
    if run.folder is not None and run.checkpoint_every:
        _save_finished(run, model, stream, result)
    return result


def _train_steps(model, stage: Stage, stream, val, tcfg: TrainConfig, device: torch.device, desc: str, run: Execution,
                 optimizer: tuple, log: dict, tracker, timer: SectionTimer, profile: range, first: int) -> tuple[int, int]:
    """Steps `first`.. of `stage`: evaluations, the plateau rule, resume checkpoints, and the read-backs of the
    per-step scalars before each of them, every `run.readback_every` steps and at the end -> (the stage's steps, as
    the plateau rule may have cut them; L)."""
    steps, seq_len = stage.steps, 0
    readback = Readback(readback_interval(run.readback_every, device))
    net = _wrap(model, device, run)
    try:
        for step in tqdm(range(first, steps), desc=desc, leave=False, initial=first, total=steps,
                         disable=steps == 0 or not distributed.is_main()):
            seq_len = _train_step(net, model, stage, stream.next(), *optimizer, tcfg, device, run, log,
                                  timer if step in profile else None, step, desc, readback)
            evaluating = stage.eval_every and ((step + 1) % stage.eval_every == 0 or step + 1 == steps)
            saving = (run.folder is not None and run.checkpoint_every and (step + 1) % run.checkpoint_every == 0
                      and step + 1 < steps)
            if evaluating or saving or readback.due(step):
                _read_back(readback, log, timer, desc)
            if evaluating:
                _log_eval(log["curves"], model, val, tcfg, device, stage, step + 1, log["step_loss"], log["step_time"],
                          log["step_kl"])
            if tracker is not None and _plateau_stop(tracker, model, val, tcfg, device, step + 1):
                steps = step + 1  # the rule ended the stage here: what follows counts the steps run
                break
            if saving:
                _save_step(run, step + 1, model, *optimizer, stream, log)
        _read_back(readback, log, timer, desc)
    except Exception as error:
        _name_earlier_divergence(readback, log, timer, desc, error)
        raise
    return steps, seq_len


def _stage_start(model, stage: Stage, val, tcfg: TrainConfig, device: torch.device, saved: dict | None):
    """-> (optimizer, schedule, log, first step): fresh (after the `before` evaluation of a stage that evaluates
    only at its ends), or as they were at the mid-stage checkpoint `saved`."""
    before = None
    if saved is None and stage.eval_every is None:
        before = evaluate(model, val, tcfg.batch_size, device, recall=stage.recall)
    opt, sched = _optimizer(_param_groups(model, stage), tcfg, stage.steps)
    keys = ["steps", "train_loss", "val_loss", "val_accuracy", "val_perplexity", "time_per_step"]
    keys += ["indexer_kl"] if stage.mode.indexer_loss else []
    keys += ["indexer_recall", "random_recall", "local_recall", "mean_selected_keys"] if stage.recall else []
    log = {"curves": {k: [] for k in keys}, "before": before,
           "step_loss": [], "step_time": [], "step_kl": [],  # one entry per step (step_time NaN at profiled steps)
           "forward_time": [],  # forward seconds of each profiled step (CUDA: between events)
           "load_sum": 0.0,  # (layers, experts): share of routed slots, summed over steps
           "timer": {}}
    if saved is None:
        return opt, sched, log, 0
    opt.load_state_dict(saved["optimizer"])  # mid-stage: as they were after step saved["step"]
    sched.load_state_dict(saved["scheduler"])
    return opt, sched, saved["log"], saved["step"]


def _train_step(net, model, stage: Stage, batch, opt, sched, tcfg: TrainConfig, device: torch.device, run: Execution,
                log: dict, timer: SectionTimer | None, step: int, desc: str, readback: Readback) -> int:
    """One training step on `batch` (the stage's losses, the update, the MoE balance); its scalars and time spans
    go to `readback` (on the device: no host sync on CUDA but the NaN guard's when it reads back every step);
    `timer` set on a profiled step (its sections are timed and its step time kept out of the figures). -> L."""
    world = distributed.world_size()
    inputs, targets = (_to_device(distributed.shard(t), device) for t in batch)
    mode = dataclasses.replace(stage.mode, timer=timer)
    if stage.mode.sparse:  # progressive-k schedules follow the sparse stage
        model.set_training_progress(step / stage.steps)
    step_peak = StepPeak(device, log.get("peak_bytes", 0))  # this step's peak, never evaluation's
    step_peak.start()
    start = _mark(device)
    with _autocast(device, run.dtype):
        logits, aux = net(inputs, mode, return_aux=True)
    spans = {"forward": (start, _mark(device))} if timer is not None else {}  # the span the sections lie in
    values, loss = {}, torch.zeros((), device=device)
    if stage.lm_loss:
        lm_loss, values["lm"] = _lm_loss(logits, targets, world)
        loss = lm_loss + aux.balance_loss
    if stage.mode.indexer_loss:
        kl = aux.indexer_loss  # touches indexer params only (detached input and targets)
        loss = loss + kl
        values["kl"] = _rank_mean(kl)
    reported = _rank_mean(loss) if world > 1 else None
    values["norms"] = _update(loss, opt, sched, tcfg.grad_clip, desc, step, reported, readback.every == 1)
    values.update(reported=(loss if reported is None else reported).detach(), loss=loss.detach())
    if stage.trains == "all":
        _sum_expert_loads(model)
        values["load"] = model.update_balance_bias()  # (MoE layers, experts) shares
    spans["step"] = (start, _mark(device))
    readback.add(step, values, spans)
    step_peak.stop()
    log["peak_bytes"] = step_peak.peak_bytes  # the stage's running peak, kept in resume checkpoints
    return inputs.shape[1]


def _mark(device: torch.device):
    """Now, for a span: a CUDA event on the stream (no host sync) or the wall clock."""
    return cuda_mark() if device.type == "cuda" else time.perf_counter()


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`; to CUDA through pinned memory, asynchronously (a pageable copy waits for the GPU)."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def _final_metrics(model, stage: Stage, log: dict, timer: SectionTimer, profile: range, tcfg: TrainConfig,
                   seq_len: int, device: torch.device) -> dict:
    """A finished stage's `final`: the last evaluation, mean step time, memory, time shares (attention and indexer
    forward sections over the forward time of the same profiled steps), throughput, loss variance, expert loads."""
    curves, steps = log["curves"], stage.steps
    forward_time, load_sum, step_loss = log["forward_time"], log["load_sum"], log["step_loss"]
    profiled = sum(forward_time)
    final = {k: curves[k][-1] for k in curves if k not in ("steps", "train_loss", "time_per_step")}
    step_peak = StepPeak(device, log.get("peak_bytes", 0))  # the peak over the training steps only
    final.update(avg_time_per_step=_mean(log["step_time"]), **peak_memory(step_peak),
                 profiled_forward_ms=1000 * profiled / max(1, len(forward_time)),
                 attention_time_share=timer.totals.get("attention", math.nan) / profiled if profiled else math.nan,
                 attention_ms=1000 * timer.totals.get("attention", math.nan) / max(1, len(profile)))
    final.update(throughput(model, tcfg.batch_size, seq_len, final["avg_time_per_step"],
                            final.get("mean_selected_keys"), device))
    if stage.lm_loss:
        final.update(train_loss_variance=_variance(step_loss[-max(10, steps // 10):]),
                     expert_load=(load_sum / max(1, steps)).tolist() if steps else [])
    if stage.mode.needs_indexer:
        final["indexer_time_share"] = timer.totals.get("indexer", math.nan) / profiled if profiled else math.nan
        final["indexer_ms"] = 1000 * timer.totals.get("indexer", math.nan) / max(1, len(profile))
    return final


# ----------------------------------------------------------------------------- precision, compile, DDP
def _autocast(device: torch.device, dtype: str):
    """bf16 autocast of the forward (weights, optimizer state and the loss stay fp32); fp32: nothing."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _wrap(model, device: torch.device, run: Execution):
    """The module a training step calls: DistributedDataParallel under torchrun (gradients averaged over
    ranks; an expert no token of a rank's slice chose is an unused parameter there), torch.compile when asked."""
    net = model
    if distributed.world_size() > 1:
        import inspect

        from torch.nn.parallel import DistributedDataParallel
        # buffers are not broadcast at each forward: the MoE loads are per rank until _sum_expert_loads adds them
        buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True, **buffers)
    if run.compile:
        net = compiled(net)
    return net


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled(net, **options):
    """torch.compile once per module (every stage of a model reuses it; a fresh wrapper per stage x length x seed
    ran into dynamo's recompile limit and fell back to eager). The MoE's per-expert token lists are dynamic-shape
    outputs: captured in the graph (capture_dynamic_output_shape_ops) instead of breaking it. The token-level
    training paths (selection, gather, MQA) trace without graph breaks (tests/test_compile.py)."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    if net not in _COMPILED:
        _COMPILED[net] = torch.compile(net, **options)
    return _COMPILED[net]


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the loss to differentiate, the global-batch mean LM loss to log). One process: the mean over the
    scored targets (-100 = not scored). Under DDP, which averages gradients over ranks: this slice's summed
    loss over the global count of scored targets, times world, so the gradient is the global mean's even when
    the ranks' slices hold different numbers of scored targets."""
    flat_logits, flat_targets = logits.flatten(0, 1).float(), targets.flatten()
    if world == 1:
        loss = F.cross_entropy(flat_logits, flat_targets)
        return loss, loss.detach()
    total = F.cross_entropy(flat_logits, flat_targets, reduction="sum")
    count = distributed.all_reduce_sum((flat_targets != -100).sum().to(total.dtype))
    return total * world / count, distributed.all_reduce_sum(total.detach().clone()) / count


def _rank_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a per-rank mean (equal slices: the global-batch mean); itself in one process."""
    world = distributed.world_size()
    return value.detach() if world == 1 else distributed.all_reduce_sum(value.detach().clone()) / world


def _sum_expert_loads(model) -> None:
    """Under DDP every rank balances its experts on the loads of the whole global batch (same bias everywhere,
    equal to a single process's)."""
    if distributed.world_size() > 1:
        for block in model.blocks:
            distributed.all_reduce_sum(block.ffn.load_counts)


# peak dense bf16 tensor-core FLOP/s by device name (vendor datasheets); an unknown GPU gets no MFU
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12,
                   "H100 NVL": 835e12, "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """The datasheet peak for a CUDA device name (first matching key, most specific first); None if unknown."""
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)


def model_flops_per_token(model, seq_len: int, mean_keys: float | None = None) -> float:
    """Training FLOPs per token: 6 x the parameters a token activates (MoE: shared + top-k routed experts,
    embeddings and indexers included) + attention's QK^T and PV, forward and backward (12 x layers x attended
    keys x query/value width; attended keys = the mean selected keys, or (L+1)/2 causal dense)."""
    cfg = model.cfg
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "shared" not in n)
    active = sum(p.numel() for p in model.parameters()) - routed * (1 - cfg.expert_top_k / cfg.num_experts)
    keys = mean_keys if mean_keys is not None and math.isfinite(mean_keys) else (seq_len + 1) / 2
    if cfg.attention_type == "mla":
        width = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) / 2
    else:
        width = cfg.d_model
    return 6 * active + 12 * cfg.n_layers * width * keys


def throughput(model, batch_size: int, seq_len: int, time_per_step: float, mean_keys: float | None,
               device: torch.device) -> dict:
    """{'tokens_per_s': global-batch tokens per second of training, 'model_flops_utilization': achieved model
    FLOP/s over the devices' peak bf16 FLOP/s (CUDA with a known device name; NaN otherwise)}."""
    tokens_per_s = batch_size * seq_len / time_per_step if time_per_step and math.isfinite(time_per_step) else math.nan
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    mfu = math.nan
    if peak and math.isfinite(tokens_per_s):
        mfu = model_flops_per_token(model, seq_len, mean_keys) * tokens_per_s / (peak * distributed.world_size())
    return {"tokens_per_s": tokens_per_s, "model_flops_utilization": mfu}


# ----------------------------------------------------------------------------- resume checkpoints
def _rng_state(model) -> dict:
    """Every RNG a step may draw from: torch (CPU and each CUDA device), python, numpy, and the generators
    modules hold themselves (e.g. the random-selection control's)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "modules": {f"{owner}:{attr}:{key}": {"device": str(g.device), "state": g.get_state()}
                         for (owner, attr, key), g in _module_generators(model).items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU (under torchrun: its rank's)
    return state


def _set_rng_state(model, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    for name, saved in state["modules"].items():
        owner, attr, key = name.split(":", 2)
        holder = getattr(model.get_submodule(owner), attr)
        device = saved["device"]
        if device.startswith("cuda"):  # saved by rank 0: onto this rank's GPU (a key naming the device follows it)
            here = f"cuda:{torch.cuda.current_device()}"
            key, device = (here if key == device else key), here
        generator = torch.Generator(device=device)
        generator.set_state(saved["state"])
        if key:
            holder[key] = generator
        else:
            setattr(model.get_submodule(owner), attr, generator)


def _module_generators(model) -> dict[tuple[str, str, str], torch.Generator]:
    """{(module name, attribute, dict key or ''): generator} for every torch.Generator a module holds."""
    found = {}
    for owner, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Generator):
                found[(owner, attr, "")] = value
            elif isinstance(value, dict):
                found.update({(owner, attr, str(k)): g for k, g in value.items() if isinstance(g, torch.Generator)})
    return found


def _stream_state(stream) -> dict:
    if not hasattr(stream, "state_dict"):
        raise ValueError(f"{type(stream).__name__} has no state_dict(): a checkpointed stage needs a batch stream "
                         f"that can say where it stands (see data.BatchStream); run without --checkpoint-every")
    return stream.state_dict()


def _save_step(run: Execution, step: int, model, opt, sched, stream, log: dict) -> None:
    """A mid-stage checkpoint after `step` steps (atomic; rank 0); the newest two are kept."""
    atomic_save_torch({"key": run.key, "stage": run.name, "step": step, "model": model.state_dict(),
                       "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "stream": _stream_state(stream),
                       "rng": _rng_state(model), "log": log}, run.folder / f"{run.name}.step{step:09d}.pt")
    if distributed.is_main():
        for old in sorted(run.folder.glob(f"{run.name}.step*.pt"))[:-2]:
            old.unlink()


def _save_finished(run: Execution, model, stream, result: dict) -> None:
    """A finished stage: its result and the state it ends in (model, stream, RNGs); its step checkpoints go."""
    atomic_save_torch({"key": run.key, "stage": run.name, "model": model.state_dict(), "stream": _stream_state(stream),
                       "rng": _rng_state(model), "result": result}, run.folder / f"{run.name}.done.pt")
    if distributed.is_main():
        for old in run.folder.glob(f"{run.name}.step*.pt"):
            old.unlink()


def _resume_point(run: Execution, model, stream) -> dict | None:
    """The newest checkpoint of this stage (finished, else mid-stage), with the model, stream and RNGs
    restored from it; None when the stage has none. A checkpoint of another config is refused."""
    done = run.folder / f"{run.name}.done.pt"
    steps = sorted(run.folder.glob(f"{run.name}.step*.pt"))
    path = done if done.exists() else (steps[-1] if steps else None)
    if path is None:
        return None
    fix = ("delete it (the run resumes from the checkpoint before it)" if len(steps) > 1 and path != done
           else "delete it (that stage restarts)")
    saved = load_torch(path, "cpu", fix=fix)
    if not isinstance(saved, dict) or saved.get("key") != run.key or saved.get("stage") != run.name:
        raise ValueError(f"{path} is a checkpoint of another config or stage; pass --overwrite to start that run "
                         f"again")
    model.load_state_dict(saved["model"])
    stream.load_state_dict(saved["stream"])
    _set_rng_state(model, saved["rng"])
    return saved


def _log_eval(curves, model, val, tcfg, device, stage: Stage, step: int, step_loss, step_time, step_kl) -> None:
    """Append one evaluation (and the means of the per-step records since the last one) to `curves`."""
    since = curves["steps"][-1] if curves["steps"] else 0
    metrics = evaluate(model, val, tcfg.batch_size, device, recall=stage.recall)
    curves["steps"].append(step)
    curves["train_loss"].append(_mean(step_loss[since:]))
    curves["time_per_step"].append(_mean(step_time[since:]))
    if "indexer_kl" in curves:
        curves["indexer_kl"].append(_mean(step_kl[since:]))
    for k in curves:
        if k in metrics:
            curves[k].append(metrics[k])


def warmup_indexer(model, stream: BatchStream, val: torch.Tensor, tcfg: TrainConfig, device: torch.device,
                   desc: str = "warm-up", run: Execution = Execution()) -> dict:
    """Stage 1 (warmup_stage) -> the warm-up record: recall on the sparse model's own selection before and after."""
    return warmup_record(run_stage(model, warmup_stage(tcfg), stream, val, tcfg, device, desc, run=run))


def warmup_record(result: dict) -> dict:
    """The record of a warm-up stage's result: its per-step KL, recall before and after, the controls' recall."""
    after = result["final"]
    return {"indexer_kl": result["step_indexer_kl"], "recall_before": result["before"]["indexer_recall"],
            "recall_after": after["indexer_recall"], "random_recall": after["random_recall"],
            "local_recall": after["local_recall"], "plateau": result["plateau"]}


def train_lm(model, stream: BatchStream, val: torch.Tensor, tcfg: TrainConfig, device: torch.device,
             desc: str, stage: Stage | None = None, run: Execution = Execution()) -> dict:
    """Dense training (default: `dense_stage(tcfg)`) or any stage with the LM loss -> {"curves", "final"}."""
    result = run_stage(model, stage or dense_stage(tcfg), stream, val, tcfg, device, desc, run=run)
    return {"curves": result["curves"], "final": result["final"]}


def _variance(values: list[float]) -> float:
    m = _mean(values)
    return sum((v - m) ** 2 for v in values) / max(1, len(values) - 1)


def _mean(values: list[float]) -> float:
    """Mean of the finite values (NaN marks a step kept out of the figure); NaN when there are none."""
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def save_checkpoint(model, path: Path, extra: dict) -> None:
    """Atomic save of weights + model config + whatever rebuilds the run (tokenizer spec, seed, L), all plain
    data (tensors, dicts, lists, str, numbers) so `load_checkpoint` can read it with weights_only=True."""
    payload = {"model_state": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
               "model_type": "sparse" if isinstance(model, SparseAttentionMoELLM) else "classic", **extra}
    atomic_save_torch(payload, path)


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """-> (model, payload). Raises ValueError with a clear message for a missing/invalid file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist; run run_experiment.py first (it writes "
                         f"OUT/seq_<L>/checkpoints/*.pt)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)  # never runs code from the file
    except Exception as e:
        raise ValueError(f"{path} is not a readable dsa-lab checkpoint ({type(e).__name__})") from e
    if not isinstance(payload, dict) or "model_state" not in payload:
        raise ValueError(f"{path} is not a dsa-lab checkpoint")
    cfg = ModelConfig(**payload["model_config"])
    model = (SparseAttentionMoELLM if payload["model_type"] == "sparse" else ClassicAttentionMoELLM)(cfg)
    model.load_state_dict(payload["model_state"])
    return model.to(device).eval(), payload


def dense_pretrain(cfg: ModelConfig, stream, val, tcfg: TrainConfig, seed: int, device: torch.device, desc: str,
                   run: Execution = Execution(), start: dict | None = None, name: str = "pretrain"):
    """The branch point (stage 0): the classic model from the seed's init (or holding `start`), trained densely for
    `dense_steps` on `stream` (the seed's STREAM_PRETRAIN) -> (model, record or None); `name`: the stage's name in
    `run`'s checkpoints."""
    torch.manual_seed(seed)
    classic = ClassicAttentionMoELLM(cfg).to(device)
    if start is not None:
        classic.load_state_dict(start)
    if not tcfg.dense_steps:
        return classic, None
    record = train_lm(classic, stream, val, tcfg, device, desc=f"{desc} dense pre-training",
                      stage=dense_stage(tcfg, tcfg.dense_steps), run=run.named(name))
    return classic, record


def state_of(model) -> dict:
    """A detached copy of a model's state (the branch point every compared model starts from)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_sparse_from(branch_state: dict, cfg: ModelConfig, windows: Windows, tcfg: TrainConfig, seed: int,
                      device: torch.device, desc: str = "sparse", run: Execution = Execution()
                      ) -> tuple[SparseAttentionMoELLM, dict]:
    """A sparse model from the branch-point weights: indexer warm-up, then sparse training -> (model, result).

    Stage 2 uses the seed's stage-2 batch stream: the same batches, in the same order, as the classic
    continuation and every other sparse variant of this seed.
    """
    sparse = sparse_from_state(cfg, branch_state, seed).to(device)
    val = eval_subset(windows.val, tcfg.eval_windows)
    L, bs = windows.seq_len, tcfg.batch_size
    warmup = warmup_indexer(sparse, BatchStream(windows.train, bs, stream_seed(seed, STREAM_WARMUP)), val, tcfg, device,
                            desc=f"L={L} seed={seed} {desc} indexer warm-up", run=run.named("warmup"))
    result = train_lm(sparse, BatchStream(windows.train, bs, stream_seed(seed, STREAM_TRAIN)), val, tcfg, device,
                      desc=f"L={L} seed={seed} {desc}", stage=sparse_stage(tcfg), run=run.named("sparse"))
    result["warmup"] = warmup
    result["final"].update(warmup_indexer_recall=warmup["recall_after"], warmup_random_recall=warmup["random_recall"],
                           warmup_local_recall=warmup["local_recall"])
    return sparse, result


def run_seed(cfg: ModelConfig, windows: Windows, tcfg: TrainConfig, seed: int, device: torch.device,
             checkpoint_dir: Path | None = None, extra: dict | None = None, run: Execution = Execution()) -> dict:
    """One seed of the comparison, as DeepSeek-V3.2 did it (sparse continued from a dense model):

    stage 0  shared dense pre-training of the classic model (`dense_steps`);
    branch   the sparse model copies every shared weight (indexers are new);
    classic  continues dense training for `steps`;
    sparse   stage 1 indexer warm-up (`warmup_steps`, main frozen), stage 2 sparse training for `steps`
             on the very same batches in the same order as the classic continuation.
    `run` (Execution): dtype, compile, and this run's resume checkpoints (its stages named pretrain, classic,
    warmup, sparse).
    """
    val = eval_subset(windows.val, tcfg.eval_windows)
    classic, pretrain = dense_pretrain(cfg, BatchStream(windows.train, tcfg.batch_size,
                                                        stream_seed(seed, STREAM_PRETRAIN)),
                                       val, tcfg, seed, device, f"L={windows.seq_len} seed={seed}", run=run)
    branch_state = state_of(classic)
    results = {"pretrain": pretrain}
    results["classic"] = train_lm(classic, BatchStream(windows.train, tcfg.batch_size, stream_seed(seed, STREAM_TRAIN)),
                                  val, tcfg, device,
                                  desc=f"L={windows.seq_len} seed={seed} classic", run=run.named("classic"))
    sparse, results["sparse"] = train_sparse_from(branch_state, cfg, windows, tcfg, seed, device, run=run)
    if checkpoint_dir is not None:
        for name, model in (("classic", classic), ("sparse", sparse)):
            save_checkpoint(model, checkpoint_dir / f"{name}_seed{seed}.pt",
                            {"seed": seed, "seq_len": windows.seq_len, **(extra or {})})
    return results
