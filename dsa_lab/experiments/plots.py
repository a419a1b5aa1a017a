"""Every matplotlib figure (Agg backend: files only, no screen needed)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dsa_lab.common.plateau import STOP_PLATEAU  # noqa: E402

MODEL_STYLE = {"classic": {"color": "tab:blue", "label": "classic (dense)"},
               "sparse": {"color": "tab:orange", "label": "sparse (DSA)"}}


def _metric_vs_length(ax, summary: dict, metric: str, ylabel: str, scale: float = 1.0, floor=None) -> None:
    lengths = summary["sequence_lengths"]
    for model, style in MODEL_STYLE.items():
        stats = [summary["results"][str(L)][model][metric] for L in lengths]
        mean = np.array([s["mean"] * scale for s in stats])
        ax.plot(lengths, mean, "o-", **style)
        if all(s["ci95"][0] is not None for s in stats):
            lo = np.array([s["ci95"][0] * scale for s in stats])
            hi = np.array([s["ci95"][1] * scale for s in stats])
            ax.fill_between(lengths, lo if floor is None else np.maximum(lo, floor), hi, color=style["color"],
                            alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("sequence length L")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def sequence_length_comparison(summary: dict, curves_at_largest: dict, path: str | Path) -> None:
    """2x2: final val loss, val accuracy, time/step vs L (mean, 95 % CI band over seeds),
    and the validation-loss curves at the largest L (mean over seeds)."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    n = len(summary["seeds"])
    band = f"mean ± 95% CI over {n} seeds" if n > 1 else "1 seed, no CI"
    lengths = summary["sequence_lengths"]
    ax = axes[0, 0]
    deltas = [summary["results"][str(L)]["sparse"].get("delta_val_loss_vs_classic") for L in lengths]
    if all(deltas):
        _band(ax, lengths, deltas, MODEL_STYLE["sparse"]["color"], "sparse − classic (paired by seed)")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        kept = [summary["results"][str(L)].get("kept_pair_fraction") for L in lengths]
        ax.set_xticks(lengths, [f"{L}\nkept {f:.0%}" if f else str(L) for L, f in zip(lengths, kept)])
        ax.set_ylabel("val loss difference (lower: sparse better)")
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        _metric_vs_length(ax, summary, "final_val_loss", "final validation loss (lower is better)")
    _metric_vs_length(axes[0, 1], summary, "final_val_accuracy", "validation next-token accuracy")
    _metric_vs_length(axes[1, 0], summary, "avg_time_per_step", "training time per step (ms)", scale=1000, floor=0.0)
    ax = axes[1, 1]
    L = max(summary["sequence_lengths"])
    for model, style in MODEL_STYLE.items():
        runs = curves_at_largest[model]
        steps = runs[0]["steps"]
        vals = np.array([r["val_loss"] for r in runs])
        ax.plot(steps, vals.mean(0), "o-", **style)
        if len(runs) > 1:
            ax.fill_between(steps, vals.min(0), vals.max(0), color=style["color"], alpha=0.2)
    ax.set_xlabel("step after the branch point")
    ax.set_ylabel("validation loss")
    ax.set_title(f"val loss during training, L={L} (band: seed min-max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(f"Sparse (DSA) vs classic attention on held-out text — {band}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selection_heatmaps(selected: list[np.ndarray], tokens: list[str], path: str | Path) -> None:
    """One panel per layer: (query t, key s) cells the indexer selected (1) or not (0); above the
    diagonal is the future and must stay empty."""
    n = len(selected)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 5.5 * rows), squeeze=False)
    L = selected[0].shape[0]
    step = max(1, L // 16)
    for i, mask in enumerate(selected):
        ax = axes[i // cols, i % cols]
        ax.imshow(mask, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"layer {i}: selected keys per query")
        ax.set_xlabel("key position s")
        ax.set_ylabel("query position t")
        ticks = list(range(0, L, step))
        ax.set_xticks(ticks, [tokens[t][:6] for t in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [tokens[t][:6] for t in ticks], fontsize=7)
    for j in range(n, rows * cols):
        axes[j // cols, j % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _stat(summary, name, L, metric, scale=1.0):
    s = summary[name][str(L)].get(metric)
    return (math.nan, 0.0) if not s or s["mean"] is None else (
        s["mean"] * scale, 0.0 if s["ci95"][0] is None else (s["ci95"][1] - s["ci95"][0]) * scale / 2)


def optimization_comparison(summary: dict, names: list[str], L: int, path: str | Path) -> None:
    """Bars per strategy at one length: val loss, time/step, indexer ms, indexer recall (95 % CI error bars)."""
    panels = [("val_loss", "validation loss", 1), ("avg_time_per_step", "time per step (ms)", 1000),
              ("indexer_ms", "indexer forward (ms/step)", 1), ("indexer_recall", "indexer recall", 1)]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    x = np.arange(len(names))
    for ax, (metric, label, scale) in zip(axes.flat, panels):
        vals = [_stat(summary, n, L, metric, scale) for n in names]
        ax.bar(x, [v[0] for v in vals], yerr=[v[1] for v in vals], color="tab:orange", capsize=3)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        if metric == "val_loss":
            finite = [v[0] for v in vals if np.isfinite(v[0])]
            if finite:
                ax.set_ylim(min(finite) * 0.98, max(finite) * 1.02)
    fig.suptitle(f"Lightning-indexer strategies at L={L} (error bars: 95 % CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def speed_quality_tradeoffs(summary: dict, names: list[str], lengths: list[int], front_fn, path: str | Path,
                            title: str = "Speed-quality trade-off") -> None:
    """Rows: cost = time per step, and attention + indexer FLOPs per token (counts the selected keys);
    one panel per length: cost vs val loss per strategy with 95 % CI error bars on both axes, the Pareto
    front in red, and front points whose CI boxes overlap another front point's drawn hollow (not separable)."""
    from dsa_lab.experiments.reports import overlapping
    costs = [("avg_time_per_step", "time per training step (ms)", 1000),
             ("total_flops_per_token", "attention + indexer MFLOP per token", 1e-6)]
    fig, axes = plt.subplots(len(costs), len(lengths), figsize=(6 * len(lengths), 5 * len(costs)), squeeze=False)
    for row, (metric, label, scale) in enumerate(costs):
        for ax, L in zip(axes[row], lengths):
            present = [n for n in names if str(L) in summary.get(n, {})
                       and np.isfinite(_stat(summary, n, L, metric, scale)[0])]
            pts = {n: (_stat(summary, n, L, metric, scale), _stat(summary, n, L, "val_loss")) for n in present}
            front = front_fn({n: (c[0], l[0]) for n, (c, l) in pts.items()})
            tied = overlapping({n: (c[0] - c[1], c[0] + c[1], l[0] - l[1], l[0] + l[1]) for n, (c, l) in pts.items()
                                if n in front}, front)
            for n, ((c, ce), (l, le)) in pts.items():
                color = "tab:red" if n in front else "tab:gray"
                ax.errorbar(c, l, xerr=ce, yerr=le, fmt="o", color=color, ecolor=color, capsize=3, zorder=3,
                            markerfacecolor="white" if n in tied else color)
                ax.annotate(n, (c, l), fontsize=7, xytext=(3, 3), textcoords="offset points")
            fx = [(pts[n][0][0], pts[n][1][0]) for n in front]
            ax.plot([p[0] for p in fx], [p[1] for p in fx], "r--", label="Pareto front (hollow: CIs overlap)")
            ax.set_xlabel(label)
            ax.set_ylabel("validation loss")
            ax.set_title(f"L={L}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title + " (error bars: 95 % CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scaling_analysis(summary: dict, names: list[str], lengths: list[int], path: str | Path) -> None:
    """time/step, indexer ms, peak step memory, selected keys per query, total FLOPs/token and val loss vs L
    per strategy (log scale for the costs)."""
    panels = [("avg_time_per_step", "time per step (ms)", 1000, True), ("indexer_ms", "indexer forward (ms/step)", 1, True),
              ("step_peak_memory_mb", "peak memory of a training step (MB)", 1, True),
              ("mean_selected_keys", "selected keys per query", 1, True),
              ("total_flops_per_token", "attention + indexer MFLOP/token", 1e-6, True),
              ("val_loss", "validation loss", 1, False)]
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    axes = axes.flatten()
    for ax, (metric, label, scale, log) in zip(axes, panels):
        for n in names:
            Ls = [L for L in lengths if str(L) in summary.get(n, {})]
            ax.plot(Ls, [_stat(summary, n, L, metric, scale)[0] for L in Ls], "o-", label=n)
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- long-context study
LONG_CONTEXT_STYLE = {"dense": "tab:blue", "dsa": "tab:orange", "local": "tab:green", "random": "tab:gray",
                      "block": "tab:purple", "oracle": "tab:red", "dsa_levers": "tab:brown"}


def _band(ax, lengths, stats, color, label, scale=1.0, floor=None):
    mean = np.array([s["mean"] * scale if s["mean"] is not None else np.nan for s in stats])
    ax.plot(lengths, mean, "o-", color=color, label=label)
    if all(s["ci95"][0] is not None for s in stats):
        lo = np.array([s["ci95"][0] * scale for s in stats])
        hi = np.array([s["ci95"][1] * scale for s in stats])
        ax.fill_between(lengths, lo if floor is None else np.maximum(lo, floor), hi, color=color, alpha=0.2)


def long_context(summary: dict, models: list[str], path: str | Path) -> None:
    """long_context_figure(...) written to `path`."""
    fig = long_context_figure(summary, models)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def long_context_figure(summary: dict, models: list[str]):
    """The panels of what was run: per task run its quality vs L (LM: val loss − dense, paired per seed; MQAR: answer
    accuracy; 95 % CI bands with several seeds), time per step (band floored at 0), and recall of dense attention mass
    by query-key distance at the largest length (with DSA's ceiling, the oracle top-k, dashed) when a model selects."""
    res = summary["results"]
    panels = [(_long_context_quality, task) for task in ("lm", "mqar") if task in res]
    task = "lm" if "lm" in res else "mqar"
    panels.append((_long_context_time, task))
    if any("recall_by_distance" in res[task][str(max(map(int, res[task])))].get(name, {}) for name in models):
        panels.append((_long_context_recall, task))
    cols = len(panels) if len(panels) <= 3 else 2
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(6.5 * cols, 4.5 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, (draw, task) in zip(axes.flat, panels):
        draw(ax, summary, models, task)
    fig.tight_layout()
    return fig


def _seeds_note(summary: dict, task: str) -> str:
    seeds = summary.get("seeds", {}).get(task, [])
    return "mean ± 95% CI over seeds" if len(seeds) > 1 else "one seed (no CI)"


def _long_context_quality(ax, summary: dict, models: list[str], task: str) -> None:
    res = summary["results"][task]
    metric, ylabel = (("delta_val_loss_vs_dense", "val loss − dense (paired)") if task == "lm"
                      else ("accuracy", "MQAR answer accuracy"))
    lengths = sorted(int(L) for L in res)
    for name in models:
        if task == "lm" and name == "dense":
            continue
        _band(ax, lengths, [res[str(L)][name][metric] for L in lengths], LONG_CONTEXT_STYLE[name], name)
    if task == "lm":
        ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{L}\n(k/L pairs {res[str(L)]['kept_pair_fraction']:.0%})" for L in lengths])
    ax.set_ylabel(ylabel)
    ax.set_title(f"{task}: k = {res[str(lengths[0])]['top_k']}, {_seeds_note(summary, task)}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # LM with dense alone: nothing to label
        ax.legend()


def _long_context_time(ax, summary: dict, models: list[str], task: str) -> None:
    res = summary["results"][task]
    lengths = sorted(int(L) for L in res)
    for name in models:
        _band(ax, lengths, [res[str(L)][name]["avg_time_per_step"] for L in lengths], LONG_CONTEXT_STYLE[name],
              name, scale=1000, floor=0.0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_ylabel("ms per training step")
    ax.set_title(f"{task}: time per step (same run)")
    ax.grid(alpha=0.3)
    ax.legend()


def _long_context_recall(ax, summary: dict, models: list[str], task: str) -> None:
    res = summary["results"][task]
    L = str(max(int(length) for length in res))
    for name in models:
        recall = res[L][name].get("recall_by_distance")
        if recall:
            ax.plot([2 ** b for b in range(len(recall))], recall, "o-", color=LONG_CONTEXT_STYLE[name], label=name)
        ceiling = res[L][name].get("oracle_recall_by_distance")
        if name == "dsa" and ceiling:
            ax.plot([2 ** b for b in range(len(ceiling))], ceiling, "--", color=LONG_CONTEXT_STYLE[name],
                    label="dsa's ceiling (oracle top-k of its attention)")
    _distance_axes(ax, "dense attention mass kept", f"{task} L={L}: recall by distance",
                   "tokens back (bucket [2^b − 1, 2^(b+1) − 2], plotted at 2^b)")


def _distance_axes(ax, ylabel: str, title: str, xlabel: str = "query − key distance (tokens, bucket start)") -> None:
    """A panel over power-of-two query-key distance buckets: log2 x axis, labels, grid, legend."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def warmup_curves(summary: dict, path: str | Path) -> bool:
    """warmup_curves_figure(...) written to `path` -> False (nothing written) when no record has a warm-up curve."""
    fig = warmup_curves_figure(summary)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def warmup_curves_figure(summary: dict):
    """Held-out warm-up KL vs step of DSA, one panel per task run, one colour per L, one line per seed; a cross
    where the plateau rule stopped the warm-up, a square where the step cap did. -> the figure, or None when no
    record has a warm-up curve."""
    runs = {task: [(int(L), seed, rec) for L, entry in by_L.items()
                   for seed, rec in (entry.get("dsa", {}).get("warmup_plateau") or {}).items() if rec]
            for task, by_L in summary["results"].items()}
    runs = {task: r for task, r in runs.items() if r}
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.5), squeeze=False)
    for ax, (task, curves) in zip(axes[0], runs.items()):
        lengths = sorted({L for L, _, _ in curves})
        colours = dict(zip(lengths, plt.cm.viridis(np.linspace(0, 0.9, len(lengths)))))
        for L, seed, rec in sorted(curves, key=lambda c: (c[0], c[1])):
            label = f"L={L}" if seed == min(s for length, s, _ in curves if length == L) else None
            ax.plot(rec["steps"], rec["held_out_kl"], "-", color=colours[L], alpha=0.8, label=label)
            ax.plot(rec["steps"][-1:], rec["held_out_kl"][-1:], "x" if rec["stop_reason"] == STOP_PLATEAU else "s",
                    color=colours[L])
        ax.set(yscale="log", xlabel="warm-up step", ylabel="held-out KL (summed over layers)",
               title=f"{task}: DSA indexer warm-up (x: plateau, square: step cap)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def mqar_accuracy_by_distance(summary: dict, models: list[str], path: str | Path) -> None:
    """MQAR accuracy per query-key distance bucket, one panel per length (mean over seeds)."""
    res = summary["results"]["mqar"]
    lengths = sorted(int(L) for L in res)
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for name in models:
            by = res[str(L)][name]["accuracy_by_distance"]
            starts = [int(k.split("-")[0]) for k in by]
            ax.plot(starts, list(by.values()), "o-", color=LONG_CONTEXT_STYLE[name], label=name)
        ax.axvline(res[str(L)]["top_k"], color="black", lw=0.8, ls="--", label="k")
        ax.set_ylim(-0.02, 1.02)
        _distance_axes(ax, "answer accuracy", f"MQAR L={L}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


ADAPTIVE_STYLE = {"dense": "tab:blue", "fixed25": "tab:green", "fixed50": "tab:olive", "fixed75": "tab:brown",
                  "adaptive": "tab:red", "matched": "tab:purple"}


def _errorbars(ax, lengths, stats, color, label, offset: float = 0.0, scale: float = 1.0, spread=None):
    """Means vs L with 95 % CI error bars (or `spread`: per-L half-widths), x nudged by 2**offset (log axis)."""
    x = [L * 2 ** offset for L in lengths]
    mean = np.array([s["mean"] * scale if s["mean"] is not None else np.nan for s in stats])
    if spread is not None:
        err = np.array([spread, spread]) * scale
    elif all(s["ci95"][0] is not None for s in stats):
        err = np.abs(np.array([[s["ci95"][0] * scale for s in stats], [s["ci95"][1] * scale for s in stats]]) - mean)
    else:
        err = None
    ax.errorbar(x, mean, yerr=err, fmt="o-", color=color, label=label, capsize=3)


def adaptive_sparsity(summary: dict, models: list[str], path: str | Path) -> None:
    """2x3 for the adaptive-sparsity experiment, vs L (mean, 95 % CI error bars over seeds, models nudged apart):
    val loss − dense and − matched (paired by seed), time per step, the share k_t / (t+1) kept over the second half
    of the windows (error bars: its spread over queries, what adapts); the adaptive model's kept share vs the
    complexity it measured (one point per held-out window) and its kept share over training."""
    res = summary["results"]
    lengths = sorted(int(L) for L in res)
    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    offsets = {name: 0.04 * (i - (len(models) - 1) / 2) for i, name in enumerate(models)}

    def by_length(ax, name, metric, scale=1.0, spread=None):
        if all(metric in res[str(L)][name] for L in lengths):
            _errorbars(ax, lengths, [res[str(L)][name][metric] for L in lengths], ADAPTIVE_STYLE[name], name,
                       offsets[name], scale, spread)

    for ax, metric, ylabel, skip in ((axes[0, 0], "delta_val_loss_vs_dense", "val loss − dense (paired)", "dense"),
                                     (axes[0, 1], "delta_val_loss_vs_matched", "val loss − matched (paired)", "matched")):
        for name in models:
            if name not in ("dense", skip):
                by_length(ax, name, metric)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(ylabel)
    for name in models:
        by_length(axes[0, 2], name, "avg_time_per_step", 1000)
        by_length(axes[1, 0], name, "share_mean", spread=[res[str(L)][name]["share_std"]["mean"] for L in lengths])
    axes[0, 2].set_ylabel("ms per training step (same run)")
    axes[1, 0].set_ylabel("k_t / (t+1), second half of the windows (bars: spread)")
    if "adaptive" in models:
        for L in lengths:
            points = np.array(res[str(L)]["adaptive"]["k_vs_complexity"]).reshape(-1, 3)
            axes[1, 1].scatter(points[:, 0], points[:, 2] / ((L + 1) / 2), s=12, alpha=0.6, label=f"L={L}")
            curve = res[str(L)]["adaptive"]["k_curve"]
            axes[1, 2].plot(curve["steps"], np.array(curve["k_mean"]) / ((L + 1) / 2), "o-", label=f"adaptive L={L}")
            if "matched" in models:
                matched = res[str(L)]["matched"]["k_curve"]
                axes[1, 2].plot(matched["steps"], np.array(matched["k_mean"]) / ((L + 1) / 2), "--", color="gray",
                                label=f"matched L={L}")
    axes[1, 1].set_xlabel("complexity the controller measured (window mean)")
    axes[1, 1].set_ylabel("adaptive: keys / dense keys (window mean)")
    axes[1, 1].set_title("chosen k vs complexity (held-out windows, all seeds)")
    axes[1, 2].set_xlabel("sparse-training step")
    axes[1, 2].set_ylabel("keys / dense keys (held-out, mean over seeds)")
    axes[1, 2].set_title("chosen k over training")
    for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0]):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.set_xlabel("sequence length L")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    n = len(summary["seeds"])
    fig.suptitle(f"Adaptive vs fixed sparsity on held-out text — {f'mean ± 95% CI over {n} seeds' if n > 1 else '1 seed'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
