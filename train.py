"""Two-stage DSA training (DeepSeek-V3.2-Exp), the classic baseline, evaluation, timing, checkpoints.

Stage 1 (dense warm-up): main model frozen, dense attention, only the indexers train on
KL(p || softmax(I)) at lr `warmup_lr`. Stage 2 (sparse): everything trains; the main model sees only
the LM loss, each indexer only its sparse KL (its input is detached), in its own param group.
The classic baseline starts from the same shared weights and sees the same batches in the same order.
"""
from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from config import ModelConfig, TrainConfig
from data import BatchStream, Windows, eval_subset
from models import ClassicAttentionMoELLM, SparseAttentionMoELLM
from sparse_attention import SectionTimer, merge_recall_stats


class TrainingDiverged(RuntimeError):
    """A loss became NaN/inf; the message names the run and the step."""


def check_backend_device(backend: str, device: torch.device) -> None:
    """Refuse, before any training, a backend that cannot train on this device."""
    from config import CPU_TRAINABLE_BACKENDS
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


def sparse_from_state(cfg: ModelConfig, state: dict, seed: int) -> SparseAttentionMoELLM:
    """A sparse model holding every shared weight of `state`; its indexers get their own seeded init."""
    torch.manual_seed(seed + 1_000_003)
    sparse = SparseAttentionMoELLM(cfg)
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


@torch.no_grad()
def evaluate(model, val: torch.Tensor, batch_size: int, device: torch.device, recall: bool = False) -> dict:
    """Held-out loss, accuracy, perplexity; for a sparse model with recall=True also indexer recall."""
    was_training = model.training
    model.eval()
    if recall:
        model.set_collect_stats(True)
    total_loss, correct, count, stats = 0.0, 0, 0, []
    for start in range(0, len(val), batch_size):
        batch = val[start: start + batch_size].to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs).float()
        total_loss += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
        if recall:
            stats += [a.last_stats for a in model.attentions]
    if recall:
        model.set_collect_stats(False)
    model.train(was_training)
    loss = total_loss / count
    result = {"val_loss": loss, "val_accuracy": correct / count, "val_perplexity": math.exp(min(loss, 50))}
    if recall:
        result.update(merge_recall_stats(stats))
    return result


def _update(loss: torch.Tensor, opt, sched, grad_clip: float, desc: str, step: int) -> None:
    """One optimizer step, gradients clipped per param group (the indexer's KL never scales the main
    model's update); a NaN/inf loss stops the run naming the step."""
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for group in opt.param_groups:
        torch.nn.utils.clip_grad_norm_(group["params"], grad_clip)
    opt.step()
    sched.step()


def warmup_indexer(model: SparseAttentionMoELLM, stream: BatchStream, val: torch.Tensor, tcfg: TrainConfig,
                   device: torch.device, desc: str = "warm-up") -> dict:
    """Stage 1: dense attention, main model frozen, indexers trained on the dense KL."""
    before = evaluate(model, val, tcfg.batch_size, device, recall=True)
    model.set_sparse(False)
    model.freeze_main(True)
    model.set_indexer_loss("dense")
    opt, sched = _optimizer([{"params": model.indexer_parameters(), "lr": tcfg.warmup_lr, "weight_decay": 0.0}],
                            tcfg, tcfg.warmup_steps)
    kl_curve = []
    for step in tqdm(range(tcfg.warmup_steps), desc=desc, leave=False, disable=tcfg.warmup_steps == 0):
        inputs, _ = stream.next()
        model(inputs.to(device))
        loss = model.indexer_loss()
        _update(loss, opt, sched, tcfg.grad_clip, desc, step)
        kl_curve.append(loss.item())
    model.freeze_main(False)
    model.set_indexer_loss(None)
    model.set_sparse(True)  # recall is measured as it was before warm-up: on the sparse model's own selection
    for block in model.blocks:  # warm-up routing must not feed stage 2's first balance update
        block.ffn.load_counts.zero_()
    after = evaluate(model, val, tcfg.batch_size, device, recall=True)
    return {"indexer_kl": kl_curve, "recall_before": before["indexer_recall"],
            "recall_after": after["indexer_recall"], "random_recall": after["random_recall"],
            "local_recall": after["local_recall"]}


def train_lm(model, stream: BatchStream, val: torch.Tensor, tcfg: TrainConfig, device: torch.device,
             desc: str, steps: int | None = None) -> dict:
    """Stage 2 for the sparse model (LM loss + sparse indexer KL), or dense training of the classic model
    (`steps` defaults to tcfg.steps; a fresh AdamW and lr schedule each call).

    Returns curves at every evaluation (steps, train_loss, val_loss, val_accuracy, time_per_step and,
    for the sparse model, indexer_kl and indexer_recall) and the final metrics.
    """
    sparse = isinstance(model, SparseAttentionMoELLM)
    lr = {"lr": tcfg.learning_rate, "weight_decay": tcfg.weight_decay}
    if sparse:
        model.set_sparse(True)
        model.set_indexer_loss("sparse")
        groups = [{"params": model.main_parameters(), **lr},
                  {"params": model.indexer_parameters(), "lr": tcfg.indexer_lr, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters()), **lr}]
    steps = tcfg.steps if steps is None else steps
    opt, sched = _optimizer(groups, tcfg, steps)
    keys = ["steps", "train_loss", "val_loss", "val_accuracy", "val_perplexity", "time_per_step"]
    keys += ["indexer_kl", "indexer_recall", "random_recall", "local_recall"] if sparse else []
    curves = {k: [] for k in keys}
    step_loss, step_time, step_kl = [], [], []  # one entry per step
    timer = SectionTimer(cuda=device.type == "cuda")
    profile_from = min(10, steps // 2)  # profile a few steps after the first ones settle
    profile = range(profile_from, min(steps, profile_from + tcfg.profile_steps))
    load_sum = 0.0  # (layers, experts): share of routed slots, summed over steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    for step in tqdm(range(steps), desc=desc, leave=False):
        inputs, targets = (t.to(device) for t in stream.next())
        model.set_timer(timer if step in profile else None)
        if hasattr(model, "set_training_progress"):  # progressive-k schedules
            model.set_training_progress(step / steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(inputs)
        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss = lm_loss + model.aux_loss()
        if sparse:
            kl = model.indexer_loss()  # touches indexer params only (detached input and targets)
            loss = loss + kl
            step_kl.append(kl.item())
        _update(loss, opt, sched, tcfg.grad_clip, desc, step)
        load_sum = load_sum + torch.tensor(model.update_balance_bias())
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_time.append(time.perf_counter() - start)
        step_loss.append(lm_loss.item())
        if (step + 1) % tcfg.eval_every == 0 or step + 1 == steps:
            since = curves["steps"][-1] if curves["steps"] else 0
            metrics = evaluate(model, val, tcfg.batch_size, device, recall=sparse)
            curves["steps"].append(step + 1)
            curves["train_loss"].append(_mean(step_loss[since:]))
            curves["time_per_step"].append(_mean(step_time[since:]))
            for k in ("val_loss", "val_accuracy", "val_perplexity"):
                curves[k].append(metrics[k])
            if sparse:
                curves["indexer_kl"].append(_mean(step_kl[since:]))
                for k in ("indexer_recall", "random_recall", "local_recall", "mean_selected_keys"):
                    curves.setdefault(k, []).append(metrics[k])
    model.set_timer(None)
    if sparse:
        model.set_indexer_loss(None)
    tail = step_loss[-max(10, steps // 10):]
    profiled = sum(step_time[i] for i in profile)
    final = {k: curves[k][-1] for k in ("val_loss", "val_accuracy", "val_perplexity")}
    final.update(avg_time_per_step=_mean(step_time), train_loss_variance=_variance(tail),
                 **peak_memory(device), expert_load=(load_sum / steps).tolist(),
                 attention_time_share=timer.totals.get("attention", math.nan) / profiled if profiled else math.nan,
                 attention_ms=1000 * timer.totals.get("attention", math.nan) / max(1, len(profile)))
    if sparse:
        final["indexer_time_share"] = timer.totals.get("indexer", math.nan) / profiled if profiled else math.nan
        final["indexer_ms"] = 1000 * timer.totals.get("indexer", math.nan) / max(1, len(profile))
        for k in ("indexer_recall", "random_recall", "local_recall", "mean_selected_keys"):
            final[k] = curves[k][-1]
    return {"curves": curves, "final": final}


def _variance(values: list[float]) -> float:
    m = _mean(values)
    return sum((v - m) ** 2 for v in values) / max(1, len(values) - 1)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def save_checkpoint(model, path: Path, extra: dict) -> None:
    """Atomic save of weights + model config + whatever rebuilds the run (tokenizer spec, seed, L)."""
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
        payload = torch.load(path, map_location=device, weights_only=False)
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
                      desc=f"L={windows.seq_len} seed={seed} dense pre-training", steps=tcfg.dense_steps)
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
                      desc=f"L={L} seed={seed} {desc}")
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
