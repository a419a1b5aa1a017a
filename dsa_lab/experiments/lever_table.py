"""The lever ablation's table (issue 30): several retrofit runs of one preset — the first one the reference (the
paper's recipe), each other one a lever — compared at every (L, k) they share, paired over the held-out windows they all
evaluated (same seed and windows: the runs must agree on them, or the table refuses).

    python -m dsa_lab.experiments.lever_table results/levers/baseline results/levers/structure ... --out results/levers

Per run: DSA − dense, DSA − oracle, DSA − the reference's DSA (paired per window), the copy probe per distance with
its paired difference to the reference, passkey correct/trials (Wilson CI; Fisher's exact test against the
reference — conservative, the trials being the same prompts), warm-up steps and wall times. Holm over the family of
every lever × (loss, copy probe at each distance, passkey). Beside the table, where each run's retrieval stands: per
layer, the share of the farthest copy rows whose DSA selection holds the token to copy (the oracle's beside it), and
the passkey by depth (dense, oracle, every run's DSA). Writes levers.md and levers.png (the same, as panels and a heat
map); a bad folder is one line and exit status 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from dsa_lab.common.results_io import atomic_write_text, mean_ci95, read_json
from dsa_lab.experiments.skeleton import significance, summary_path
from dsa_lab.experiments.retrieval import wilson_ci95
from dsa_lab.interop.levers import LEVER_DEFAULTS

PAIRING_KEYS = ("seed", "eval_windows", "probe_windows", "probe_distances", "passkey_depths", "passkey_trials",
                "passkey_filler", "eval_backend")


def run_name(summary: dict) -> str:
    """The levers a run names, else what its preset is: the paper's recipe (every lever off) or its adopted levers."""
    named = summary["settings"]["levers"]
    if named:
        return "+".join(named)
    paper = all(summary["settings"].get(n, v) == v for n, v in LEVER_DEFAULTS.items())
    return "paper's recipe" if paper else f"{summary.get('preset', 'its preset')} (adopted levers)"


def load_runs(folders: list[Path]) -> list[dict]:
    """Each folder's summary.json (ValueError naming the folder when it is missing or pairs differently)."""
    runs = []
    for folder in folders:
        path = summary_path(folder)
        if not path.exists():
            raise ValueError(f"{folder}: no summary.json; give folders written by --experiment retrofit")
        summary = read_json(path)
        if summary.get("experiment") != "retrofit":
            raise ValueError(f"{folder}: not a retrofit run (experiment {summary.get('experiment')!r})")
        runs.append({"name": run_name(summary), "folder": str(folder), **summary})
    first = runs[0]["settings"]
    for run in runs[1:]:
        differ = [key for key in PAIRING_KEYS if run["settings"].get(key) != first.get(key)]
        if differ:
            raise ValueError(f"{run['folder']} evaluated other windows or trials than {runs[0]['folder']} "
                             f"({', '.join(differ)} differ); compare runs of one preset and seed")
    return runs


def fisher_p(a: int, n: int, b: int, m: int) -> float:
    """Two-sided Fisher exact test of a/n vs b/m (sum of the tables at most as likely as the observed one)."""
    total, hits = n + m, a + b

    def prob(x):
        return math.comb(n, x) * math.comb(m, hits - x) / math.comb(total, hits)

    observed = prob(a)
    return min(1.0, sum(prob(x) for x in range(max(0, hits - m), min(n, hits) + 1) if prob(x) <= observed * (1 + 1e-9)))


def compare(runs: list[dict]) -> dict:
    """-> {"L/k": {"rows": [per run], dense and oracle references}}; each lever row's tests against the first run
    ("loss", "copy <d>", "passkey") carry their Holm-adjusted p over the whole table (`skeleton.significance`)."""
    ref, out, comparisons = runs[0], {}, []
    for L, per_k in ref["results"].items():
        for k in (key for key in per_k if key.isdigit()):
            base, far = per_k[k], farthest(per_k[k])
            rows = [_row(run, run["results"][L][k], base, comparisons, f"{L}/{k}") for run in runs
                    if k in run["results"].get(L, {})]
            out[f"{L}/{k}"] = {"rows": rows, "dense_copy": {d: r["dense"]["accuracy"]["mean"] for d, r in
                                                            base["probe"]["by_distance"].items()},
                               "dense_passkey": base["passkey"]["dense"]["overall"],
                               "oracle_passkey": base["passkey"]["oracle"]["overall"],
                               "far": far, "oracle_copy_hit": base["probe"]["by_distance"][far]["oracle"][
                                   "value_hit_by_layer"],
                               "passkey_by_depth": {m: base["passkey"][m]["by_depth"] for m in ("dense", "oracle")}}
    for test in significance(comparisons)["tests"]:
        test["row"]["p_holm"][test["test"]] = test["p_holm"]
    return out


def farthest(r: dict) -> str:
    """The copy probe's farthest distance in an (L, k) record (a key of its by_distance)."""
    return max(r["probe"]["by_distance"], key=int)


def _row(run: dict, r: dict, base: dict, comparisons: list, budget: str) -> dict:
    """One run at one (L, k) against the reference's record `base`; its tests join `comparisons`."""
    row = {"name": run["name"], "budget": budget, "warmup_steps": run["results"][budget.split("/")[0]]["warmup"][
        "steps_used"], "wall_s": run["wall_time_s"], "dsa_minus_dense": r["delta_vs_dense"]["dsa"],
        "dsa_minus_oracle": r["dsa_minus_oracle"], "copy": {}, "copy_vs_reference": {}, "p_holm": {},
        "passkey": r["passkey"]["dsa"]["overall"], "passkey_by_depth": r["passkey"]["dsa"]["by_depth"],
        "copy_hit": r["probe"]["by_distance"][farthest(r)]["dsa"]["value_hit_by_layer"]}  # [layer] share of rows
    for d, probe in r["probe"]["by_distance"].items():
        row["copy"][d] = probe["dsa"]["accuracy"]
    if r is base:
        return row

    def paired(test: str, mine: list, theirs: list, lower_is_better: bool) -> dict:
        diffs = [x - y for x, y in zip(mine, theirs)]
        comparisons.append({"row": row, "test": test, "differences": diffs, "lower_is_better": lower_is_better})
        return mean_ci95(diffs)

    row["vs_reference"] = paired("loss", r["loss"]["dsa"]["per_seed"], base["loss"]["dsa"]["per_seed"], True)
    for d, probe in r["probe"]["by_distance"].items():
        row["copy_vs_reference"][d] = paired(f"copy {d}", probe["dsa"]["accuracy"]["per_seed"],
                                             base["probe"]["by_distance"][d]["dsa"]["accuracy"]["per_seed"], False)
    mine, theirs = row["passkey"], base["passkey"]["dsa"]["overall"]
    comparisons.append({"row": row, "test": "passkey", "differences": [], "lower_is_better": False,
                        "p": fisher_p(mine["correct"], mine["n"], theirs["correct"], theirs["n"])})
    return row


# ----------------------------------------------------------------------------- report
def _ci(stat: dict | None, signed: bool = True) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = stat["ci95"]
    return f.format(stat["mean"]) + ("" if lo is None else f" [{f.format(lo)}, {f.format(hi)}]")


def _p(row: dict, test: str) -> str:
    p = row["p_holm"].get(test)
    return "" if p is None else f" (Holm p {p:.2g})"


def markdown(table: dict, runs: list[dict]) -> str:
    """The lever table per (L, k): one row per run, differences vs the first run paired over windows."""
    lines = ["# Lever ablation", "", "Runs: " + ", ".join(f"{r['name']} (`{r['folder']}`)" for r in runs) + ".",
             "DSA − reference: paired per held-out window against the first run's DSA; copy probe: DSA accuracy and "
             "its paired difference to the reference; passkey: greedy exact match, Fisher's exact test against the "
             "reference. Holm over every lever × test in this table.", ""]
    for budget, b in table.items():
        distances = list(b["dense_copy"])
        lines += [f"## L/k = {budget}", "", "Dense: copy " + ", ".join(f"{d} back {v:.3f}" for d, v in
                  b["dense_copy"].items()) + f"; passkey {b['dense_passkey']['correct']}/{b['dense_passkey']['n']} "
                  f"(oracle {b['oracle_passkey']['correct']}/{b['oracle_passkey']['n']}).", "",
                  "| run | warm-up steps | wall (s) | DSA − dense | DSA − oracle | DSA − reference | "
                  + " | ".join(f"copy {d} back (Δ vs reference)" for d in distances) + " | passkey |",
                  "|---" * (7 + len(distances)) + "|"]
        for row in b["rows"]:
            copies = [_ci(row["copy"][d], signed=False) + (f" ({_ci(row['copy_vs_reference'][d])}"
                      f"{_p(row, f'copy {d}')})" if d in row["copy_vs_reference"] else "") for d in distances]
            pk = row["passkey"]
            lines.append(f"| {row['name']} | {row['warmup_steps']} | {row['wall_s']:.0f} | "
                         f"{_ci(row['dsa_minus_dense'])} | {_ci(row['dsa_minus_oracle'])} | "
                         f"{_ci(row.get('vs_reference'))}{_p(row, 'loss')} | " + " | ".join(copies)
                         + f" | {pk['correct']}/{pk['n']} [{pk['ci95'][0]:.2f}, {pk['ci95'][1]:.2f}]{_p(row, 'passkey')} |")
        lines += ["", *_layer_lines(b), "", *_passkey_lines(b), ""]
    return "\n".join(lines)


def retrieving_layers(b: dict) -> list[int]:
    """The layers whose oracle selection holds the token to copy (farthest distance) in at least half the rows."""
    return [i for i, hit in enumerate(b["oracle_copy_hit"]) if hit >= 0.5]


def _layer_lines(b: dict) -> list[str]:
    """Per run: the share of the farthest copy rows whose DSA selection holds the token to copy, by layer."""
    layers = retrieving_layers(b)
    if not layers:
        return [f"No layer's oracle selection holds the token to copy at {b['far']} back in half the rows."]
    head = [f"Token to copy among the selected keys at {b['far']} back (share of the probe's rows; the layers where "
            "the oracle's selection holds it in at least half the rows):", "",
            "| run | " + " | ".join(f"layer {i}" for i in layers) + " |", "|---" * (1 + len(layers)) + "|"]
    rows = [(row["name"], row["copy_hit"]) for row in b["rows"]] + [("oracle", b["oracle_copy_hit"])]
    return head + [f"| {name} | " + " | ".join(f"{hits[i]:.2f}" for i in layers) + " |" for name, hits in rows]


def _passkey_lines(b: dict) -> list[str]:
    """Passkey correct / trials by depth: dense, the oracle, then DSA of every run."""
    rows = [(m, b["passkey_by_depth"][m]) for m in ("dense", "oracle")] + [
        (f"DSA, {row['name']}", row["passkey_by_depth"]) for row in b["rows"]]
    depths = [d["depth"] for d in rows[0][1]]
    return (["Passkey by depth (correct / trials):", "", "| model | " + " | ".join(f"{d:.0%}" for d in depths)
             + " |", "|---" * (1 + len(depths)) + "|"]
            + [f"| {name} | " + " | ".join(f"{d['correct']}/{d['n']}" for d in by) + " |" for name, by in rows])


def figure(table: dict, path: Path) -> None:
    """Per (L, k), two rows of panels: copy accuracy by distance per run (dense dashed), passkey accuracy per run,
    DSA − oracle; then the token to copy among the selected keys by layer, and the passkey heat map by depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(15, 8 * len(table)))
    grid = fig.add_gridspec(2 * len(table), 3)
    for i, (budget, b) in enumerate(table.items()):
        colors = [f"C{j % 10}" for j in range(len(b["rows"]))]  # one colour per run, every panel
        _copy_panel(fig.add_subplot(grid[2 * i, 0]), budget, b, colors)
        _bars(fig.add_subplot(grid[2 * i, 1]), b, [row["passkey"] for row in b["rows"]], colors,
              "DSA passkey accuracy (dense dashed)", "passkey", dense=b["dense_passkey"]["accuracy"])
        _bars(fig.add_subplot(grid[2 * i, 2]), b, [{"accuracy": g["mean"], "ci95": g["ci95"]} for g in
              (row["dsa_minus_oracle"] for row in b["rows"])], colors, "held-out loss DSA − oracle (nats)",
              "what the indexer costs")
        _layer_panel(fig.add_subplot(grid[2 * i + 1, :2]), b, colors)
        _passkey_heat_map(fig.add_subplot(grid[2 * i + 1, 2]), b)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _copy_panel(ax, budget: str, b: dict, colors: list) -> None:
    distances = list(b["dense_copy"])
    width = 0.8 / len(b["rows"])
    for i, row in enumerate(b["rows"]):
        means = [row["copy"][d]["mean"] for d in distances]
        errs = [[m - (row["copy"][d]["ci95"][0] or m) for d, m in zip(distances, means)],
                [(row["copy"][d]["ci95"][1] or m) - m for d, m in zip(distances, means)]]
        ax.bar([j + i * width for j in range(len(distances))], means, width, yerr=errs, label=row["name"],
               color=colors[i])
    for j, d in enumerate(distances):
        ax.hlines(b["dense_copy"][d], j - 0.1, j + 0.9, colors="k", linestyles="--")
    ax.set(xticks=[j + 0.4 - width / 2 for j in range(len(distances))], xticklabels=[f"{d} back" for d in distances],
           ylabel="DSA copy accuracy (dense dashed)", ylim=(0, 1), title=f"copy probe, L/k {budget}")
    ax.legend(fontsize=7, loc="lower left")


def _bars(ax, b: dict, stats: list, colors: list, ylabel: str, title: str, dense: float | None = None) -> None:
    """One bar per run: stats[i]["accuracy"] with its ci95."""
    values = [st["accuracy"] for st in stats]
    ax.bar([row["name"] for row in b["rows"]], values, color=colors,
           yerr=[[v - (st["ci95"][0] if st["ci95"][0] is not None else v) for v, st in zip(values, stats)],
                 [(st["ci95"][1] if st["ci95"][1] is not None else v) - v for v, st in zip(values, stats)]])
    if dense is not None:
        ax.axhline(dense, color="k", linestyle="--")
        ax.set_ylim(0, 1.05)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=20)


def _layer_panel(ax, b: dict, colors: list) -> None:
    for row, color in zip(b["rows"], colors):
        ax.plot(row["copy_hit"], marker="o", color=color, label=f"DSA, {row['name']}")
    ax.plot(b["oracle_copy_hit"], color="k", linestyle="--", label="oracle top-k")
    ax.set(xlabel="layer", ylabel="share of copy rows", ylim=(0, 1.02),
           title=f"token to copy among the selected keys, {b['far']} back")
    ax.legend(fontsize=8)


def _passkey_heat_map(ax, b: dict) -> None:
    names = ["dense", "oracle"] + [f"DSA, {row['name']}" for row in b["rows"]]
    rows = [b["passkey_by_depth"]["dense"], b["passkey_by_depth"]["oracle"]] + [r["passkey_by_depth"] for r in b["rows"]]
    grid = [[d["correct"] / d["n"] for d in by] for by in rows]
    ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for y, by in enumerate(rows):
        for x, d in enumerate(by):
            ax.text(x, y, f"{d['correct']}/{d['n']}", ha="center", va="center", fontsize=8)
    ax.set(xticks=range(len(rows[0])), xticklabels=[f"{d['depth']:.0%}" for d in rows[0]], yticks=range(len(names)),
           yticklabels=names, xlabel="passkey depth", title="passkey by depth")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare retrofit lever runs (the first is the reference).")
    parser.add_argument("folders", nargs="+", type=Path, help="retrofit --out folders; the first = the reference")
    parser.add_argument("--out", type=Path, default=Path("results/levers"), help="where levers.md/.png go")
    args = parser.parse_args(argv)
    try:
        if len(args.folders) < 2:
            raise ValueError("give at least two run folders: the reference first, then the levers")
        runs = load_runs(args.folders)
    except ValueError as error:
        print(f"lever_table: {error}", file=sys.stderr)
        return 2
    table = compare(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "levers.md", markdown(table, runs))
    figure(table, args.out / "levers.png")
    print(markdown(table, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
