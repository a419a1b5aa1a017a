"""`run_experiment.py --experiment retrofit`: DSA retrofitted onto a pretrained causal LM (retrofit.py), on
held-out Shakespeare plays.

Per length L: stage 1, the indexers' dense warm-up (model frozen; one no-grad forward per batch gives every
layer's input and head-summed attention; only the indexers train, on the paper's KL at lr 1e-3, until
`plateau.PlateauRule` stops it). Per (L, k): optional stage 2 (`steps` > 0: sparse fine-tuning beside a dense
twin on the same batches), then evaluation on held-out windows — dense, dsa, and the indexer-free controls
oracle / local / sink_local / random (paired per-window differences with 95 % CIs), recall overall and by
distance (with CIs over the recall windows), the retrieval evaluations of `retrieval.py` for dense / dsa / oracle /
sink_local (passkey retrieval over depth, the copy probe at several distances, and per layer whether the sparse
forward's selection holds the token an answer needs), and prefill timing. Records are read back on the next
invocation.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsa_lab.experiments import retrieval, retrofit_speed
from dsa_lab.experiments import skeleton as experiment
from dsa_lab.inference import retrofit_decode
from dsa_lab.interop import retrofit
from dsa_lab.interop.levers import LEVER_DEFAULTS, Recurrence, splice_recurrences
from dsa_lab.training.data import STREAM_TRAIN, STREAM_WARMUP, BatchStream, load_documents, make_windows, split_documents, stream_seed
from config import DataConfig
from dsa_lab.common.plateau import PlateauRule, PlateauTracker
from dsa_lab.common.results_io import (atomic_write_json, fingerprint, mean_ci95, read_json,
                        run_environment)
from sparse_attention import merge_recall_stats
from dsa_lab.training.train import Execution

MODES = ("dense", "dsa", "oracle", "local", "sink_local", "random")
CONTROLS = ("oracle", "local", "sink_local", "random")
# Presets use config.py's key names where config.py has the concept (warmup_steps: the warm-up's cap;
# warmup_eval_every / warmup_plateau_window / warmup_min_rel_improvement: its plateau rule; warmup_eval_windows:
# the held-out windows it measures the KL on; eval_windows: held-out windows per (L, k); learning_rate /
# indexer_lr: stage 2). Retrofit's own keys: top_ks (every k evaluated at every L), seed (one), batch_reuse,
# warmup_rows (query rows per warm-up step, 0 = all), recall_windows (windows whose dense forward measures recall,
# 0 = all), eval_backend (the quality evaluations' attention path), probe_windows (the copy probe's windows per
# distance), probe_distances (fractions of L - probe_segment between the copies' starts; 1.0 = the far probe of
# earlier reports), passkey_depths (needle depths, 0 = right after the intro, 1 = just before the question),
# passkey_trials (random keys per depth and L), passkey_filler (classic | heldout), timing_repeats, sinks,
# probe_segment, eval_modes (the modes evaluated beside dense: at least dsa and oracle), and the levers
# (LEVER_DEFAULTS below).
# The cpu preset's sizes come from per-forward costs of SmolLM2 measured on the 2-core CPU (2026-12-02, L 4096):
# dense 7 s, a sparse mode 10-19 s, the recall forward 121 s, a warm-up step of 256 rows 1.2 s + 12 s per batch
# (the forward keeping 1024 rows' targets); with 6 / 3 / 1 windows (evaluation / probe / recall) about 70 of the
# preset's minutes are L 4096's. With the adopted 16-head indexer one L 4096 warm-up alone ran 440 steps, 64 min
# (2026-12-07, 2-core Xeon, the levers preset's windows): the cpu preset now takes hours.
# Warm-up caps: SmolLM2 at L=1024 (quick's rule, 2026-12-02) reached its plateau at step 360 (held-out KL 2.96 ->
# 0.116; at step 200, the old cap, 0.157 and still falling ~5 % per 30 steps); the caps leave room above that.
# The levers quick / cpu / default adopt (the lever ablation, docs/retrofit.md "Retrieval levers": structure keeps the
# loss nearer the oracle and buys copying and passkeys; head_max, the per-head warm-up target, lifts the far copies
# further at L 1024 and 2048; 16 indexer heads, the capacity lever, bring the far copies to dense's level at L 1024
# and 2048); `--levers paper` turns them all off again (the earlier recipe, its fingerprints and
# numbers), `--levers heads4` only the capacity (the recipe adopted from 2026-12-05 to 2026-12-07). The `levers`
# preset stays at the paper's recipe: it is the ablation's reference.
SMALL_INDEXER = dict(indexer_heads=4, indexer_dim=64)  # the paper recipe's indexer here (DeepSeek's: 64 x 128)
ADOPTED_LEVERS = dict(structure_window=16, warmup_target="head_max", indexer_heads=16)
PRESETS = {  # step caps and window counts per preset; every L gets its own warm-up
    "quick": dict(seq_lens=[1024], top_ks=[64], warmup_steps=500, warmup_eval_every=10, warmup_plateau_window=3,
                  warmup_eval_windows=2, eval_windows=8, probe_windows=6, probe_distances=[0.125, 0.5, 1.0],
                  passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0], passkey_trials=4, timing_repeats=1, batch_reuse=4,
                  **ADOPTED_LEVERS),
    # the lever ablation (issue 30): quick's length, budget, rule and windows at about half its cost — 256 sampled query
    # rows per warm-up step, recall on one window, only the modes a lever changes or is measured against
    "levers": dict(seq_lens=[1024], top_ks=[64], warmup_steps=500, warmup_eval_every=10, warmup_plateau_window=3,
                   warmup_eval_windows=2, eval_windows=8, probe_windows=6, probe_distances=[0.125, 0.5, 1.0],
                   passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0], passkey_trials=4, timing_repeats=1, batch_reuse=4,
                   warmup_rows=256, recall_windows=1, eval_modes=["dsa", "oracle"]),  # the paper's recipe: levers off
    "cpu": dict(seq_lens=[1024, 2048, 4096], top_ks=[64, 128, 256], warmup_steps=600, warmup_eval_every=10,
                warmup_plateau_window=3, warmup_eval_windows=2, eval_windows=6, probe_windows=4, recall_windows=2,
                probe_distances=[0.125, 0.5, 1.0], passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0], passkey_trials=3,
                timing_repeats=2, batch_reuse=4, warmup_rows=256, **ADOPTED_LEVERS),
    "default": dict(seq_lens=[1024, 2048, 4096, 8192], top_ks=[64, 128, 256], warmup_steps=1000,
                    warmup_eval_every=20, warmup_plateau_window=3, warmup_eval_windows=4, eval_windows=32,
                    probe_windows=16, recall_windows=8, probe_distances=[0.0625, 0.125, 0.25, 0.5, 1.0],
                    passkey_depths=[i / 10 for i in range(11)], passkey_trials=10, timing_repeats=3, batch_reuse=4,
                    warmup_rows=512, **ADOPTED_LEVERS),
}
# The levers' settings at the paper's recipe: levers.LEVER_DEFAULTS (what each one means is said there).
COMMON = dict(batch_size=1, batch_reuse=1, warmup_rows=0, recall_windows=0, eval_backend="sdpa_mask",
              eval_modes=list(MODES[1:]),
              warmup_lr=1e-3, warmup_min_rel_improvement=0.02, steps=0,
              learning_rate=1e-5, indexer_lr=1e-3, sinks=4, probe_segment=64, probe_distances=[1.0],
              passkey_depths=[0.0, 0.5, 1.0], passkey_trials=2, passkey_filler="classic", attention_backend="gather",
              seed=42,
              **SMALL_INDEXER, indexer_rope_dim=32, **LEVER_DEFAULTS)
# `--levers NAME ...`: named lever settings, applied in order on top of the preset (capacity is the indexer's size)
LEVERS = {
    "paper": dict(LEVER_DEFAULTS, **SMALL_INDEXER),  # every lever off: the paper's recipe (the adopted levers undone)
    "structure": dict(structure_window=16),
    "group_max": dict(warmup_target="group_max"),
    "head_max": dict(warmup_target="head_max"),
    "far_rows": dict(row_weight=0.5),
    "prev_key": dict(prev_key=True),
    "heads4": dict(indexer_heads=4),
    "heads8": dict(indexer_heads=8),
    "heads16": dict(indexer_heads=16),
    "wide": dict(indexer_heads=32, indexer_dim=128),
    "rank": dict(rank_weight=0.1),
    "recurrence": dict(recur_share=0.5),
}
OVERRIDE_KEYS = ("seq_lens", "warmup_steps", "warmup_min_rel_improvement", "warmup_plateau_window", "steps", "batch_size",
                 "attention_backend")  # taken as they are


def settings_for(preset: str, overrides: dict) -> dict:
    """The preset's settings with the CLI's overrides (unknown preset or bad value: ValueError). Besides
    OVERRIDE_KEYS: top_k K evaluates [K], eval_windows N sets probe_windows to max(2, N // 2), seeds gives its first
    seed."""
    given = {key: overrides[key] for key in OVERRIDE_KEYS if key in overrides}
    s = {**COMMON, **experiment.preset_settings(PRESETS, preset, "retrofit", given)}
    for name in overrides.get("levers") or ():
        if name not in LEVERS:
            raise ValueError(f"--levers {name!r} is unknown; choose from {', '.join(LEVERS)}")
        s.update(LEVERS[name])
    s["levers"] = list(overrides.get("levers") or ())
    if "top_k" in overrides:
        s["top_ks"] = [overrides["top_k"]]
    if "eval_windows" in overrides:
        s["eval_windows"], s["probe_windows"] = overrides["eval_windows"], max(2, overrides["eval_windows"] // 2)
    if "seeds" in overrides:
        s["seed"] = overrides["seeds"][0]
    check_settings(s)
    return s


def check_settings(s: dict) -> None:
    """Refuse a bad setting before the model loads: ValueError naming the one flag that is wrong and the fix."""
    if s["attention_backend"] not in retrofit.BACKENDS:
        raise ValueError(f"--backend {s['attention_backend']!r} is not a retrofit backend; choose one of "
                         f"{', '.join(retrofit.BACKENDS)}")
    if any(L <= 2 * s["probe_segment"] for L in s["seq_lens"]):
        raise ValueError(f"--seq-lens {s['seq_lens']} must each exceed 2 * probe_segment = {2 * s['probe_segment']}")
    shortest = min(s["seq_lens"])
    for k in s["top_ks"]:
        if not 1 <= k < shortest:
            raise ValueError(f"--top-k {k} must be in [1, {shortest}): at least one key, and fewer than the shortest "
                             f"length L = {shortest} (at k >= L DSA keeps every key: it is dense attention)")
    for flag, key, least, why in (("--steps", "steps", 0, ""), ("--warmup-steps", "warmup_steps", 1, ""),
                                  ("--batch-size", "batch_size", 1, ""),
                                  ("--eval-windows", "eval_windows", 2, " (a CI needs two)")):
        if s[key] < least:
            raise ValueError(f"{flag} {s[key]} must be >= {least}{why}")
    if not {"dsa", "oracle"} <= set(s["eval_modes"]) <= set(MODES[1:]):
        raise ValueError(f"eval_modes={s['eval_modes']} must hold dsa and oracle and only modes of {MODES[1:]}")
    if s["structure_window"] and s["sinks"] + s["structure_window"] >= min(s["top_ks"]):
        raise ValueError(f"the structure lever (quick/cpu/default adopt it) always keeps sinks + window = "
                         f"{s['sinks'] + s['structure_window']} tokens; use a --top-k above that, or --levers paper")
    recurrence_of(s)  # its own checks
    check_retrieval(s)


def check_retrieval(s: dict) -> None:
    """The retrieval evaluations' settings (a bad one: ValueError naming the key and the fix)."""
    depths = s["passkey_depths"]
    if not depths or any(not 0 <= d <= 1 for d in depths) or len(set(depths)) != len(depths):
        raise ValueError(f"passkey_depths={depths}: give distinct needle depths in [0, 1]")
    if s["passkey_trials"] < 1:
        raise ValueError(f"passkey_trials={s['passkey_trials']} must be >= 1 (random keys per depth and L)")
    if s["passkey_filler"] not in retrieval.FILLERS:
        raise ValueError(f"passkey_filler={s['passkey_filler']!r} is unknown; choose one of "
                         f"{', '.join(retrieval.FILLERS)}")
    if s["probe_windows"] < 2:
        raise ValueError(f"probe_windows={s['probe_windows']} must be >= 2 (a CI needs two)")
    retrieval.copy_distances(min(s["seq_lens"]), s["probe_segment"], s["probe_distances"])


# ----------------------------------------------------------------------------- data
def token_streams(tokenizer, cache_dir: str = "data_cache") -> dict:
    """Shakespeare (dsa_lab/training/data.py's documents and held-out split) tokenised with the model's tokenizer, cached."""
    docs = load_documents(DataConfig())
    train_docs, val_docs = split_documents(docs, DataConfig().val_fraction)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    key = hashlib.sha256(json.dumps([[d for d, _ in train_docs], [d for d, _ in val_docs],
                                     tokenizer.name_or_path, len(tokenizer), eos]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"retrofit_tokens_{key}.npz"
    if path.exists():
        arrays = np.load(path)
        return {"train": arrays["train"], "val": arrays["val"], "eos": eos, "val_docs": [d for d, _ in val_docs]}

    def stream(part):
        ids = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos], dtype=np.int32)
               for _, t in part]
        return np.concatenate(ids)

    train, val = stream(train_docs), stream(val_docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, train=train, val=val)
    tmp.replace(path)
    return {"train": train, "val": val, "eos": eos, "val_docs": [d for d, _ in val_docs]}


def split_heldout(val: torch.Tensor, n_kl: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out windows (N, L+1) -> the warm-up's KL windows (the last n_kl) and an evenly spread evaluation
    subset of the others (disjoint)."""
    if len(val) < n_kl + 2:
        raise ValueError(f"only {len(val)} held-out windows at this length; use a shorter --seq-lens")
    kl, rest = val[len(val) - n_kl:], val[:len(val) - n_kl]
    picks = torch.linspace(0, len(rest) - 1, min(n_eval, len(rest))).long()
    return kl, rest[picks]


# ----------------------------------------------------------------------------- stage 1
def warm_up(model, train: torch.Tensor, kl_windows: torch.Tensor, s: dict, device, log=print) -> dict:
    """Train the indexers on the dense KL until the plateau rule stops; -> the tracker's record + step times.
    The model is frozen, so a batch's targets never change: each captured batch serves `batch_reuse` consecutive
    optimizer steps (1 = the paper's one step per batch; more = fewer forwards of the model per step). With
    `warmup_rows` R > 0 the KL is taken over R random query rows per step (disjoint across a batch's steps; the
    held-out KL over fixed rows): an unbiased estimate of the mean over rows at O(R L) instead of O(L^2)."""
    rule = PlateauRule(max_steps=s["warmup_steps"], eval_every=s["warmup_eval_every"],
                       window=s["warmup_plateau_window"], min_rel_improvement=s["warmup_min_rel_improvement"])
    tracker = PlateauTracker(rule)
    L, reuse = train.shape[1] - 1, s["batch_reuse"]
    rows = min(s["warmup_rows"], L // reuse)  # per step; 0: every row
    fixed, draws = (torch.Generator().manual_seed(s["seed"] + i) for i in range(2))
    target, loss = s["warmup_target"], warmup_loss_of(s)
    heldout = [retrofit.warmup_targets(model, w[None, :-1].to(device), sample_rows(L, rows * reuse, fixed, device),
                                       target) for w in kl_windows]  # fixed windows and rows: cached once
    opt = torch.optim.AdamW(model.indexer_parameters(), lr=s["warmup_lr"], weight_decay=0.0)
    stream = TrainingBatches(train, s, STREAM_WARMUP)
    train_kl, step_s = [], []
    tracker.update(0, _heldout_kl(model, heldout, loss))
    for step in range(1, rule.max_steps + 1):
        t0 = time.perf_counter()
        part = (step - 1) % reuse
        if part == 0:
            inputs, _ = stream.next()  # no-grad forward of the frozen model, targets for `reuse` steps' rows
            batch = retrofit.warmup_targets(model, inputs.to(device), sample_rows(L, rows * reuse, draws, device),
                                            target)
        targets = batch if not rows else retrofit.take_rows(batch, slice(part * rows, (part + 1) * rows))
        opt.zero_grad(set_to_none=True)
        train_kl.append(retrofit.warmup_kl(model, targets, backward=True, loss=loss))
        opt.step()
        step_s.append(time.perf_counter() - t0)
        if tracker.is_eval_step(step):
            stop = tracker.update(step, _heldout_kl(model, heldout, loss))
            log(f"  warm-up step {step}: train KL {train_kl[-1]:.3f}, held-out KL {tracker.kl[-1]:.3f} "
                f"({step_s[-1]:.1f} s/step)")
            if stop:
                break
    return {**tracker.record(), "train_kl": train_kl, "mean_step_s": statistics.mean(step_s),
            "batch_reuse": reuse, "batches": -(-len(train_kl) // reuse), "query_rows_per_step": min(rows or L, L),
            "kl_unit": "mean over layers of the per-query KL (nats)" + (f", over {min(rows * reuse, L)} random query "
                                                                        "rows per window" if rows else "")
            + ("" if loss.is_paper else f"; the lever loss {loss}") + f"; target {target}"}


def warmup_loss_of(s: dict) -> retrofit.WarmupLoss:
    """The warm-up loss the settings' levers describe (the paper's KL at their defaults)."""
    return retrofit.WarmupLoss(sinks=s["sinks"], window=s["structure_window"], row_weight=s["row_weight"],
                               far_window=s["far_window"], rank_weight=s["rank_weight"], rank_top=s["rank_top"])


def recurrence_of(s: dict) -> Recurrence:
    """The data lever the settings describe (off at the defaults)."""
    return Recurrence(share=s["recur_share"], spans=s["recur_spans"], min_span=s["recur_min"],
                               max_span=s["recur_max"], min_gap=s["recur_gap"])


class TrainingBatches:
    """`BatchStream.next()` with the settings' data lever applied to each batch (a no-op when it is off): its own
    generator, so the warm-up's row draws and the stream's order do not depend on the lever."""

    def __init__(self, train: torch.Tensor, s: dict, stream: int):
        self.stream = BatchStream(train, s["batch_size"], stream_seed(s["seed"], stream))
        self.recurrence, self.generator = recurrence_of(s), torch.Generator().manual_seed(s["seed"] + 7)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.stream.next()  # (B, L) each
        if not self.recurrence.share:
            return inputs, targets
        window, _ = splice_recurrences(torch.cat([inputs, targets[:, -1:]], 1), self.recurrence,
                                       self.generator)  # (B, L + 1)
        return window[:, :-1], window[:, 1:]


def dsa_plan(s: dict, k: int, backend: str, **kwargs) -> retrofit.Plan:
    """A DSA plan at k with the settings' structure (always-kept sinks and window, when structure_window > 0)."""
    return retrofit.Plan("dsa", top_k=k, backend=backend, sinks=s["sinks"], window=s["structure_window"], **kwargs)


def sample_rows(L: int, n: int, generator: torch.Generator, device) -> torch.Tensor | None:
    """n distinct query positions in random order (None when n is 0: every row; all L rows when n >= L)."""
    return torch.randperm(L, generator=generator)[:n].to(device) if n else None


def _heldout_kl(model, heldout: list, loss: retrofit.WarmupLoss) -> float:
    return statistics.mean(retrofit.warmup_kl(model, aux, loss=loss) for aux in heldout)


# ----------------------------------------------------------------------------- stage 2
def sparse_finetune(model, s: dict, k: int, train: torch.Tensor, device, log=print):
    """DeepSeek's stage 2 beside a dense twin: -> (sparse model, dense twin, record). Both start from the
    warmed-up model, see the same batches in the same order for `steps` steps; the sparse model's main weights
    see only the LM loss, its indexers only the sparse KL (detached input, own lr)."""
    sparse, twin = copy.deepcopy(model), copy.deepcopy(model)
    sparse.base.requires_grad_(True)
    twin.base.requires_grad_(True)
    opt_s = torch.optim.AdamW([{"params": list(sparse.base.parameters()), "lr": s["learning_rate"]},
                               {"params": sparse.indexer_parameters(), "lr": s["indexer_lr"], "weight_decay": 0.0}])
    opt_d = torch.optim.AdamW(twin.base.parameters(), lr=s["learning_rate"])
    streams = [TrainingBatches(train, s, STREAM_TRAIN) for _ in range(2)]  # the same batches for both
    plan = dsa_plan(s, k, s["attention_backend"], indexer_loss=True)
    curve = {"sparse_lm": [], "dense_lm": [], "indexer_kl": []}
    for step in range(s["steps"]):
        for net, opt, stream, p in ((sparse, opt_s, streams[0], plan), (twin, opt_d, streams[1], retrofit.Plan())):
            inputs, targets = (t.to(device) for t in stream.next())
            logits, aux = net(inputs, p)
            lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            kl = torch.stack(aux.indexer_losses).mean() if aux.indexer_losses else None
            opt.zero_grad(set_to_none=True)
            (lm + kl if kl is not None else lm).backward()  # separate parameters: each loss reaches its own
            opt.step()
            curve["sparse_lm" if net is sparse else "dense_lm"].append(lm.item())
            if kl is not None:
                curve["indexer_kl"].append(kl.item())
        if (step + 1) % 10 == 0 or step + 1 == s["steps"]:
            log(f"  stage 2 step {step + 1}: sparse LM {curve['sparse_lm'][-1]:.3f}, dense twin "
                f"{curve['dense_lm'][-1]:.3f}, indexer KL {curve['indexer_kl'][-1]:.3f}")
    for net in (sparse, twin):
        net.base.requires_grad_(False)
    return sparse.eval(), twin.eval(), {"steps": s["steps"], "lr": s["learning_rate"], **curve}


# ----------------------------------------------------------------------------- evaluation
def eval_entries(model, k: int, s: dict, tuned: tuple | None = None) -> list:
    """(name, model, plan) per evaluated mode; with stage 2 also dsa_ft (sparse fine-tuned) and dense_ft (twin)."""
    entries = [(m, model, dsa_plan(s, k, s["eval_backend"]) if m == "dsa" else
                retrofit.Plan(m, top_k=k, backend=s["eval_backend"], sinks=s["sinks"], seed=s["seed"]))
               for m in MODES if m in s["eval_modes"]]
    if tuned is not None:
        entries += [("dsa_ft", tuned[0], dsa_plan(s, k, s["eval_backend"])),
                    ("dense_ft", tuned[1], retrofit.Plan())]
    return entries


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, k: int, s: dict, device, tuned=None) -> dict:
    """Per-window mean NLL of every mode on held-out windows (N, L+1), and recall of the dense attention mass by
    the dsa / oracle / sink_local selections (overall, by distance, by layer) from the dense forward of the first
    `recall_windows` windows (0: all)."""
    losses, by_layer = {}, {}
    for i, w in enumerate(windows):
        inputs, targets = w[None, :-1].to(device), w[None, 1:].to(device)
        stats = i < (s["recall_windows"] or len(windows))
        logits, aux = model(inputs, retrofit.Plan("dense", top_k=k, stats=stats, backend=s["eval_backend"],
                                                  sinks=s["sinks"], window=s["structure_window"]))
        losses.setdefault("dense", []).append(_nll(logits, targets))
        for name, per_layer in aux.stats.items():
            for layer, stat in enumerate(per_layer):
                by_layer.setdefault(name, {}).setdefault(layer, []).append(stat)
        for name, net, plan in eval_entries(model, k, s, tuned):
            losses.setdefault(name, []).append(_nll(net(inputs, plan)[0], targets))
    return {"loss_per_window": losses, "recall": {name: recall_record(layers) for name, layers in by_layer.items()}}


RECALL_KEYS = ("indexer_recall", "local_recall", "random_recall", "recall_by_distance")


def recall_record(layers: dict) -> dict:
    """{layer: [stats per recall window]} -> recall pooled over windows and layers (overall, by distance, by layer),
    and per window (pooled over layers; by layer: per layer and window) for the CIs."""
    order, n = sorted(layers), len(layers[0])
    windows = [merge_recall_stats([layers[i][w] for i in order]) for w in range(n)]
    return {**merge_recall_stats([st for sts in layers.values() for st in sts]),
            "by_layer": [merge_recall_stats(layers[i])["indexer_recall"] for i in order],
            "per_window": {key: [w[key] for w in windows] for key in RECALL_KEYS},
            "by_layer_per_window": [[merge_recall_stats([layers[i][w]])["indexer_recall"] for w in range(n)]
                                    for i in order]}


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).item()


def retrieval_entries(model, k: int, s: dict, tuned: tuple | None = None) -> list:
    """(name, model, plan) of the modes the retrieval evaluations run: dense, dsa, oracle, sink_local (local and random
    cannot reach a token more than k back but by chance), and with stage 2 dsa_ft and dense_ft."""
    keep = set(retrieval.RETRIEVAL_MODES) | {"dsa_ft", "dense_ft"}
    return [("dense", model, retrofit.Plan())] + [e for e in eval_entries(model, k, s, tuned) if e[0] in keep]


def copy_probes(entries: list, val: torch.Tensor, L: int, s: dict, device) -> dict:
    """The copy probe at every distance of `probe_distances`: {str(distance): retrieval.copy_probe's windows}."""
    m = s["probe_segment"]
    return {str(d): retrieval.copy_probe(entries, retrieval.copy_windows(val, L, m, d, s["probe_windows"]), m, d,
                                         device)
            for d in retrieval.copy_distances(L, m, s["probe_distances"])}


def prefill_timing(model, window: torch.Tensor, k: int, s: dict, device) -> dict:
    """Prefill wall time (B=1, retrofit_decode.prefill) of the dense model and of DSA with the indexer's share:
    retrofit_speed.prefill_speed (benchmark.py --retrofit's measurement: dense and DSA in turns, the first call
    discarded, the median of timing_repeats)."""
    timing, _ = retrofit_speed.prefill_speed(model, window[None, :-1].to(device), k, s["attention_backend"],
                                             s["timing_repeats"], cuda=device.type == "cuda",
                                             plan=dsa_plan(s, k, s["attention_backend"]))
    return timing


def summarise_k(evaluation: dict, probe: dict, passkey: dict) -> dict:
    """Means with 95 % CIs over windows; paired per-window differences vs dense (and dsa vs oracle); recall pooled
    and its per-window mean with CI; the copy probe (the farthest distance at the top, every one in by_distance)
    and passkey retrieval (Wilson CIs over trials)."""
    losses = evaluation["loss_per_window"]
    diff = lambda a, b: mean_ci95([x - y for x, y in zip(losses[a], losses[b])])  # noqa: E731
    out = {"loss": {m: mean_ci95(v) for m, v in losses.items()},
           "delta_vs_dense": {m: diff(m, "dense") for m in losses if m != "dense"},
           "dsa_minus_oracle": diff("dsa", "oracle"),
           "recall": {n: _recall_summary(r) for n, r in evaluation["recall"].items()},
           "windows": len(losses["dense"])}
    if "dsa_ft" in losses:
        out["dsa_ft_minus_dense_ft"] = diff("dsa_ft", "dense_ft")
    by_distance = {d: retrieval.summarise_copy(pw) for d, pw in probe.items()}
    far = max(by_distance, key=int)
    out["probe"] = {"distance": int(far), "windows": by_distance[far]["dense"]["windows"], **by_distance[far],
                    "by_distance": by_distance}
    out["passkey"] = retrieval.summarise_passkey(passkey)
    return out


def _recall_summary(r: dict) -> dict:
    """One selection's recall record -> pooled values (as before) and per-window means with 95 % CIs."""
    out = {k: r[k] for k in ("indexer_recall", "random_recall", "local_recall", "recall_by_distance", "by_layer")}
    pw = r["per_window"]
    out.update({f"{k}_ci95": mean_ci95(pw[k]) for k in ("indexer_recall", "local_recall", "random_recall")})
    out["recall_by_distance_ci95"] = [mean_ci95(list(b)) for b in zip(*pw["recall_by_distance"])]
    out["by_layer_ci95"] = [mean_ci95(layer) for layer in r["by_layer_per_window"]]
    out["windows"] = len(pw["indexer_recall"])
    return out


# ----------------------------------------------------------------------------- the run
WARMUP_KEYS = ("batch_size", "batch_reuse", "warmup_rows", "warmup_lr", "warmup_min_rel_improvement", "warmup_steps",
               "warmup_eval_every", "warmup_plateau_window", "warmup_eval_windows", "seed", "indexer_heads",
               "indexer_dim", "indexer_rope_dim")


def fingerprinted(s: dict, keys=None) -> dict:
    """The settings a record's fingerprint covers (`keys`, or all but the sweep lists): a lever at its default and
    the lever names are left out, so the paper's recipe keeps the fingerprints it had before the levers."""
    keys = keys or [n for n in s if n not in ("seq_lens", "top_ks")]
    omitted = {**LEVER_DEFAULTS, "eval_modes": list(MODES[1:])}  # keys added with the levers, at their defaults
    out = {n: s[n] for n in keys if n != "levers" and not (n in omitted and s[n] == omitted[n])}
    return {**out, **{n: s[n] for n in LEVER_DEFAULTS if s[n] != LEVER_DEFAULTS[n]}}


def run_retrofit(preset: str, overrides: dict, model_name: str | None, out: Path, overwrite: bool,
                 export_dir: str | None = None, device=None, log=print) -> dict:
    """The whole experiment; finished warm-ups and (L, k) evaluations are read back from `out`."""
    s = settings_for(preset, overrides)
    device = device or torch.device("cpu")
    base_id = retrofit.resolve_model(model_name)
    retrofit.check_supported(retrofit.load_config(base_id))  # refused before any weight is read
    t_start = time.perf_counter()
    base, tokenizer = retrofit.load_base(base_id)
    model = retrofit.RetrofitLM(base, s["indexer_heads"], s["indexer_dim"], s["indexer_rope_dim"],
                                max(max(s["seq_lens"]), 2), base_id=base_id, prev_key=s["prev_key"]).to(device)
    tokens = token_streams(tokenizer)
    log(f"retrofit: {base_id.describe()} ({base.config.model_type}, {base.config.num_hidden_layers} layers); "
        f"{tokens['train'].size:,} train / {tokens['val'].size:,} held-out tokens "
        f"(held-out plays {tokens['val_docs']}); load {time.perf_counter() - t_start:.0f} s")
    heldout = torch.from_numpy(tokens["val"].astype(np.int64))
    prompts = {L: retrieval.passkey_prompts(tokenizer, L, s["passkey_depths"], s["passkey_trials"], s["seed"],
                                            s["passkey_filler"], heldout) for L in s["seq_lens"]}  # checked up front
    results = {}
    for L in s["seq_lens"]:
        results[str(L)] = run_length(model, tokens, prompts[L], L, s, base_id, out / f"L{L}", overwrite, device, log)
    summary = {"experiment": "retrofit", "model": base_id.describe(), "model_type": base.config.model_type,
               "preset": preset, "settings": s, "environment": run_environment(device),
               "plateau_rule": PlateauRule(s["warmup_steps"], s["warmup_eval_every"], s["warmup_plateau_window"],
                                           s["warmup_min_rel_improvement"]).describe(),
               "wall_time_s": time.perf_counter() - t_start, "results": results}
    summary["sample"] = generation_sample(model, tokenizer, tokens, s, device)
    if export_dir:  # the model holds the indexers of the last length run (each L has its own warm-up)
        trained = s["seq_lens"][-1]
        retrofit.export_retrofit(model, export_dir, {"trained_seq_len": trained, "top_ks": s["top_ks"],
                                                     "sinks": s["sinks"], "structure_window": s["structure_window"]})
        log(f"exported the indexers warmed up at L={trained} to {export_dir} (every length's: {out}/L<L>/"
            f"indexers.safetensors)")
    return experiment.finish(out, summary, lambda summary: write_figures(summary, out), report,
                             lambda summary: f"retrofit wall time {summary['wall_time_s']:.0f} s")


def run_length(model, tokens: dict, prompts: list, L: int, s: dict, base_id, folder: Path, overwrite: bool, device,
               log) -> dict:
    """Warm-up at L (or read back), then every k (passkey on `prompts`): -> {"warmup": ..., "<k>": summary}."""
    from safetensors.torch import load_file, save_file
    train = make_windows(tokens["train"], L, tokens["eos"])
    val = make_windows(tokens["val"], L, tokens["eos"])
    kl_w, eval_w = split_heldout(val, s["warmup_eval_windows"], s["eval_windows"])
    warm_key = fingerprint({"model": base_id.describe(), "L": L, **fingerprinted(s, WARMUP_KEYS)})
    eval_keys = {k: fingerprint({"warmup": warm_key, "k": k, **fingerprinted(s)}) for k in s["top_ks"]}
    records = {folder / "warmup.json": warm_key, **{folder / f"k{k}.json": key for k, key in eval_keys.items()}}
    # a stale warm-up takes the whole length with it (its evaluations used the old indexers); a stale k, itself
    experiment.clear_stale(folder, records, overwrite,
                           folder_of=lambda record: record.parent if record.name == "warmup.json" else record)
    warm_path, weights = folder / "warmup.json", folder / "indexers.safetensors"
    if warm_path.exists() and weights.exists():
        model.indexers.load_state_dict(load_file(weights))
        warm = read_json(warm_path)["warmup"]
        log(f"L={L}: warm-up read back ({warm['steps_used']} steps, {warm['stop_reason']})")
    else:
        torch.manual_seed(s["seed"])
        for indexer in model.indexers:  # every length starts from the same fresh indexers
            indexer.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        log(f"L={L}: indexer warm-up ({len(train)} training windows)")
        t0 = time.perf_counter()
        warm = {**warm_up(model, train, kl_w, s, device, log), "wall_time_s": time.perf_counter() - t0}
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.indexers.state_dict().items()}, weights)
        atomic_write_json(warm_path, {"config_fingerprint": warm_key, "warmup": warm})
    result = {"warmup": warm, "train_windows": len(train), "heldout_windows": len(val)}
    for k in s["top_ks"]:
        result[str(k)] = run_budget(model, train, val, eval_w, prompts, L, k, s, folder / f"k{k}.json", eval_keys[k],
                                    device, log)
    return result


def run_budget(model, train, val, eval_w, prompts: list, L: int, k: int, s: dict, path: Path, key: str, device,
               log) -> dict:
    """Stage 2 (if asked), evaluation, retrieval (copy probe, passkey `prompts`) and timing at (L, k): one run record
    at `path` (read back if there)."""
    def compute(_run) -> dict:
        t0 = time.perf_counter()
        tuned = None
        if s["steps"]:
            sparse, twin, stage2 = sparse_finetune(model, s, k, train, device, log)
            tuned = (sparse, twin)
        log(f"L={L} k={k}: evaluating {len(eval_w)} held-out windows")
        evaluation = evaluate(model, eval_w, k, s, device, tuned)
        entries, t1 = retrieval_entries(model, k, s, tuned), time.perf_counter()
        log(f"L={L} k={k}: copy probe, {s['probe_windows']} windows x {len(s['probe_distances'])} distances")
        probe = copy_probes(entries, val, L, s, device)
        log(f"L={L} k={k}: passkey, {len(prompts)} prompts ({time.perf_counter() - t1:.0f} s for the copy probe)")
        t2 = time.perf_counter()
        passkey = retrieval.passkey_eval(entries, prompts, device)
        summary = {**summarise_k(evaluation, probe, passkey), "timing": prefill_timing(model, eval_w[0], k, s, device),
                   "kept_pair_fraction": _kept(L, k), "wall_time_s": time.perf_counter() - t0,
                   "retrieval_wall_s": {"copy_probe": t2 - t1, "passkey": time.perf_counter() - t2}}
        if tuned is not None:
            summary["stage2"] = stage2
        log(table_for(L, k, summary))
        return {"summary": summary, "evaluation": evaluation, "probe": probe, "passkey": passkey}
    record = experiment.run_record(path, key, {"seq_len": L, "top_k": k}, compute, Execution(),
                                   path.parent / "resume", False, s, device)
    return record["summary"]


def _kept(L: int, k: int) -> float:
    from sparse_attention import kept_pair_fraction
    return kept_pair_fraction(L, k)


def generation_sample(model, tokenizer, tokens: dict, s: dict, device, prompt_len: int = 256, n_new: int = 12) -> dict:
    """Greedy continuations of a held-out prompt, dense and DSA at the smallest k (with the settings' structure),
    generated on the caches (retrofit_decode.generate: KV cache, and for DSA the indexer-key cache; prev_key
    indexers, which have no cached step, recompute: retrofit.greedy_generate)."""
    prompt_len = min(prompt_len, min(s["seq_lens"]) - n_new)  # within the indexers' RoPE tables
    val = torch.from_numpy(tokens["val"][:prompt_len].astype(np.int64))[None].to(device)
    k = min(s["top_ks"])
    plan = dsa_plan(s, k, s["attention_backend"])
    generate = retrofit_decode.generate if retrofit_decode.has_cached_path(model, plan) else retrofit.greedy_generate
    dense = retrofit_decode.generate(model, val, n_new, retrofit.Plan())
    dsa = generate(model, val, n_new, plan)
    return {"prompt_tokens": prompt_len, "top_k": k, "prompt_tail": tokenizer.decode(val[0, -48:].tolist()),
            "dense": tokenizer.decode(dense[0, prompt_len:].tolist()),
            "dsa": tokenizer.decode(dsa[0, prompt_len:].tolist())}


# ----------------------------------------------------------------------------- report and figures
def _ci(stat: dict | None, digits: int = 3, signed: bool = True) -> str:
    """mean [lo, hi] (signed: differences; unsigned: accuracies, recall); 'n/a' without a value."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    spec = f"{'+' if signed else ''}.{digits}f"
    lo, hi = stat["ci95"]
    if lo is None:
        return f"{stat['mean']:{spec}} (n = 1, no CI)"
    return f"{stat['mean']:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def _plain(stat: dict | None, digits: int = 3) -> str:
    return _ci(stat, digits, signed=False)


def _pm(stat: dict | None) -> str:
    """mean ± half the 95 % CI, two digits (per-layer cells)."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:.2f}" + (f"±{(hi - lo) / 2:.2f}" if lo is not None else "")


def _count(p: dict) -> str:
    """A proportion with its Wilson CI: 'c/n [lo, hi]'."""
    lo, hi = p["ci95"]
    return f"{p['correct']}/{p['n']} [{lo:.2f}, {hi:.2f}]" if p["n"] else "–"


def table_for(L: int, k: int, r: dict) -> str:
    """One (L, k) block: loss and Δ vs dense (CIs over evaluation windows), recall (CI over recall windows), copy
    probe at its farthest distance (CIs over probe windows), passkey accuracy (Wilson CI over trials) per mode."""
    rec = r["recall"]
    recall = {"dsa": rec["dsa"]["indexer_recall_ci95"], "oracle": rec["oracle"]["indexer_recall_ci95"],
              "sink_local": rec["sink_local"]["indexer_recall_ci95"], "local": rec["dsa"]["local_recall_ci95"],
              "random": rec["dsa"]["random_recall_ci95"]}
    probe, passkey = r["probe"]["by_distance"][str(r["probe"]["distance"])], r.get("passkey", {})
    rows = [f"| L | k | mode | loss (nats) | Δ vs dense [95 % CI] | recall | copy accuracy ({r['probe']['distance']} "
            f"back) | copy NLL | passkey |", "|---|---|---|---|---|---|---|---|---|"]
    for m, loss in r["loss"].items():
        delta = _ci(r["dsa_ft_minus_dense_ft"]) + " vs dense_ft" if m == "dsa_ft" else _ci(r["delta_vs_dense"].get(m))
        rows.append(f"| {L} | {k} | {m} | {_plain(loss, 4)} | {delta} | "
                    f"{_plain(recall[m]) if m in recall else '–'} | "
                    + (f"{_plain(probe[m]['accuracy'])} | {_plain(probe[m]['nll'])} |" if m in probe else "– | – |")
                    + f" {_count(passkey[m]['overall']) if m in passkey else '–'} |")
    t = r["timing"]
    rows.append(f"\nWindows: loss {r['windows']}, recall {rec['dsa']['windows']}, copy probe {r['probe']['windows']} "
                f"per distance; passkey {_trials(r)}. DSA − oracle: {_ci(r['dsa_minus_oracle'], 4)} nats over "
                f"{r['windows']} windows (kept pairs {r['kept_pair_fraction']:.3f}); prefill (median of "
                f"{t['repeats']}) {t['dense_ms']:.0f} ms dense vs {t['dsa_ms']:.0f} ms DSA ({t['backend']}; indexer "
                f"share {t['indexer_share']:.0%})")
    if "dsa_ft_minus_dense_ft" in r:
        rows.append(f"after stage 2: DSA − fine-tuned dense twin {_ci(r['dsa_ft_minus_dense_ft'], 4)} nats")
    return "\n".join(rows)


def _trials(r: dict) -> str:
    p = r.get("passkey", {}).get("dense")
    if not p:
        return "not run"
    return f"{p['overall']['n']} trials ({len(p['by_depth'])} depths × {p['by_depth'][0]['n']} keys)"


def report(summary: dict) -> str:
    """REPORT.md: what DSA costs this model at each budget, how close it is to the oracle, whether it retrieves
    (copy probe, passkey) and where its selection misses the token an answer needs; the warm-ups, timings."""
    s = summary["settings"]
    lines = [f"# Retrofit: DSA on {summary['model']} ({summary['model_type']})", "",
             f"Preset `{summary['preset']}`, held-out Shakespeare plays, "
             f"backend `{s['attention_backend']}`, wall time {summary['wall_time_s']:.0f} s. "
             f"Warm-up rule: {summary['plateau_rule']}.", "", READING, ""]
    for L, res in summary["results"].items():
        w = res["warmup"]
        lines += [f"## L = {L}", "",
                  f"Warm-up (one run, seed {s['seed']}): {w['steps_used']} steps ({w['stop_reason']}), held-out KL "
                  f"over {s['warmup_eval_windows']} windows {w['held_out_kl'][0]:.3f} → "
                  f"{w['held_out_kl'][-1]:.3f} ({w['kl_unit']}); {w['mean_step_s']:.1f} s/step, "
                  f"{w['wall_time_s']:.0f} s. Curve (step: KL): "
                  + ", ".join(f"{st}: {kl:.3f}" for st, kl in zip(w["steps"], w["held_out_kl"])), ""]
        for k, r in res.items():
            if k.isdigit():
                lines += [table_for(int(L), int(k), r), "", _stage2_line(r), _distance_line(r), _layer_line(r), "",
                          *_copy_lines(r), "", *_passkey_lines(r), ""]
    sample = summary.get("sample")
    if sample:
        lines += ["## Generation (greedy, held-out prompt)", "", f"…{sample['prompt_tail']!r}", "",
                  f"- dense: {sample['dense']!r}", f"- DSA (k={sample['top_k']}): {sample['dsa']!r}", ""]
    stage2 = " and `stage2.png`" if _stage2_budgets(summary) else ""
    lines += [f"Figures: `loss_vs_k.png`, `recall_by_distance.png`, `retrieval.png`, `passkey.png`{stage2}.", ""]
    return "\n".join(lines)


READING = (
    "How to read: loss = mean next-token NLL per held-out window; Δ = paired per-window difference vs dense with its "
    "95 % CI (Student-t over windows). Recall = share of the dense head-summed attention mass inside the selected set "
    "(rows with more than k past tokens; local/random from the same rows), mean over the recall windows of each "
    "window's value [95 % t CI]. Copy probe: filler with a held-out segment inserted `distance` tokens before its "
    "repeat at the end; top-1 accuracy / NLL on the repeat's tokens after its first, mean over windows [95 % t CI]. "
    "Passkey: the classic prompt (a 5-digit key in filler, asked for at the end); a trial counts when the greedy "
    "answer is the key exactly (one teacher-forced forward: every answer token the argmax); correct/trials "
    "[Wilson 95 % CI]. Hits: per layer, the share of answer rows whose selection **in the sparse forward that "
    "produced the answer** holds the token the answer copies (mean [or ± half the 95 % CI] over windows / trials).")


def _stage2_line(r: dict) -> str:
    """Stage 2's training curves in one line: first / last 10 steps' means (same batches for both models)."""
    s2 = r.get("stage2")
    if not s2:
        return ""
    ends = lambda xs: f"{statistics.mean(xs[:10]):.3f} → {statistics.mean(xs[-10:]):.3f}"  # noqa: E731
    gap = _stage2_gap(s2)
    return (f"Stage 2: {s2['steps']} steps at lr {s2['lr']:g}; training LM loss on the same batches (mean of the "
            f"first → last 10 steps): sparse {ends(s2['sparse_lm'])}, dense twin {ends(s2['dense_lm'])}, "
            f"sparse − twin {ends(gap)}; indexer KL {ends(s2['indexer_kl'])}.")


def _distance_line(r: dict) -> str:
    dsa, oracle = (r["recall"][n]["recall_by_distance_ci95"] for n in ("dsa", "oracle"))
    cells = [f"{2 ** b - 1}+: {_pm(d)} / {_pm(o)}" for b, (d, o) in enumerate(zip(dsa, oracle))
             if d["mean"] is not None and o["mean"] is not None]
    return (f"Recall by distance (tokens back: DSA / oracle, mean ± CI half-width over "
            f"{r['recall']['dsa']['windows']} windows): " + ", ".join(cells))


def _layer_line(r: dict) -> str:
    dsa, oracle = r["recall"]["dsa"]["by_layer_ci95"], r["recall"]["oracle"]["by_layer_ci95"]
    return (f"Recall by layer (DSA / oracle, ± CI half-width over {r['recall']['dsa']['windows']} windows): "
            + ", ".join(f"{i}: {_pm(d)} / {_pm(o)}" for i, (d, o) in enumerate(zip(dsa, oracle))))


def _copy_lines(r: dict) -> list[str]:
    """Copy probe per distance: accuracy per mode, and the mean over layers of the share of second-copy rows whose
    sparse-forward selection holds the token to copy; then that share per layer at the farthest distance."""
    by = r["probe"]["by_distance"]
    modes = list(next(iter(by.values())))
    sparse = [m for m in modes if "value_hit_mean" in by[next(iter(by))][m]]
    lines = ["Copy probe by distance (accuracy [95 % CI] over windows; then, for the sparse modes, the token to copy "
             "among the selected keys: mean over layers [CI]):", "",
             "| distance | windows | " + " | ".join(modes) + " | " + " | ".join(f"{m} hit" for m in sparse) + " |",
             "|---" * (2 + len(modes) + len(sparse)) + "|"]
    for d, res in sorted(by.items(), key=lambda item: int(item[0])):
        lines.append(f"| {d} | {res['dense']['windows']} | " + " | ".join(_plain(res[m]["accuracy"]) for m in modes)
                     + " | " + " | ".join(_plain(res[m]["value_hit_mean"], 2) for m in sparse) + " |")
    far = by[str(r["probe"]["distance"])]
    cells = zip(*[[{"mean": v, "ci95": ci} for v, ci in zip(far[m]["value_hit_by_layer"],
                                                           far[m]["value_hit_by_layer_ci95"])] for m in sparse])
    lines += ["", f"Copy probe at {r['probe']['distance']} back, the token to copy among the selected keys by layer "
              f"({' / '.join(sparse)}, ± CI half-width over {far['dense']['windows']} windows): "
              + ", ".join(f"{i}: " + " / ".join(_pm(c) for c in layer) for i, layer in enumerate(cells))]
    return lines


def _passkey_lines(r: dict) -> list[str]:
    """Passkey accuracy per mode and depth (correct/trials [Wilson CI]) and, per layer, whether the sparse forward's
    selection at the answer rows holds the needle's copy of the answer token."""
    pk = r.get("passkey")
    if not pk:
        return []
    depths = [f"{c['depth']:.0%}" for c in next(iter(pk.values()))["by_depth"]]
    lines = ["Passkey retrieval (greedy exact match; correct/trials [Wilson 95 % CI]) by needle depth:", "",
             "| mode | " + " | ".join(depths) + " | all depths | answer tokens right [CI] |",
             "|---" * (len(depths) + 3) + "|"]
    for m, e in pk.items():
        lines.append(f"| {m} | " + " | ".join(_count(c) for c in e["by_depth"]) + f" | {_count(e['overall'])} | "
                     f"{_plain(e['token_accuracy'], 2)} |")
    sparse = [m for m in pk if "hit_by_layer" in pk[m]]
    if sparse:
        lines += ["", "Passkey, the needle's copy of the answer token among the selected keys at the answer rows "
                  "(mean over layers [CI]: " + ", ".join(f"{m} {_plain(pk[m]['hit_mean'], 2)}" for m in sparse)
                  + f"), by layer ({' / '.join(sparse)}, ± CI half-width over trials): "
                  + ", ".join(f"{i}: " + " / ".join(_pm(c) for c in layer)
                              for i, layer in enumerate(zip(*[pk[m]["hit_by_layer"] for m in sparse])))]
    return lines


def write_figures(summary: dict, out: Path) -> list[str]:
    """loss_vs_k.png (per L, every mode with CI bars), recall_by_distance.png, retrieval.png, passkey.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = list(summary["results"])
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        ks = [k for k in summary["results"][L] if k.isdigit()]
        for m in summary["results"][L][ks[0]]["loss"]:
            stats = [summary["results"][L][k]["loss"][m] for k in ks]
            ax.errorbar([int(k) for k in ks], [st["mean"] for st in stats], marker="o", capsize=3, label=m,
                        yerr=[[st["mean"] - (st["ci95"][0] or st["mean"]) for st in stats],
                              [(st["ci95"][1] or st["mean"]) - st["mean"] for st in stats]])
        ax.set(xscale="log", xlabel="k (keys per query)", ylabel="held-out loss (nats)", title=f"L = {L}")
        ax.legend(fontsize=7)
    _save(fig, out / "loss_vs_k.png")
    budgets = [(L, k) for L in lengths for k in summary["results"][L] if k.isdigit()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for L, k in budgets:
        for name, style in (("dsa", "-"), ("oracle", ":")):
            rec = summary["results"][L][k]["recall"][name]["recall_by_distance"]
            ax.plot([2 ** b for b in range(len(rec))], [math.nan if v is None else v for v in rec], style,
                    marker=".", label=f"{name} L={L} k={k}")
    ax.set(xscale="log", xlabel="tokens back (bucket [2^b - 1, 2^(b+1) - 2], plotted at 2^b)",
           ylabel="share of dense attention mass kept", title="recall by distance")
    ax.legend(fontsize=6)
    _save(fig, out / "recall_by_distance.png")
    _retrieval_figure(summary, budgets, out / "retrieval.png")
    fig = passkey_figure(summary)  # constrained layout (its colour bar spans the panels): no tight_layout
    fig.savefig(out / "passkey.png", dpi=120)
    plt.close(fig)
    names = ["loss_vs_k.png", "recall_by_distance.png", "retrieval.png", "passkey.png"]
    if _stage2_budgets(summary):
        _stage2_figure(summary, out / "stage2.png")
        names.append("stage2.png")
    return names


def _stage2_gap(s2: dict) -> list[float]:
    """Per stage-2 step: the sparse model's training LM loss minus its dense twin's (same batch)."""
    return [a - b for a, b in zip(s2["sparse_lm"], s2["dense_lm"])]


def _stage2_budgets(summary: dict) -> list:
    return [(L, k) for L, res in summary["results"].items() for k, r in res.items()
            if k.isdigit() and r.get("stage2")]


def _stage2_figure(summary: dict, path: Path, smooth: int = 10) -> None:
    """Per budget with stage 2: the sparse model's training LM loss minus its dense twin's on the same batch (per
    step, and its running mean over `smooth` steps); beside it the indexer's sparse KL."""
    import matplotlib.pyplot as plt
    fig, (gap_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (L, k) in enumerate(_stage2_budgets(summary)):
        s2 = summary["results"][L][k]["stage2"]
        gap = _stage2_gap(s2)
        steps = range(1, len(gap) + 1)
        running = [statistics.mean(gap[max(0, j - smooth + 1):j + 1]) for j in range(len(gap))]
        gap_ax.plot(steps, gap, color=f"C{i}", alpha=0.3)
        gap_ax.plot(steps, running, color=f"C{i}", label=f"L={L} k={k} (running mean of {smooth})")
        kl_ax.plot(steps, s2["indexer_kl"], color=f"C{i}", label=f"L={L} k={k}")
    gap_ax.axhline(0, color="grey", lw=0.8)
    gap_ax.set(xlabel="stage-2 step", ylabel="sparse − dense twin (nats)",
               title="training LM loss, same batch: what sparsity costs")
    kl_ax.set(xlabel="stage-2 step", ylabel="KL (mean over layers, nats)", title="indexer's sparse KL")
    for ax in (gap_ax, kl_ax):
        ax.legend(fontsize=7)
    _save(fig, path)


def passkey_figure(summary: dict):
    """Heat maps of passkey accuracy, depth × L: one row per k, one panel per mode (dense, dsa, oracle, sink_local,
    and stage 2's when run)."""
    results = summary["results"]
    ks = sorted({int(k) for res in results.values() for k in res if k.isdigit()})
    panels = []
    for k in ks:
        per_L = {int(L): res[str(k)]["passkey"] for L, res in results.items() if str(k) in res}
        modes = list(next(iter(per_L.values())))
        panels += [(f"{m}, k = {k}", {L: pk[m] for L, pk in per_L.items()}) for m in modes]
    return retrieval.passkey_heatmaps(panels, ncols=len(panels) // len(ks))


def _retrieval_figure(summary: dict, budgets: list, path: Path) -> None:
    """Copy-probe accuracy by distance per mode and budget (CI bars); per layer, how often the sparse forward's
    selection holds the token to copy (farthest distance) and, on the passkey prompts, the needle's answer token."""
    import matplotlib.pyplot as plt
    fig, (ax, hits, keys) = plt.subplots(1, 3, figsize=(17, 4.5))
    for i, (L, k) in enumerate(budgets):
        r = summary["results"][L][k]
        by = r["probe"]["by_distance"]
        dists = sorted(by, key=int)
        for j, m in enumerate(by[dists[0]]):
            acc = [by[d][m]["accuracy"] for d in dists]
            ax.errorbar([int(d) for d in dists], [a["mean"] for a in acc], capsize=3, marker="o", color=f"C{j}",
                        ls=("-", "--", ":", "-.")[i % 4], label=f"{m} L={L} k={k}",
                        yerr=[[a["mean"] - (a["ci95"][0] if a["ci95"][0] is not None else a["mean"]) for a in acc],
                              [(a["ci95"][1] if a["ci95"][1] is not None else a["mean"]) - a["mean"] for a in acc]])
        far = by[str(r["probe"]["distance"])]
        for j, name in enumerate(by[dists[0]]):
            if "value_hit_by_layer" in far[name]:
                hits.plot(far[name]["value_hit_by_layer"], marker=".", color=f"C{j}", ls=("-", "--", ":", "-.")[i % 4],
                          label=f"{name} L={L} k={k}")
            if "hit_by_layer" in r.get("passkey", {}).get(name, {}):
                keys.plot([st["mean"] for st in r["passkey"][name]["hit_by_layer"]], marker=".", color=f"C{j}",
                          ls=("-", "--", ":", "-.")[i % 4], label=f"{name} L={L} k={k}")
    ax.set(xscale="log", xlabel="distance between the copies (tokens)", ylabel="top-1 accuracy on the repeat",
           ylim=(0, 1.02), title="copy probe (95 % CI over windows)")
    hits.set(xlabel="layer", ylabel="share of second-copy rows", ylim=(0, 1.02),
             title="copy probe (farthest): the token to copy selected")
    keys.set(xlabel="layer", ylabel="share of answer rows", ylim=(0, 1.02),
             title="passkey: the needle's answer token selected")
    for a in (ax, hits, keys):
        a.legend(fontsize=6)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
