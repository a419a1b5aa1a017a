"""`run_experiment.py --experiment retrofit`: DSA retrofitted onto a pretrained causal LM (retrofit.py), on
held-out Shakespeare plays.

Per length L: stage 1, the indexers' dense warm-up (model frozen; one no-grad forward per batch gives every
layer's input and head-summed attention; only the indexers train, on the paper's KL at lr 1e-3, until
`plateau.PlateauRule` stops it). Per (L, k): optional stage 2 (`steps` > 0: sparse fine-tuning beside a dense
twin on the same batches), then evaluation on held-out windows — dense, dsa, and the indexer-free controls
oracle / local / sink_local / random (paired per-window differences with 95 % CIs), recall overall and by
distance, a copy-retrieval probe, and prefill timing. Records are read back on the next invocation.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsa_lab.experiments import mqar
from dsa_lab.experiments import skeleton as experiment
from dsa_lab.interop import retrofit
from dsa_lab.training.data import STREAM_TRAIN, STREAM_WARMUP, BatchStream, load_documents, make_windows, split_documents, stream_seed
from config import DataConfig
from dsa_lab.common.plateau import PlateauRule, PlateauTracker
from dsa_lab.common.results_io import (atomic_write_json, fingerprint, mean_ci95, read_json,
                        run_environment)
from sparse_attention import SectionTimer, merge_recall_stats
from dsa_lab.training.train import Execution

MODES = ("dense", "dsa", "oracle", "local", "sink_local", "random")
CONTROLS = ("oracle", "local", "sink_local", "random")
# Presets use config.py's key names where config.py has the concept (warmup_steps: the warm-up's cap;
# warmup_eval_every / warmup_plateau_window / warmup_min_rel_improvement: its plateau rule; warmup_eval_windows:
# the held-out windows it measures the KL on; eval_windows: held-out windows per (L, k); learning_rate /
# indexer_lr: stage 2). Retrofit's own keys: top_ks (every k evaluated at every L), seed (one), batch_reuse,
# warmup_rows (query rows per warm-up step, 0 = all), recall_windows (windows whose dense forward measures recall,
# 0 = all), eval_backend (the quality evaluations' attention path), probe_windows (the copy probe's windows),
# timing_repeats, sinks, probe_segment, eval_modes (the modes evaluated beside dense: at least dsa and oracle), and the
# levers (LEVER_DEFAULTS below).
# The cpu preset's sizes come from per-forward costs of SmolLM2 measured on the 2-core CPU (2026-12-02, L 4096):
# dense 7 s, a sparse mode 10-19 s, the recall forward 121 s, a warm-up step of 256 rows 1.2 s + 12 s per batch
# (the forward keeping 1024 rows' targets); with 6 / 3 / 1 windows (evaluation / probe / recall) about 70 of the
# preset's minutes are L 4096's.
# Warm-up caps: SmolLM2 at L=1024 (quick's rule, 2026-12-02) reached its plateau at step 360 (held-out KL 2.96 ->
# 0.116; at step 200, the old cap, 0.157 and still falling ~5 % per 30 steps); the caps leave room above that.
PRESETS = {  # step caps and window counts per preset; every L gets its own warm-up
    "quick": dict(seq_lens=[1024], top_ks=[64], warmup_steps=500, warmup_eval_every=10, warmup_plateau_window=3,
                  warmup_eval_windows=2, eval_windows=8, probe_windows=4, timing_repeats=1, batch_reuse=4),
    # the lever ablation (issue 30): quick's length, budget, rule and windows at about half its cost — 256 sampled query
    # rows per warm-up step, recall on one window, only the modes a lever changes or is measured against
    "levers": dict(seq_lens=[1024], top_ks=[64], warmup_steps=500, warmup_eval_every=10, warmup_plateau_window=3,
                   warmup_eval_windows=2, eval_windows=8, probe_windows=4, timing_repeats=1, batch_reuse=4,
                   warmup_rows=256, recall_windows=1, eval_modes=["dsa", "oracle"]),
    "cpu": dict(seq_lens=[1024, 2048, 4096], top_ks=[64, 128, 256], warmup_steps=600, warmup_eval_every=10,
                warmup_plateau_window=3, warmup_eval_windows=2, eval_windows=6, probe_windows=3, recall_windows=1,
                timing_repeats=2, batch_reuse=4, warmup_rows=256),
    "default": dict(seq_lens=[1024, 2048, 4096, 8192], top_ks=[64, 128, 256], warmup_steps=1000,
                    warmup_eval_every=20, warmup_plateau_window=3, warmup_eval_windows=4, eval_windows=32,
                    probe_windows=16, recall_windows=8, timing_repeats=3, batch_reuse=4, warmup_rows=512),
}
# The levers of issue 30 (dsa_lab/interop/levers.py), each off at its default here (the paper's recipe):
# structure_window (> 0: DSA always keeps the first `sinks` and the last structure_window tokens, the indexer picks the
# other k - sinks - window, and its KL fits the target outside those kept keys), warmup_target (sum | group_max |
# head_max), row_weight / far_window (rows weighted toward target mass outside the kept keys), prev_key (the indexer key
# reads token s - 1 too), rank_weight / rank_top (a top-k-membership term beside the KL).
LEVER_DEFAULTS = dict(structure_window=0, warmup_target="sum", row_weight=0.0, far_window=64, prev_key=False,
                      rank_weight=0.0, rank_top=16)
COMMON = dict(batch_size=1, batch_reuse=1, warmup_rows=0, recall_windows=0, eval_backend="sdpa_mask",
              eval_modes=list(MODES[1:]),
              warmup_lr=1e-3, warmup_min_rel_improvement=0.02, steps=0,
              learning_rate=1e-5, indexer_lr=1e-3, sinks=4, probe_segment=64, attention_backend="gather", seed=42,
              indexer_heads=4, indexer_dim=64, indexer_rope_dim=32, **LEVER_DEFAULTS)
# `--levers NAME ...`: named lever settings, applied in order on top of the preset (capacity is the indexer's size)
LEVERS = {
    "structure": dict(structure_window=16),
    "group_max": dict(warmup_target="group_max"),
    "head_max": dict(warmup_target="head_max"),
    "far_rows": dict(row_weight=0.5),
    "prev_key": dict(prev_key=True),
    "heads16": dict(indexer_heads=16),
    "wide": dict(indexer_heads=32, indexer_dim=128),
    "rank": dict(rank_weight=0.1),
}
OVERRIDE_KEYS = ("seq_lens", "warmup_steps", "steps", "batch_size", "attention_backend")  # taken as they are


def settings_for(preset: str, overrides: dict) -> dict:
    """The preset's settings with the CLI's overrides (unknown preset or bad value: ValueError). Besides
    OVERRIDE_KEYS: top_k K evaluates [K], eval_windows halves probe_windows, seeds gives its first seed."""
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
        s["eval_windows"], s["probe_windows"] = overrides["eval_windows"], max(1, overrides["eval_windows"] // 2)
    if "seeds" in overrides:
        s["seed"] = overrides["seeds"][0]
    if s["attention_backend"] not in retrofit.BACKENDS:
        raise ValueError(f"--backend {s['attention_backend']!r} is not a retrofit backend; choose one of "
                         f"{', '.join(retrofit.BACKENDS)}")
    if any(L <= 2 * s["probe_segment"] for L in s["seq_lens"]):
        raise ValueError(f"seq_lens={s['seq_lens']} must exceed 2 * probe_segment={2 * s['probe_segment']}")
    if not {"dsa", "oracle"} <= set(s["eval_modes"]) <= set(MODES[1:]):
        raise ValueError(f"eval_modes={s['eval_modes']} must hold dsa and oracle and only modes of {MODES[1:]}")
    if s["structure_window"] and s["sinks"] + s["structure_window"] >= min(s["top_ks"]):
        raise ValueError(f"--levers structure keeps sinks + window = {s['sinks'] + s['structure_window']} tokens; "
                         f"use a --top-k above that")
    if s["steps"] < 0 or s["warmup_steps"] < 1 or s["eval_windows"] < 2:
        raise ValueError(f"--steps {s['steps']} must be >= 0, --warmup-steps {s['warmup_steps']} >= 1 and "
                         f"--eval-windows {s['eval_windows']} >= 2 (a CI needs two)")
    return s


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


def probe_windows(val: torch.Tensor, L: int, segment: int, n: int) -> torch.Tensor:
    """Copy-retrieval inputs (n, L): a held-out segment S, filler from another held-out window, S again. The
    second copy's tokens (after its first) are predictable only by looking L - segment tokens back."""
    idx = torch.linspace(0, len(val) - 1, min(2 * n, len(val))).long()
    rows = []
    for a, b in zip(idx[0::2].tolist(), idx[1::2].tolist()):
        seg = val[a, :segment]
        rows.append(torch.cat([seg, val[b, :L - 2 * segment], seg]))
    return torch.stack(rows)


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
    stream = BatchStream(train, s["batch_size"], stream_seed(s["seed"], STREAM_WARMUP))
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
    streams = [BatchStream(train, s["batch_size"], stream_seed(s["seed"], STREAM_TRAIN)) for _ in range(2)]
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
    recall = {name: {**merge_recall_stats([st for sts in layers.values() for st in sts]),
                     "by_layer": [merge_recall_stats(layers[i])["indexer_recall"] for i in sorted(layers)]}
              for name, layers in by_layer.items()}
    return {"loss_per_window": losses, "recall": recall}


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).item()


@torch.no_grad()
def retrieval_probe(model, probes: torch.Tensor, k: int, s: dict, device, tuned=None) -> dict:
    """Copy probe: NLL and top-1 accuracy on the second copy of the segment (its tokens after the first), per
    probe window and mode; for the sparse modes also, per layer, the share of those rows whose selection holds the
    token to copy ('value': L - m - 1 back) and the earlier copy of the current token ('key': L - m back)."""
    m = s["probe_segment"]
    out = {}
    for ids in probes:
        ids = ids[None].to(device)
        L = ids.shape[1]
        pred, target = slice(L - m, L - 1), ids[:, L - m + 1:]
        distance = torch.full((1, L), -1, dtype=torch.long)
        distance[0, pred] = L - m  # each predicting row's earlier copy; the token to copy is the one after it
        for name, net, plan in [("dense", model, retrofit.Plan())] + eval_entries(model, k, s, tuned):
            sparse = plan.selection != "dense"
            logits, aux = net(ids, dataclasses.replace(plan, keep_selection=sparse))
            logits = logits[:, pred].float()
            entry = out.setdefault(name, {"nll": [], "accuracy": []})
            entry["nll"].append(F.cross_entropy(logits.flatten(0, 1), target.flatten()).item())
            entry["accuracy"].append((logits.argmax(-1) == target).float().mean().item())
            if sparse:
                hits = mqar.answer_hits([aux.selected[i].cpu() for i in sorted(aux.selected)], distance)
                for part in ("key", "value"):
                    entry.setdefault(f"{part}_hit_by_layer", []).append([h[part] for h in hits])
    return {"distance": L - m, "segment": m, "per_window": out}


@torch.no_grad()
def prefill_timing(model, window: torch.Tensor, k: int, s: dict, device) -> dict:
    """Prefill wall time (B=1) of the dense model and of DSA with the indexer's share (median of repeats)."""
    inputs = window[None, :-1].to(device)
    cuda = device.type == "cuda"

    def timed_ms(plan):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(inputs, plan)
        if cuda:
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t0)

    timer = SectionTimer(cuda)
    dense = [timed_ms(retrofit.Plan()) for _ in range(s["timing_repeats"])]
    dsa = [timed_ms(dsa_plan(s, k, s["attention_backend"], timer=timer))
           for _ in range(s["timing_repeats"])]
    return {"dense_ms": statistics.median(dense), "dsa_ms": statistics.median(dsa),
            "indexer_share": timer.totals.get("indexer", 0.0) * 1000 / sum(dsa),
            "sparse_attention_share": timer.totals.get("attention", 0.0) * 1000 / sum(dsa),
            "backend": s["attention_backend"], "repeats": s["timing_repeats"]}


def summarise_k(evaluation: dict, probe: dict) -> dict:
    """Means with 95 % CIs over windows; paired per-window differences vs dense (and dsa vs oracle)."""
    losses = evaluation["loss_per_window"]
    diff = lambda a, b: mean_ci95([x - y for x, y in zip(losses[a], losses[b])])  # noqa: E731
    out = {"loss": {m: mean_ci95(v) for m, v in losses.items()},
           "delta_vs_dense": {m: diff(m, "dense") for m in losses if m != "dense"},
           "dsa_minus_oracle": diff("dsa", "oracle"),
           "recall": {n: {k: r[k] for k in ("indexer_recall", "random_recall", "local_recall", "recall_by_distance",
                                            "by_layer")} for n, r in evaluation["recall"].items()},
           "windows": len(losses["dense"])}
    if "dsa_ft" in losses:
        out["dsa_ft_minus_dense_ft"] = diff("dsa_ft", "dense_ft")
    pw = probe["per_window"]
    out["probe"] = {"distance": probe["distance"], "windows": len(pw["dense"]["nll"]),
                    **{m: _probe_mode_summary(v) for m, v in pw.items()}}
    return out


def _probe_mode_summary(per_window: dict) -> dict:
    """One mode's probe windows -> accuracy and NLL (mean ± CI), hit shares per layer (mean over windows)."""
    out = {"accuracy": mean_ci95(per_window["accuracy"]), "nll": mean_ci95(per_window["nll"])}
    for name in ("key_hit_by_layer", "value_hit_by_layer"):
        if name in per_window:  # windows x layers -> layers
            out[name] = [statistics.mean(layer) for layer in zip(*per_window[name])]
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
    results = {}
    for L in s["seq_lens"]:
        results[str(L)] = run_length(model, tokens, L, s, base_id, out / f"L{L}", overwrite, device, log)
    summary = {"experiment": "retrofit", "model": base_id.describe(), "model_type": base.config.model_type,
               "preset": preset, "settings": s, "environment": run_environment(device),
               "plateau_rule": PlateauRule(s["warmup_steps"], s["warmup_eval_every"], s["warmup_plateau_window"],
                                           s["warmup_min_rel_improvement"]).describe(),
               "wall_time_s": time.perf_counter() - t_start, "results": results}
    summary["sample"] = generation_sample(model, tokenizer, tokens, s, device)
    if export_dir:
        retrofit.export_retrofit(model, export_dir, {"trained_seq_len": max(s["seq_lens"]), "top_ks": s["top_ks"]})
        log(f"exported the indexers (warmed up at L={max(s['seq_lens'])}) to {export_dir}")
    return experiment.finish(out, summary, lambda summary: write_figures(summary, out), report,
                             lambda summary: f"retrofit wall time {summary['wall_time_s']:.0f} s")


def run_length(model, tokens: dict, L: int, s: dict, base_id, folder: Path, overwrite: bool, device, log) -> dict:
    """Warm-up at L (or read back), then every k: -> {"warmup": ..., "<k>": summary}."""
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
        result[str(k)] = run_budget(model, train, val, eval_w, L, k, s, folder / f"k{k}.json", eval_keys[k], device,
                                    log)
    return result


def run_budget(model, train, val, eval_w, L: int, k: int, s: dict, path: Path, key: str, device, log) -> dict:
    """Stage 2 (if asked), evaluation, probe and timing at (L, k): one run record at `path` (read back if there)."""
    def compute(_run) -> dict:
        t0 = time.perf_counter()
        tuned = None
        if s["steps"]:
            sparse, twin, stage2 = sparse_finetune(model, s, k, train, device, log)
            tuned = (sparse, twin)
        log(f"L={L} k={k}: evaluating {len(eval_w)} held-out windows")
        evaluation = evaluate(model, eval_w, k, s, device, tuned)
        probe = retrieval_probe(model, probe_windows(val, L, s["probe_segment"], s["probe_windows"]), k, s, device,
                                tuned)
        summary = {**summarise_k(evaluation, probe), "timing": prefill_timing(model, eval_w[0], k, s, device),
                   "kept_pair_fraction": _kept(L, k), "wall_time_s": time.perf_counter() - t0}
        if tuned is not None:
            summary["stage2"] = stage2
        log(table_for(L, k, summary))
        return {"summary": summary, "evaluation": evaluation, "probe": probe}
    record = experiment.run_record(path, key, {"seq_len": L, "top_k": k}, compute, Execution(),
                                   path.parent / "resume", False, s, device)
    return record["summary"]


def _kept(L: int, k: int) -> float:
    from sparse_attention import kept_pair_fraction
    return kept_pair_fraction(L, k)


def generation_sample(model, tokenizer, tokens: dict, s: dict, device, prompt_len: int = 256, n_new: int = 12) -> dict:
    """Greedy continuations of a held-out prompt, dense and DSA at the smallest k (the model generates)."""
    prompt_len = min(prompt_len, min(s["seq_lens"]) - n_new)  # within the indexers' RoPE tables
    val = torch.from_numpy(tokens["val"][:prompt_len].astype(np.int64))[None].to(device)
    k = min(s["top_ks"])
    dense = retrofit.greedy_generate(model, val, n_new, retrofit.Plan())
    dsa = retrofit.greedy_generate(model, val, n_new, dsa_plan(s, k, s["attention_backend"]))
    return {"prompt_tokens": prompt_len, "top_k": k, "prompt_tail": tokenizer.decode(val[0, -48:].tolist()),
            "dense": tokenizer.decode(dense[0, prompt_len:].tolist()),
            "dsa": tokenizer.decode(dsa[0, prompt_len:].tolist())}


# ----------------------------------------------------------------------------- report and figures
def _ci(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]" if lo is not None else \
        f"{stat['mean']:+.{digits}f}"


def table_for(L: int, k: int, r: dict) -> str:
    """One (L, k) block: loss, Δ vs dense with its CI, recall, probe accuracy per mode."""
    rec = r["recall"]
    recall = {"dsa": rec["dsa"]["indexer_recall"], "oracle": rec["oracle"]["indexer_recall"],
              "sink_local": rec["sink_local"]["indexer_recall"], "local": rec["dsa"]["local_recall"],
              "random": rec["dsa"]["random_recall"]}
    rows = ["| L | k | mode | loss (nats) | Δ vs dense [95 % CI] | recall | probe accuracy | probe NLL |",
            "|---|---|---|---|---|---|---|---|"]
    for m, loss in r["loss"].items():
        probe = r["probe"].get(m, {})
        delta = _ci(r["dsa_ft_minus_dense_ft"]) + " vs dense_ft" if m == "dsa_ft" else _ci(r["delta_vs_dense"].get(m))
        rows.append(f"| {L} | {k} | {m} | {loss['mean']:.4f} | {delta} | " +
                    (f"{recall[m]:.3f} |" if m in recall else "– |"))
        rows[-1] += f" {probe['accuracy']['mean']:.3f} | {probe['nll']['mean']:.3f} |" if probe else " – | – |"
    rows.append(f"\nDSA − oracle: {_ci(r['dsa_minus_oracle'], 4)} nats over {r['windows']} windows "
                f"(kept pairs {r['kept_pair_fraction']:.3f}); prefill {r['timing']['dense_ms']:.0f} ms dense vs "
                f"{r['timing']['dsa_ms']:.0f} ms DSA ({r['timing']['backend']}; indexer share "
                f"{r['timing']['indexer_share']:.0%})")
    if "dsa_ft_minus_dense_ft" in r:
        rows.append(f"after stage 2: DSA − fine-tuned dense twin {_ci(r['dsa_ft_minus_dense_ft'], 4)} nats")
    return "\n".join(rows)


def report(summary: dict) -> str:
    """REPORT.md: what DSA costs this model at each budget, how close it is to the oracle, whether it finds far
    tokens; the warm-ups, the probe, timings, and how to read them."""
    lines = [f"# Retrofit: DSA on {summary['model']} ({summary['model_type']})", "",
             f"Preset `{summary['preset']}`, held-out Shakespeare plays, "
             f"backend `{summary['settings']['attention_backend']}`, wall time {summary['wall_time_s']:.0f} s. "
             f"Warm-up rule: {summary['plateau_rule']}.", "",
             "Loss = mean next-token NLL per held-out window; Δ = paired per-window difference vs dense with its 95 % "
             "CI (Student-t over windows). Recall = share of the dense head-summed attention mass inside the "
             "selected set (rows with more than k past tokens; local/random from the same rows). Probe: a held-out "
             "segment, filler, the segment again; accuracy/NLL on the second copy (the needed tokens lie "
             "`distance` back).", ""]
    for L, res in summary["results"].items():
        w = res["warmup"]
        lines += [f"## L = {L}", "",
                  f"Warm-up: {w['steps_used']} steps ({w['stop_reason']}), held-out KL {w['held_out_kl'][0]:.3f} → "
                  f"{w['held_out_kl'][-1]:.3f} ({w['kl_unit']}); {w['mean_step_s']:.1f} s/step, "
                  f"{w['wall_time_s']:.0f} s. Curve (step: KL): "
                  + ", ".join(f"{s}: {kl:.3f}" for s, kl in zip(w["steps"], w["held_out_kl"])), ""]
        for k, r in res.items():
            if k.isdigit():
                lines += [table_for(int(L), int(k), r), "", _stage2_line(r), _distance_line(r), _layer_line(r),
                          _probe_line(r), ""]
    sample = summary.get("sample")
    if sample:
        lines += ["## Generation (greedy, held-out prompt)", "", f"…{sample['prompt_tail']!r}", "",
                  f"- dense: {sample['dense']!r}", f"- DSA (k={sample['top_k']}): {sample['dsa']!r}", ""]
    stage2 = " and `stage2.png`" if _stage2_budgets(summary) else ""
    lines += [f"Figures: `loss_vs_k.png`, `recall_by_distance.png`, `retrieval.png`{stage2}.", ""]
    return "\n".join(lines)


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
    dsa, oracle = (r["recall"][n]["recall_by_distance"] for n in ("dsa", "oracle"))
    cells = [f"{2 ** b - 1}+: {d:.2f}/{o:.2f}" for b, (d, o) in enumerate(zip(dsa, oracle))
             if d is not None and o is not None]
    return "Recall by distance (tokens back: DSA/oracle): " + ", ".join(cells)


def _layer_line(r: dict) -> str:
    dsa, oracle = r["recall"]["dsa"]["by_layer"], r["recall"]["oracle"]["by_layer"]
    return "Recall by layer (DSA/oracle): " + ", ".join(f"{i}: {d:.2f}/{o:.2f}" for i, (d, o) in
                                                        enumerate(zip(dsa, oracle)))


def _probe_line(r: dict) -> str:
    """Per layer, the share of the copy probe's second-copy rows whose selection holds the token to copy."""
    probe = r["probe"]
    names = [m for m in ("dsa", "oracle", "sink_local") if "value_hit_by_layer" in probe.get(m, {})]
    if not names:
        return ""
    cells = zip(*[probe[m]["value_hit_by_layer"] for m in names])
    means = ", ".join(f"{m} {statistics.mean(probe[m]['value_hit_by_layer']):.2f}" for m in names)
    return (f"Copy probe, the token to copy among the selected keys (share of second-copy rows; mean over layers: "
            f"{means}), by layer ({'/'.join(names)}): " + ", ".join(
                f"{i}: " + "/".join(f"{v:.2f}" for v in vals) for i, vals in enumerate(cells)))


def write_figures(summary: dict, out: Path) -> list[str]:
    """loss_vs_k.png (per L, every mode with CI bars), recall_by_distance.png, retrieval.png."""
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
    names = ["loss_vs_k.png", "recall_by_distance.png", "retrieval.png"]
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


def _retrieval_figure(summary: dict, budgets: list, path: Path) -> None:
    """Copy-probe accuracy per mode and budget; beside it, per layer, how often DSA's and the oracle's selections
    hold the token to copy."""
    import matplotlib.pyplot as plt
    fig, (ax, hits) = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(budgets) * 6) + 5, 4),
                                   gridspec_kw={"width_ratios": [max(1.0, 1.2 * len(budgets)), 1]})
    for i, (L, k) in enumerate(budgets):
        probe = summary["results"][L][k]["probe"]
        names = [m for m in probe if isinstance(probe[m], dict)]
        ax.bar([f"{m}\nL{L} k{k}" for m in names], [probe[m]["accuracy"]["mean"] for m in names],
               color=f"C{i}", label=f"L={L} k={k}: copy {probe['distance']} tokens back")
        for name, style in (("dsa", "-"), ("oracle", ":")):
            if "value_hit_by_layer" in probe.get(name, {}):
                hits.plot(probe[name]["value_hit_by_layer"], style, marker=".", color=f"C{i}", label=f"{name} L={L} k={k}")
    ax.set(ylabel="top-1 accuracy on the repeated segment", title="retrieval (copy) probe")
    ax.tick_params(axis="x", labelsize=6)
    ax.legend(fontsize=7)
    hits.set(xlabel="layer", ylabel="share of second-copy rows", ylim=(0, 1.02),
             title="the token to copy among the selected keys")
    hits.legend(fontsize=6)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
