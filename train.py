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
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from config import ModelConfig, TrainConfig
from data import BatchStream, Windows, eval_subset
from config import CPU_TRAINABLE_BACKENDS
from models import ClassicAttentionMoELLM, SparseAttentionMoELLM
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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def build_model_pair(cfg: ModelConfig, seed: int, device: torch.device):
    """Classic and sparse models with identical shared weights (only the indexers are extra)."""
    torch.manual_seed(seed)
    classic = ClassicAttentionMoELLM(cfg)
    return classic.to(device), sparse_from_state(cfg, classic.state_dict(), seed).to(device)


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


def peak_memory(device: torch.device) -> dict:
    """{'peak_memory_mb': CUDA peak allocated in this run (NaN on CPU), 'process_peak_rss_mb': the process's
    lifetime peak RSS — on CPU the only figure, and it never goes down, so runs later in a process inherit it}."""
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    return {"peak_memory_mb": cuda, "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


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


def dense_stage(tcfg: TrainConfig, steps: int | None = None) -> Stage:
    """Dense training of every parameter with the LM loss (stage 0 and the classic continuation)."""
    return Stage("dense", tcfg.steps if steps is None else steps, "all", DENSE, lm_loss=True,
                 lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay, eval_every=tcfg.eval_every)


def warmup_stage(tcfg: TrainConfig) -> Stage:
    """Stage 1: dense attention, main model frozen, indexers trained on the dense KL at warmup_lr."""
    return Stage("warmup", tcfg.warmup_steps, "indexer", AttentionMode(sparse=False, indexer_loss="dense"),
                 lm_loss=False, lr=tcfg.warmup_lr, recall=True)


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


def _update(loss: torch.Tensor, opt, sched, grad_clip: float, desc: str, step: int) -> None:
    """One optimizer step, gradients clipped per param group (the indexer's KL never scales the main
    model's update); a NaN/inf loss, or a NaN/inf gradient under a finite loss, stops the run naming the
    step (before the optimizer touches a weight)."""
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for i, group in enumerate(opt.param_groups):
        try:
            torch.nn.utils.clip_grad_norm_(group["params"], grad_clip, error_if_nonfinite=True)
        except RuntimeError as e:
            if "non-finite" not in str(e):
                raise
            raise TrainingDiverged(f"{desc}: non-finite gradient (param group {i}) with a finite loss "
                                   f"{loss.item():.4g} at step {step}; lower the learning rate") from None
    opt.step()
    sched.step()


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
              device: torch.device, desc: str) -> dict:
    """Train `model` through one stage (a fresh AdamW and lr schedule) -> {"curves", "final", "before"}.

    Curves at every evaluation: steps, train_loss (LM), val_loss, val_accuracy, val_perplexity,
    time_per_step; with an indexer loss also indexer_kl (per-step in `step_indexer_kl`); with recall also
    indexer_recall, random_recall, local_recall, mean_selected_keys. `before` is the evaluation before
    the first step when the stage evaluates only at its ends.
    """
    steps = stage.steps
    before = evaluate(model, val, tcfg.batch_size, device, recall=stage.recall) if stage.eval_every is None else None
    opt, sched = _optimizer(_param_groups(model, stage), tcfg, steps)
    keys = ["steps", "train_loss", "val_loss", "val_accuracy", "val_perplexity", "time_per_step"]
    keys += ["indexer_kl"] if stage.mode.indexer_loss else []
    keys += ["indexer_recall", "random_recall", "local_recall", "mean_selected_keys"] if stage.recall else []
    curves = {k: [] for k in keys}
    step_loss, step_time, step_kl = [], [], []  # one entry per step (step_time NaN at profiled steps)
    forward_time = []  # forward seconds of each profiled step
    timer = SectionTimer(cuda=device.type == "cuda")
    profile_from = max(1, min(10, steps // 2))  # profile a few steps after the first ones settle (never step 0)
    profile = range(profile_from, min(steps, profile_from + tcfg.profile_steps))
    load_sum = 0.0  # (layers, experts): share of routed slots, summed over steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if stage.lm_loss:
        model.train()
    with _frozen_main(model, stage.trains == "indexer"):
        for step in tqdm(range(steps), desc=desc, leave=False, disable=steps == 0):
            inputs, targets = (t.to(device) for t in stream.next())
            mode = dataclasses.replace(stage.mode, timer=timer if step in profile else None)
            if stage.mode.sparse:  # progressive-k schedules follow the sparse stage
                model.set_training_progress(step / steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            logits, aux = model(inputs, mode, return_aux=True)
            if step in profile:  # the span the timer's sections lie in: this forward
                if device.type == "cuda":
                    torch.cuda.synchronize()
                forward_time.append(time.perf_counter() - start)
            loss = torch.zeros((), device=device)
            if stage.lm_loss:
                lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                loss = lm_loss + aux.balance_loss
                step_loss.append(lm_loss.item())
            if stage.mode.indexer_loss:
                kl = aux.indexer_loss  # touches indexer params only (detached input and targets)
                loss = loss + kl
                step_kl.append(kl.item())
            _update(loss, opt, sched, tcfg.grad_clip, desc, step)
            if stage.trains == "all":
                load_sum = load_sum + torch.tensor(model.update_balance_bias())
            if device.type == "cuda":
                torch.cuda.synchronize()
            # profiled steps (extra syncs, timer sections) are kept out of the step-time figures
            step_time.append(math.nan if step in profile else time.perf_counter() - start)
            if stage.eval_every and ((step + 1) % stage.eval_every == 0 or step + 1 == steps):
                _log_eval(curves, model, val, tcfg, device, stage, step + 1, step_loss, step_time, step_kl)
    if stage.trains == "indexer":  # routing seen while main was frozen must not feed the next balance update
        for block in model.blocks:
            block.ffn.load_counts.zero_()
    if stage.eval_every is None:
        _log_eval(curves, model, val, tcfg, device, stage, steps, step_loss, step_time, step_kl)
    # time shares: attention / indexer forward sections over the forward time of the same profiled steps
    profiled = sum(forward_time)
    final = {k: curves[k][-1] for k in curves if k not in ("steps", "train_loss", "time_per_step")}
    final.update(avg_time_per_step=_mean(step_time), **peak_memory(device),
                 profiled_forward_ms=1000 * profiled / max(1, len(forward_time)),
                 attention_time_share=timer.totals.get("attention", math.nan) / profiled if profiled else math.nan,
                 attention_ms=1000 * timer.totals.get("attention", math.nan) / max(1, len(profile)))
    if stage.lm_loss:
        final.update(train_loss_variance=_variance(step_loss[-max(10, steps // 10):]),
                     expert_load=(load_sum / max(1, steps)).tolist() if steps else [])
    if stage.mode.needs_indexer:
        final["indexer_time_share"] = timer.totals.get("indexer", math.nan) / profiled if profiled else math.nan
        final["indexer_ms"] = 1000 * timer.totals.get("indexer", math.nan) / max(1, len(profile))
    return {"curves": curves, "final": final, "before": before, "step_indexer_kl": step_kl}


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
                   desc: str = "warm-up") -> dict:
    """Stage 1 (warmup_stage): recall measured on the sparse model's own selection before and after."""
    result = run_stage(model, warmup_stage(tcfg), stream, val, tcfg, device, desc)
    after = result["final"]
    return {"indexer_kl": result["step_indexer_kl"], "recall_before": result["before"]["indexer_recall"],
            "recall_after": after["indexer_recall"], "random_recall": after["random_recall"],
            "local_recall": after["local_recall"]}


def train_lm(model, stream: BatchStream, val: torch.Tensor, tcfg: TrainConfig, device: torch.device,
             desc: str, stage: Stage | None = None) -> dict:
    """Dense training (default: `dense_stage(tcfg)`) or any stage with the LM loss -> {"curves", "final"}."""
    result = run_stage(model, stage or dense_stage(tcfg), stream, val, tcfg, device, desc)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model_state": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
               "model_type": "sparse" if isinstance(model, SparseAttentionMoELLM) else "classic", **extra}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


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


def dense_pretrain(cfg: ModelConfig, windows: Windows, tcfg: TrainConfig, seed: int, device: torch.device):
    """Stage 0: the classic model from the seed's init, trained densely for `dense_steps` -> (model, record)."""
    torch.manual_seed(seed)
    classic = ClassicAttentionMoELLM(cfg).to(device)
    if not tcfg.dense_steps:
        return classic, None
    record = train_lm(classic, BatchStream(windows.train, tcfg.batch_size, seed * 1000 + 3),
                      eval_subset(windows.val, tcfg.eval_windows), tcfg, device,
                      desc=f"L={windows.seq_len} seed={seed} dense pre-training",
                      stage=dense_stage(tcfg, tcfg.dense_steps))
    return classic, record


def train_sparse_from(branch_state: dict, cfg: ModelConfig, windows: Windows, tcfg: TrainConfig, seed: int,
                      device: torch.device, desc: str = "sparse") -> tuple[SparseAttentionMoELLM, dict]:
    """A sparse model from the branch-point weights: indexer warm-up, then sparse training -> (model, result).

    Stage 2 uses the seed's stage-2 batch stream: the same batches, in the same order, as the classic
    continuation and every other sparse variant of this seed.
    """
    sparse = sparse_from_state(cfg, branch_state, seed).to(device)
    val = eval_subset(windows.val, tcfg.eval_windows)
    L, bs = windows.seq_len, tcfg.batch_size
    warmup = warmup_indexer(sparse, BatchStream(windows.train, bs, seed * 1000 + 2), val, tcfg, device,
                            desc=f"L={L} seed={seed} {desc} indexer warm-up")
    result = train_lm(sparse, BatchStream(windows.train, bs, seed * 1000 + 1), val, tcfg, device,
                      desc=f"L={L} seed={seed} {desc}", stage=sparse_stage(tcfg))
    result["warmup"] = warmup
    result["final"].update(warmup_indexer_recall=warmup["recall_after"], warmup_random_recall=warmup["random_recall"],
                           warmup_local_recall=warmup["local_recall"])
    return sparse, result


def run_seed(cfg: ModelConfig, windows: Windows, tcfg: TrainConfig, seed: int, device: torch.device,
             checkpoint_dir: Path | None = None, extra: dict | None = None) -> dict:
    """One seed of the comparison, as DeepSeek-V3.2 did it (sparse continued from a dense model):

    stage 0  shared dense pre-training of the classic model (`dense_steps`);
    branch   the sparse model copies every shared weight (indexers are new);
    classic  continues dense training for `steps`;
    sparse   stage 1 indexer warm-up (`warmup_steps`, main frozen), stage 2 sparse training for `steps`
             on the very same batches in the same order as the classic continuation.
    """
    classic, pretrain = dense_pretrain(cfg, windows, tcfg, seed, device)
    branch_state = {k: v.detach().clone() for k, v in classic.state_dict().items()}
    results = {"pretrain": pretrain}
    results["classic"] = train_lm(classic, BatchStream(windows.train, tcfg.batch_size, seed * 1000 + 1),
                                  eval_subset(windows.val, tcfg.eval_windows), tcfg, device,
                                  desc=f"L={windows.seq_len} seed={seed} classic")
    sparse, results["sparse"] = train_sparse_from(branch_state, cfg, windows, tcfg, seed, device)
    if checkpoint_dir is not None:
        for name, model in (("classic", classic), ("sparse", sparse)):
            save_checkpoint(model, checkpoint_dir / f"{name}_seed{seed}.pt",
                            {"seed": seed, "seq_len": windows.seq_len, **(extra or {})})
    return results
