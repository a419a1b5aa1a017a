"""Report text: the Markdown tables and REPORT.md pages the runners write beside their figures (dsa_lab/experiments/plots.py).

Everything here reads summaries (dicts of mean_ci95 stats, as written to summary.json) and returns text.
"""
from __future__ import annotations

import math

from dsa_lab.common.results_io import ALPHA, mean_ci95, paired_tests


def fmt_ci(stat: dict, digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± half-width' (or just the mean for one seed)."""
    if stat is None or stat.get("mean") is None:
        return "n/a"
    mean = stat["mean"] * scale
    lo, hi = stat["ci95"]
    if lo is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(hi - lo) * scale / 2:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def significance_text(sig: dict, question: str) -> str:
    """The paired tests of one question (experiment.significance) as a line with their count and correction, and
    a table: the comparison's labels, Δ (comparison − reference, mean ± CI), p, p (Holm), verdict."""
    tests = sig["tests"]
    if not tests:
        return "No significance test (nothing to compare in this run)."
    labels = [k for k in tests[0] if k not in ("delta", "p", "p_holm", "verdict")]
    head = (f"{sig['n_tests']} paired t-test(s) ({question}), Holm-Bonferroni corrected across all of them, "
            f"family-wise alpha = {sig['alpha']}." if sig["n_tests"]
            else "One seed: the comparisons cannot be tested (run more seeds).")
    rows = [[*(t[k] for k in labels), fmt_ci(t["delta"]), "n/a" if t["p"] is None else f"{t['p']:.3g}",
             "n/a" if t["p_holm"] is None else f"{t['p_holm']:.3g}", t["verdict"]] for t in tests]
    return head + "\n\n" + markdown_table([*labels, "Δ (paired)", "p", "p (Holm)", "verdict"], rows)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (cost, loss), both lower-is-better."""
    front = []
    for name, (c, l) in points.items():
        if not any((c2 <= c and l2 <= l) and (c2 < c or l2 < l) for n2, (c2, l2) in points.items() if n2 != name):
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def significance(entry: dict, p_adjusted: float | None = None) -> str:
    """'better' / 'worse' / 'n.s.' / 'untestable (1 seed)'. With `p_adjusted` (Holm, from `holm_family`):
    significant when it is below ALPHA; without it: whether the paired 95 % CI of the loss difference
    excludes 0 (one comparison on its own, uncorrected)."""
    d = entry.get("delta_val_loss_vs_baseline")
    if not d or d["ci95"][0] is None:
        return "untestable (1 seed)"
    if p_adjusted is not None:
        return ("better" if d["mean"] < 0 else "worse") if p_adjusted < ALPHA else "n.s."
    lo, hi = d["ci95"]
    return "better" if hi < 0 else "worse" if lo > 0 else "n.s."


def holm_family(summary: dict, names: list[str], lengths: list[int], baseline: str = "baseline") -> dict:
    """The comparisons of one question: every variant but the baseline at every length, a paired t-test of
    its per-seed val-loss difference to the baseline, Holm-adjusted across the family.
    -> {(name, L): {'p': raw, 'p_holm': adjusted}} for the testable ones (>= 2 paired seeds)."""
    differences = {}
    for L in lengths:
        for name in names:
            if name == baseline or str(L) not in summary.get(name, {}):
                continue
            d = summary[name][str(L)].get(f"delta_val_loss_vs_{baseline}")
            if d:
                differences[(name, L)] = d["per_seed"]
    tested = paired_tests(differences)
    return {key: {"p": t["p"], "p_holm": t["p_holm"]} for key, t in tested.items() if t["p"] is not None}


def family_verdict(family: dict, n_untestable: int) -> str:
    """One line: how many comparisons were made, the correction, and what was found."""
    m = len(family)
    if not m:
        return (f"No significance test: {n_untestable} comparison(s) with the baseline have one seed each "
                f"(run more seeds).")
    hits = sorted(f"{n} (L={L}, p_Holm={v['p_holm']:.3g})" for (n, L), v in family.items() if v["p_holm"] < ALPHA)
    head = (f"Multiple comparisons: {m} paired t-tests against the baseline (variants x lengths of this question), "
            f"Holm-Bonferroni corrected, family-wise alpha = {ALPHA}.")
    if not hits:
        return head + f" **No significant difference** from the baseline in any of the {m} comparisons."
    return head + f" Significant after correction ({len(hits)} of {m}): " + ", ".join(hits) + "."


def overlapping(boxes: dict[str, tuple[float, float, float, float]], names: list[str]) -> set[str]:
    """Names among `names` whose 95 % CI box (cost_lo, cost_hi, loss_lo, loss_hi) overlaps another's in both
    axes: front points that the data cannot tell apart."""
    out = set()
    for a in names:
        for b in names:
            if a != b:
                (c0, c1, l0, l1), (d0, d1, m0, m1) = boxes[a], boxes[b]
                if c0 <= d1 and d0 <= c1 and l0 <= m1 and m0 <= l1:
                    out.add(a)
    return out


def _box(stat: dict, scale: float = 1.0) -> tuple[float, float]:
    lo, hi = stat["ci95"]
    return (stat["mean"] * scale, stat["mean"] * scale) if lo is None else (lo * scale, hi * scale)


def front_text(summary: dict, names: list[str], L: int, cost: str) -> str:
    """Pareto front in (cost, val loss), cheapest first; '≈' marks front points whose CIs overlap another's."""
    present = [n for n in names if str(L) in summary.get(n, {}) and summary[n][str(L)][cost]["mean"] is not None]
    front = pareto_front({n: (summary[n][str(L)][cost]["mean"], summary[n][str(L)]["val_loss"]["mean"])
                          for n in present})
    boxes = {n: (*_box(summary[n][str(L)][cost]), *_box(summary[n][str(L)]["val_loss"])) for n in front}
    tied = overlapping(boxes, front)
    return ", ".join(f"{n}{' ≈' if n in tied else ''}" for n in front)


def warmup_phrase(train: dict) -> str:
    """How long the indexer warm-up ran, from a run's train config (older runs had no rule: a fixed count)."""
    if train.get("warmup_until_plateau", False):
        return f"until its held-out KL plateaus (at most {train['warmup_steps']} steps)"
    return f"for {train['warmup_steps']} steps"


def warmup_table(runs: list[tuple[list, dict | None]], labels: list[str]) -> str:
    """The warm-ups' stopping record (train.run_stage's `plateau`, one row per run keyed by `labels`): steps used,
    why it stopped (plateau: the rule; step_cap: still improving at warmup_steps; fixed_steps: the rule was off) and
    the held-out KL curve's first, lowest and last values. The rule is stated above the table."""
    rows = []
    for key, record in runs:
        if not record:
            rows.append([*key, "n/a", "n/a (a record without the warm-up curve)", ""])
            continue
        kl = record["held_out_kl"]
        curve = f"{kl[0]:.4g} → {kl[-1]:.4g} (lowest {min(kl):.4g}, {len(kl)} evaluations)" if kl else "not measured"
        rows.append([*key, record["steps_used"], record["stop_reason"] or "no steps", curve])
    rules = sorted({record["rule"] for _, record in runs if record})
    stopped = sum(1 for _, record in runs if record and record["stop_reason"] == "plateau")
    head = (f"Warm-up rule: {'; '.join(rules) or 'n/a'}. Ended by the plateau rule: {stopped} of {len(runs)} "
            f"warm-ups (the others ran to the cap, or a fixed count).")
    return head + "\n\n" + markdown_table([*labels, "steps used", "stopped by", "held-out KL (first → last)"], rows)


# ----------------------------------------------------------------------------- sparse_vs_classic
def sweep_table(summary: dict) -> str:
    """The sequence-length sweep, one row per L: classic vs sparse quality, speed and indexer recall."""
    header = ["L", "k", "kept pairs", "classic val loss", "sparse val loss", "sparse − classic (paired)",
              "classic acc %", "sparse acc %", "classic ms/step", "sparse ms/step", "recall after warm-up",
              "recall final", "random", "local (last k)"]
    rows = []
    for L in summary["sequence_lengths"]:
        r = summary["results"][str(L)]
        c, s = r["classic"], r["sparse"]
        kept = f"{r['kept_pair_fraction']:.0%}" if "kept_pair_fraction" in r else "n/a"
        rows.append([L, r["top_k"], kept, fmt_ci(c["final_val_loss"]), fmt_ci(s["final_val_loss"]),
                     fmt_ci(s.get("delta_val_loss_vs_classic")),
                     fmt_ci(c["final_val_accuracy"], 1, 100), fmt_ci(s["final_val_accuracy"], 1, 100),
                     fmt_ci(c["avg_time_per_step"], 1, 1000), fmt_ci(s["avg_time_per_step"], 1, 1000),
                     fmt_ci(s["warmup_indexer_recall"]), fmt_ci(s["indexer_recall"]), fmt_ci(s["random_recall"]),
                     fmt_ci(s["local_recall"])])
    return markdown_table(header, rows)


def sweep_report(summary: dict, table: str) -> str:
    cfg = summary["config"]
    n = len(summary["seeds"])
    m, t = cfg["model"], cfg["train"]
    return f"""# Sparse (DSA) vs classic attention — sequence-length sweep

Data: `{cfg['data']['dataset']}`, {cfg['corpus']['train_docs']} training / {cfg['corpus']['val_docs']} held-out
documents ({cfg['corpus']['train_tokens']:,} / {cfg['corpus']['val_tokens']:,} tokens), tokenizer `{cfg['data']['tokenizer']}`
(vocab {m['vocab_size']}). Model: d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads, d_ff {m['d_ff']},
{m['num_experts']} experts top-{m['expert_top_k']}; indexer {m['indexer_heads']} heads x {m['indexer_dim']} dims;
backend `{m['attention_backend']}`. Seeds {summary['seeds']} ({'mean ± 95 % CI half-width' if n > 1 else 'one seed: no CI'}).

Schedule per seed: {t['dense_steps']} shared dense pre-training steps -> branch; classic trains {t['steps']} more
dense steps; sparse warms its indexer up (main model frozen, KL to dense attention) {warmup_phrase(t)} (see
*Warm-up* below), then trains {t['steps']} sparse steps on the same batches in the same order.

{table}

{significance_text(summary["significance"], "sparse vs classic val loss at every length")}

- *val loss / acc*: held-out documents only, {t['eval_windows']} fixed windows per length. *sparse − classic
  (paired)*: the per-seed difference (both models branch from the same weights, so seed noise cancels); a CI
  that contains 0 means no measurable difference. *kept pairs*: selected causal (query, key) pairs / all causal
  pairs — with k = L/2 most pairs are kept and sparsity cannot matter; see `--experiment long_context`.
- *recall*: share of the dense attention mass (summed over heads) that falls inside the indexer's top-k set,
  over query positions with more than k past tokens; *random* is a random k-subset's expected recall, *local*
  the recall of simply keeping the last k tokens. An indexer worth its cost beats both.
- *ms/step*: wall time of a training step on this machine, measured in the same run for both models.
  The `masked` backend computes dense scores and masks them, so it cannot be faster than dense; speed comes
  from the sparse kernels (see benchmark.py).

## Warm-up

{sweep_warmups(summary)}
"""


def sweep_warmups(summary: dict) -> str:
    """One row per (L, seed): how the sparse model's indexer warm-up ended."""
    runs = [([L, seed], (entry.get("warmup") or {}).get(seed))
            for L, entry in sorted(summary["results"].items(), key=lambda kv: int(kv[0]))
            for seed in map(str, summary["seeds"])]
    return warmup_table(runs, ["L", "seed"])


# ----------------------------------------------------------------------------- variants vs the baseline
COLUMNS = """*Δ vs baseline* is paired by seed. *p (Holm)*: paired t-test of the per-seed loss difference, Holm-Bonferroni
corrected across every comparison of the question (variants x lengths; the count is printed above each
table); *vs baseline*: better/worse when that corrected p < 0.05, else n.s. *keys/query*: mean selected keys
per query (a strategy that selects more keys is not budget-matched with the baseline); *attn MFLOP/tok*:
main attention FLOPs per token over those keys; *indexer MFLOP/tok*: the indexer's projections + scores over
the causal prefix; *indexer KB/tok*: the indexer's bit-width-aware bytes moved per token (what quantisation
saves; fake quantisation is not faster on CPU). *step peak MB*: memory allocated during one sparse training
step (fwd + bwd) above the resident weights (CUDA: max_memory_allocated; CPU: profiler allocation peak).
*top-k overlap vs fp32*: the low-precision indexer's top-k against the same trained indexer in fp32.
*indexer ms*: indexer + top-k forward time per step. Timings and memory are from this run's machine (its
name, torch and dtype are in every record): compare them as ratios."""
def results_table(summary: dict, names: list[str], L: int, family: dict | None = None) -> str:
    """Markdown table of the variants at one length, best validation loss first. `family`: holm_family(...)
    of the question (p and verdict Holm-corrected); without it the verdict is the uncorrected paired CI."""
    rows = []
    present = [n for n in names if str(L) in summary.get(n, {})]
    for name in sorted(present, key=lambda n: summary[n][str(L)]["val_loss"]["mean"]):
        e = summary[name][str(L)]
        test = (family or {}).get((name, L))
        p_text = "—" if name == "baseline" else "n/a" if test is None else f"{test['p_holm']:.3g}"
        rows.append([name, fmt_ci(e["val_loss"]), fmt_ci(e.get("delta_val_loss_vs_baseline")), p_text,
                     "—" if name == "baseline" else significance(e, test["p_holm"] if test else None),
                     fmt_ci(e["val_accuracy"], 1, 100), fmt_ci(e["avg_time_per_step"], 1, 1000),
                     fmt_ci(e.get("time_ratio_vs_baseline"), 2), fmt_ci(e.get("mean_selected_keys"), 1),
                     fmt_ci(e.get("attention_flops_per_token"), 2, 1e-6), fmt_ci(e.get("indexer_flops_per_token"), 2, 1e-6),
                     fmt_ci(e.get("indexer_bytes_per_token"), 1, 1e-3), fmt_ci(e.get("step_peak_memory_mb"), 1),
                     fmt_ci(e["indexer_ms"], 2), fmt_ci(e["indexer_recall"]), fmt_ci(e.get("quant_topk_overlap")),
                     f"{e['indexer_params']['mean']:,.0f}", f"{100 * e['indexer_overhead']['mean']:.1f}"])
    header = ["variant", "val loss", "Δ vs baseline", "p (Holm)", "vs baseline", "acc %", "ms/step", "time / baseline",
              "keys/query", "attn MFLOP/tok", "indexer MFLOP/tok", "indexer KB/tok", "step peak MB", "indexer ms",
              "recall", "top-k overlap vs fp32", "indexer params", "overhead %"]
    return markdown_table(header, rows)


def findings(summary: dict, names: list[str], lengths: list[int], family: dict | None = None) -> list[str]:
    """Findings computed from the data: the multiple-comparison verdict of the question, the lowest loss per
    length (with its Holm-corrected verdict), and Pareto fronts against two costs: time per step and attention
    + indexer FLOPs per token (which counts the keys a strategy selects)."""
    family = holm_family(summary, names, lengths) if family is None else family
    untestable = sum(1 for L in lengths for n in names if n != "baseline" and str(L) in summary.get(n, {})
                     and (n, L) not in family)
    lines = [f"- {family_verdict(family, untestable)}"]
    for L in lengths:
        present = [n for n in names if str(L) in summary.get(n, {})]
        if not present:
            continue
        best = min(present, key=lambda n: summary[n][str(L)]["val_loss"]["mean"])
        e = summary[best][str(L)]
        test = family.get((best, L))
        verdict = "it is the baseline" if best == "baseline" else significance(e, test["p_holm"] if test else None)
        lines.append(f"- L={L}: lowest mean validation loss **{best}** ({fmt_ci(e['val_loss'])}; against the "
                     f"baseline: {verdict}). Pareto front, cheapest first (≈: 95 % CIs overlap another front "
                     f"point's in both axes) — time/step vs loss: {front_text(summary, present, L, 'avg_time_per_step')}; "
                     f"FLOPs/token vs loss: {front_text(summary, present, L, 'total_flops_per_token')}.")
    return lines


def optimization_report(summary: dict) -> str:
    """REPORT.md of run_experiment.py --experiment indexer_optimization, from its summary.json."""
    names, lengths, seeds, t = (summary["strategies"], summary["sequence_lengths"], summary["seeds"],
                                summary["config"]["train"])
    family = holm_family(summary["results"], names, lengths)
    tables = "\n\n".join(f"### L = {L}\n\n" + results_table(summary["results"], names, L, family) for L in lengths)
    found = "\n".join(findings(summary["results"], names, lengths, family))
    return f"""# Lightning-indexer optimisation

Every strategy starts from the same dense branch point per (L, seed) ({t['dense_steps']} dense steps), warms
its indexer up {warmup_phrase(t)} and trains {t['steps']} sparse steps on the same batches.
Seeds {seeds} ({'mean ± 95 % CI half-width' if len(seeds) > 1 else 'one seed: no CI, no significance test'}).
{COLUMNS}

## Findings (computed from the data)

{found}

{tables}
"""


def ablations_report(mode: str, summary: dict, names_by_question: dict[str, tuple[str, list[str]]],
                     n_variants: int, lengths: list[int], seeds: list[int], train: dict) -> str:
    """REPORT.md of run_comprehensive_ablations.py. `names_by_question`: {question: (category, names shown)};
    each section links the figure pareto_<category>.png."""
    sections = []
    for q, (category, names) in names_by_question.items():
        family = holm_family(summary, names, lengths)
        tables = "\n\n".join(f"#### L = {L}\n\n" + results_table(summary, names, L, family) for L in lengths)
        sections.append(f"## {q} ({category})\n\n" + "\n".join(findings(summary, names, lengths, family))
                        + f"\n\n![pareto](pareto_{category}.png)\n\n" + tables)
    return f"""# Comprehensive lightning-indexer ablations ({mode} mode)

{n_variants} variants x lengths {lengths} x seeds {seeds}, each from the same dense branch point
per (L, seed) ({train['dense_steps']} dense steps), indexer warm-up {warmup_phrase(train)}, {train['steps']}
sparse steps on the same batches, variants in a shuffled order per (L, seed). {'Values are mean ± 95 % CI half-width.' if len(seeds) > 1 else
'One seed: no CI and no significance test — run --mode research for those.'}

{COLUMNS}

""" + "\n\n".join(sections) + "\n\n![profile](speed_memory_profile.png)\n"


# ----------------------------------------------------------------------------- long-context study
def long_context_tables(summary: dict, models: list[str]) -> str:
    """Per task: one row per (L, model) with quality, the paired difference vs dense, recall and time."""
    parts = []
    for task, by_L in summary["results"].items():
        if task == "lm":
            header = ["L", "kept pairs", "model", "val loss", "Δ val loss vs dense (paired)", "accuracy",
                      "recall (ceiling; share of it)", "ms/step", "tokens/s"]
        else:
            header = ["L", "kept pairs", "model", "answer accuracy", "Δ accuracy vs dense (paired)", "val loss",
                      "recall (ceiling; share of it)", "ms/step", "tokens/s"]
        rows = []
        for L, entry in sorted(by_L.items(), key=lambda kv: int(kv[0])):
            for name in models:
                m = entry[name]
                quality = ([fmt_ci(m["val_loss"]), fmt_ci(m["delta_val_loss_vs_dense"]), fmt_ci(m["val_accuracy"])]
                           if task == "lm" else
                           [fmt_ci(m["accuracy"]), fmt_ci(m["delta_accuracy_vs_dense"]), fmt_ci(m["val_loss"])])
                recall = recall_with_ceiling(m)
                rows.append([L, f"{entry['kept_pair_fraction']:.1%}", name, *quality, recall,
                             fmt_ci(m["avg_time_per_step"], 0, 1000), fmt_ci(m["tokens_per_s"], 0)])
        parts.append(f"### {task} (k = {next(iter(by_L.values()))['top_k']})\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts)


def recall_with_ceiling(m: dict) -> str:
    """A model's recall beside its ceiling (the oracle top-k of the same model's attention, same evaluation) and
    recall as a share of that ceiling (per-seed ratios); '—' without a selection."""
    if "indexer_recall" not in m:
        return "—"
    if "oracle_recall" not in m:  # a record from before the ceiling was measured
        return fmt_ci(m["indexer_recall"])
    return f"{fmt_ci(m['indexer_recall'])} ({fmt_ci(m['oracle_recall'])}; {fmt_ci(m['recall_share_of_oracle'], 2)})"


def recall_share_by_distance(summary: dict, models: list[str]) -> str:
    """Per task: recall as a share of its ceiling (the oracle top-k of the same model) by query-key distance bucket
    (columns: the bucket's first distance), one row per (L, model with a selection), mean over seeds. A bucket's
    share can exceed 1: the ceiling maximises the mass kept over all distances, not in each bucket."""
    parts = []
    for task, by_L in summary["results"].items():
        rows = [[L, name, *[f"{v:.2f}" if v is not None and math.isfinite(v) else "—"
                            for v in by_L[L][name]["recall_share_of_oracle_by_distance"]]]
                for L in sorted(by_L, key=int) for name in models
                if name != "oracle" and "recall_share_of_oracle_by_distance" in by_L[L].get(name, {})]
        rows = [r for r in rows if any(v != "—" for v in r[2:])]  # a model whose recall was not measured
        if rows:
            width = max(len(r) for r in rows) - 2
            rows = [r + ["—"] * (width + 2 - len(r)) for r in rows]
            parts.append(f"### {task}\n\n" + markdown_table(["L", "model", *[str(2 ** b - 1) for b in range(width)]], rows))
    return "\n\n".join(parts) or "No model with a selection was run."


def mqar_answer_hits(summary: dict, models: list[str]) -> str:
    """MQAR: per (L, model with a selection, layer), the share of answer rows whose selected keys hold the asked
    pair's key / value token (mean ± CI over seeds), and the value share by query-key distance bucket beside the
    model's answer accuracy in that bucket."""
    by_L = summary["results"].get("mqar", {})
    rows = []
    for L in sorted(by_L, key=int):
        for name in models:
            m = by_L[L].get(name, {})
            for layer, hits in enumerate(m.get("answer_hits", [])):
                acc = m["accuracy_by_distance"]
                by_distance = ", ".join(f"{b}: {v:.2f} ({acc[b]:.2f})" for b, v in hits["value_by_distance"].items()
                                        if b in acc and math.isfinite(v))
                rows.append([L, name, layer, fmt_ci(hits["key"], 2), fmt_ci(hits["value"], 2), _held_or_missed(hits),
                             by_distance])
    if not rows:
        return "No MQAR model with a selection was run."
    return markdown_table(["L", "model", "layer", "key token selected", "value token selected",
                           "answer accuracy where the value is selected / missed",
                           "value selected by distance (answer accuracy)"], rows)


def _held_or_missed(hits: dict) -> str:
    """'0.93 / 0.08': the answer accuracy at rows whose selection holds / misses the value token ('—' if not
    recorded or no such rows: nan, stored as null)."""
    if "answered_if_held" not in hits:
        return "—"
    return " / ".join(f"{v:.2f}" if v is not None and math.isfinite(v) else "—"
                      for v in (hits["answered_if_held"], hits["answered_if_missed"]))


def mqar_answer_hits_section(summary: dict, models: list[str]) -> list[str]:
    """The REPORT lines of `mqar_answer_hits` (none without an MQAR task)."""
    if "mqar" not in summary["results"]:
        return []
    return ["## MQAR: does the selection hold the pair a query asks about?", "",
            "At each answer row, the share whose selected keys include the asked pair's key token and its value "
            "token (the token after the key; the last layer must read it to answer), per layer; by distance: the "
            "value share per query-key distance bucket with the model's answer accuracy there in brackets; the answer "
            "accuracy at the rows whose selection holds / misses the value token (a miss the answer survives means "
            "the value reached the row another way, e.g. through an earlier layer). Recall "
            "averages attention mass over every row; this looks at the one key an answer needs.", "",
            mqar_answer_hits(summary, models), ""]


def long_context_findings(summary: dict, models: list[str]) -> list[str]:
    """From the data: at which L each model falls behind dense (paired t-test, Holm-corrected across the task's
    models and lengths) and by how much, and its time per step over dense's (per-seed ratios: the runs of one seed
    ran back to back)."""
    lines = []
    for task, by_L in summary["results"].items():
        sig = summary["significance"][task]
        tests = _tests_by_comparison(sig)
        metric = f"delta_{sig['tests'][0]['metric']}_vs_dense" if sig["tests"] else "delta_val_loss_vs_dense"
        lengths = sorted(by_L, key=int)
        family = "(every model against dense, dsa also against the oracle, at every length)" if any(
            t.get("vs") == "oracle" for t in sig["tests"]) else "against dense (models x lengths)"
        lines.append(f"- {task}: {sig['n_tests']} paired t-test(s) {family}, Holm-Bonferroni corrected, family-wise "
                     f"alpha = {sig['alpha']}.")
        for name in models:
            if name == "dense":
                continue
            behind = [L for L in lengths if tests[(name, "dense", L)]["verdict"] == "worse"]
            ahead = [L for L in lengths if tests[(name, "dense", L)]["verdict"] == "better"]
            per_L = ", ".join(f"L={L} {fmt_ci(by_L[L][name][metric])} ({_holm_p_text(tests[(name, 'dense', L)])})"
                              for L in lengths)
            verdict = "; ".join([f"behind dense at L = {', '.join(behind)}"] * bool(behind)
                                + [f"ahead of dense at L = {', '.join(ahead)}"] * bool(ahead)) or \
                "no significant difference from dense at any L"
            lines.append(f"- {task}, {name}: {verdict}; paired difference per L: {per_L}.")
            ratios = {L: by_L[L][name]["time_ratio_vs_dense"] for L in lengths}
            faster = [L for L in lengths if ratios[L]["ci95"][1] is not None and ratios[L]["ci95"][1] < 1]
            lines.append("  time per step / dense's (per-seed ratio): "
                         + ", ".join(f"L={L} {fmt_ci(ratios[L], 2)}" for L in lengths)
                         + "; faster than dense (ratio's 95 % CI below 1) at "
                         + (f"L = {', '.join(faster)}." if faster else "no L tested."))
    return lines


def _tests_by_comparison(significance: dict) -> dict:
    """A task's paired tests keyed by (model, reference, L): dsa has one against dense and one against the oracle."""
    return {(t["model"], t.get("vs", "dense"), str(t["L"])): t for t in significance["tests"]}


def _holm_p_text(test: dict) -> str:
    return "p_Holm n/a" if test["p_holm"] is None else f"p_Holm {test['p_holm']:.3g}"


def long_context_decomposition(summary: dict) -> str:
    """Per task and L: DSA's gap to dense split into what top-k itself loses (oracle − dense) and what the indexer
    loses (DSA − oracle), each paired by seed with its 95 % CI and Holm-corrected p."""
    rows = []
    for task, by_L in summary["results"].items():
        tests = _tests_by_comparison(summary["significance"][task])
        for L, name in [(L, name) for L in sorted(by_L, key=int) for name in ("dsa", "dsa_levers")]:
            entry, metric = by_L[L], "accuracy" if task == "mqar" else "val_loss"
            if "oracle" not in entry or f"delta_{metric}_vs_oracle" not in entry.get(name, {}):
                continue
            cells = [(entry["oracle"][f"delta_{metric}_vs_dense"], tests[("oracle", "dense", L)]),
                     (entry[name][f"delta_{metric}_vs_oracle"], tests[(name, "oracle", L)]),
                     (entry[name][f"delta_{metric}_vs_dense"], tests[(name, "dense", L)])]
            rows.append(f"| {task} | {L} | {name} | {metric} | "
                        + " | ".join(f"{fmt_ci(d)} ({_holm_p_text(t)})" for d, t in cells) + " |")
    if not rows:
        return "Needs the dsa and oracle models."
    return "\n".join(["| task | L | model | metric | top-k itself: oracle − dense | the indexer: model − oracle | "
                      "model − dense |", "|---|---|---|---|---|---|---|", *rows])


def long_context_report(summary: dict, models: list[str]) -> str:
    seeds = summary["seeds"]
    return "\n".join([
        "# Long-context study: DSA at a fixed budget k",
        "",
        "Every model starts from the same dense branch point per (task, L, seed) and sees the same batches. "
        "`dsa` = lightning indexer + top-k (dense KL warm-up, then sparse training); `local` = last k tokens; "
        "`random` = k random past tokens redrawn every step; `oracle` = the top-k keys of the layer's own dense "
        "attention summed over heads (no indexer: the best any index set shared by the heads can keep at k — DSA vs "
        "oracle is what the indexer loses, oracle vs dense what top-k itself loses); `block` = our block-shared "
        "variant"
        + (f"; `dsa_levers` = dsa with the retrieval levers {summary['levers']} (structure_window > 0: the first "
           "structure_sinks and last structure_window tokens kept in every row, the indexer's top-k over the rest and "
           "its KLs fitted there; warmup_target: how the warm-up's target is made from the heads)"
           if "levers" in summary else "") + ". "
        "*Kept pairs* = selected causal (query, key) pairs / all causal pairs. Differences vs dense are paired "
        "by seed (mean ± 95 % Student-t CI); *recall* is the share of dense attention mass inside the "
        "selected set (rows with more than k past tokens), beside its ceiling (the same model's own top-k of that "
        "mass, same evaluation) and recall as a share of the ceiling (by distance: `recall_share_of_oracle_by_distance` "
        f"in summary.json). Seeds: {seeds}.",
        "",
        "## Findings (computed from the table)",
        "",
        *long_context_findings(summary, models),
        "",
        "## Where DSA's gap comes from",
        "",
        "Paired by seed, mean ± 95 % CI (MQAR: answer accuracy, higher is better; lm: val loss, lower is better).",
        "",
        long_context_decomposition(summary),
        "",
        "## Tables",
        "",
        long_context_tables(summary, models),
        "",
        "## Recall as a share of its ceiling, by query-key distance",
        "",
        "Columns: the distance bucket's first distance (bucket b holds distances 2^b − 1 … 2^(b+1) − 2). Above 1: "
        "that model keeps more of the bucket's mass than the ceiling's set, which maximises the mass over all "
        "distances.",
        "",
        recall_share_by_distance(summary, models),
        "",
        *mqar_answer_hits_section(summary, models),
        "## Warm-up",
        "",
        long_context_warmups(summary, models),
        "",
        "Figures: `long_context.png` (per task run: its quality vs L; time per step; recall by distance)"
        + (", `warmup_kl.png` (DSA's held-out warm-up KL per L and seed, where it stopped)" if any(
            (entry.get("dsa") or {}).get("warmup_plateau") for by_L in summary["results"].values()
            for entry in by_L.values()) else "")
        + (", `mqar_accuracy_by_distance.png`." if "mqar" in summary["results"] else "."),
        "",
    ])


def long_context_warmups(summary: dict, models: list[str]) -> str:
    """One row per (task, L, model with an indexer, seed): how its warm-up ended."""
    runs = [([task, L, name, seed], record) for task, by_L in summary["results"].items()
            for L, entry in sorted(by_L.items(), key=lambda kv: int(kv[0])) for name in models
            if "warmup_plateau" in entry.get(name, {}) for seed, record in entry[name]["warmup_plateau"].items()]
    return warmup_table(runs, ["task", "L", "model", "seed"]) if runs else "No model with an indexer was run."


# ----------------------------------------------------------------------------- adaptive sparsity
ADAPTIVE_COLUMNS = """*Δ vs dense / vs matched*: per-seed val-loss difference (every model branches from the same dense weights and
sees the same batches), mean ± 95 % CI. *keys/query*: mean selected keys per query over every layer, held-out
windows (dense: (L+1)/2); *k spread*: standard deviation of k_t over those queries (a fixed share varies with t
only); *share sd*: standard deviation of k_t / (t+1) over the second half of each window (what adapts; a fixed
share: rounding only); *kept*: keys/query over the dense model's (L+1)/2. *MFLOP/tok*: attention over the selected keys plus the
indexer (analytic, `dsa_lab/experiments/costs.py` `attention_flops_per_token` — the MHA formula, also for MLA — and
`indexer_flops_per_token`). *ms/step*, *tokens/s*: training steps of this run on this machine (compare as ratios);
every sparse model selects from full index scores and attends with the same backend. *step peak MB*: memory of
one training step above the resident weights (CUDA: max_memory_allocated; CPU: profiler allocation peak, on the
first seed only — a property of the shapes, and the profiler costs more than the step).
*recall*: share of dense attention mass inside the selected set (rows that drop tokens)."""


def adaptive_sparsity_tables(summary: dict, models: list[str]) -> str:
    """One table per length: quality, paired differences, keys and FLOPs, time and memory per model."""
    header = ["model", "val loss", "Δ vs dense", "Δ vs matched", "acc %", "keys/query", "k spread", "share sd", "kept %",
              "MFLOP/tok", "ms/step", "tokens/s", "step peak MB", "recall"]
    parts = []
    for L, entry in sorted(summary["results"].items(), key=lambda kv: int(kv[0])):
        rows = []
        for name in models:
            m = entry[name]
            rows.append([name, fmt_ci(m["val_loss"]), fmt_ci(m.get("delta_val_loss_vs_dense")),
                         fmt_ci(m.get("delta_val_loss_vs_matched")), fmt_ci(m["val_accuracy"], 1, 100),
                         fmt_ci(m["k_mean"], 1), fmt_ci(m["k_std"], 1), fmt_ci(m["share_std"]),
                         fmt_ci(m["kept_pair_fraction"], 1, 100),
                         fmt_ci(m["total_flops_per_token"], 2, 1e-6), fmt_ci(m["avg_time_per_step"], 0, 1000),
                         fmt_ci(m["tokens_per_s"], 0), fmt_ci(m["step_peak_memory_mb"], 1),
                         fmt_ci(m["indexer_recall"]) if "indexer_recall" in m else "—"])
        budget = ""
        if "matched" in entry:
            budget = (f" — matched share {fmt_ci(entry['matched']['fraction'])} of the prefix for adaptive's budget of "
                      f"{fmt_ci(entry['adaptive']['budget_keys'], 1)} keys/query")
        parts.append(f"### L = {L}{budget}\n\n" + markdown_table(header, rows))
    return "\n\n".join(parts)


def adaptive_sparsity_significance(summary: dict) -> str:
    """The paired tests of adaptive vs the best fixed share and vs matched, Holm-corrected, as a table + count."""
    return significance_text(summary["significance"], "adaptive's per-seed val loss against its rival")


def _paired_ratio(a: dict, b: dict) -> dict:
    """mean ± CI of the per-seed ratio a/b of two mean_ci95 stats over the same seeds."""
    return mean_ci95([x / y for x, y in zip(a["per_seed"], b["per_seed"])])


def _adaptive(verdict: str) -> str:
    return f"adaptive {verdict}" if verdict in ("better", "worse") else verdict


def adaptive_sparsity_findings(summary: dict) -> list[str]:
    """The plan's hypothesis — adaptive beats fixed sparsity in both training speed and quality — per length,
    from the data: quality at the same budget (vs matched) and vs the best fixed share (Holm-corrected tests),
    speed as paired time-per-step ratios, and whether the budget matching held."""
    tests = {(t["L"], t["vs"]): t for t in summary["significance"]["tests"]}
    lines = []
    for L, entry in sorted(summary["results"].items(), key=lambda kv: int(kv[0])):
        if "adaptive" not in entry:
            continue
        a = entry["adaptive"]
        parts = [f"- **L = {L}**: adaptive kept {fmt_ci(a['k_mean'], 1)} keys/query ({fmt_ci(a['kept_pair_fraction'], 1, 100)} % "
                 f"of dense's; over the second half of the windows a share k_t/(t+1) of {fmt_ci(a['share_mean'])} "
                 f"with a spread over queries of {fmt_ci(a['share_std'])})."]
        quality_win = speed_win = False
        quality, speed = "not tested", "not measured"
        if "matched" in entry:
            m, t = entry["matched"], tests.get((int(L), "matched"))
            ratio = _paired_ratio(a["avg_time_per_step"], m["avg_time_per_step"])
            parts.append(f"Budget matching: matched kept {fmt_ci(m['k_mean'], 1)} keys/query (share "
                         f"{fmt_ci(m['fraction'])}). At that budget adaptive − matched val loss = "
                         f"{fmt_ci(a['delta_val_loss_vs_matched'])} ({_adaptive(t['verdict']) if t else 'not tested'}); "
                         f"time per step adaptive / matched = {fmt_ci(ratio, 2)}.")
            quality_win = bool(t) and t["verdict"] == "better"
            quality = _adaptive(t["verdict"]) if t else quality
        if (int(L), "best_fixed") in tests:
            t = tests[(int(L), "best_fixed")]
            best = entry[t["rival"]]
            ratio = _paired_ratio(a["avg_time_per_step"], best["avg_time_per_step"])
            parts.append(f"Against the best fixed share ({t['rival']}, {fmt_ci(best['k_mean'], 1)} keys/query): "
                         f"Δ val loss {fmt_ci(t['delta'])} ({_adaptive(t['verdict'])}), time per step ratio "
                         f"{fmt_ci(ratio, 2)}.")
            speed_win = ratio["ci95"][1] is not None and ratio["ci95"][1] < 1
            speed = "faster" if speed_win else "not faster (paired 95 % CI of the time ratio reaches 1 or above)"
        verdict = ("supported (better at equal budget and faster than the best fixed share)" if quality_win and speed_win
                   else "partly: better at equal budget, not faster than the best fixed share" if quality_win
                   else "partly: faster than the best fixed share, not better at equal budget" if speed_win
                   else "not supported")
        parts.append(f"Hypothesis at this length: **{verdict}** (quality at equal budget: {quality}; speed against the "
                     f"best fixed share: {speed}).")
        lines.append(" ".join(parts))
    return lines


def adaptive_sparsity_report(summary: dict, models: list[str]) -> str:
    """REPORT.md of run_experiment.py --experiment adaptive_sparsity, from its summary.json."""
    cfg = next(iter(summary["config"].values()))
    m, t, k = cfg["model"], cfg["train"], cfg["adaptive"]
    seeds = summary["seeds"]
    warm = [f"L={L}: {fmt_ci(e['warmup']['recall_after'])} (random {fmt_ci(e['warmup']['random_recall'])}, last-k "
            f"{fmt_ci(e['warmup']['local_recall'])})" for L, e in sorted(summary["results"].items(), key=lambda kv: int(kv[0]))
            if "warmup" in e]
    return "\n".join([
        "# Adaptive sparsity (research plan Experiment 3)",
        "",
        "**Hypothesis (the plan's):** adaptive sparsity that adjusts to sequence characteristics (length, content "
        "complexity, attention entropy) outperforms fixed sparsity in both training speed and model quality.",
        "",
        f"Models ({', '.join(models)}): `dense` continues dense training; `fixedP` keeps k_t = ceil(P % · (t+1)) keys "
        "for query t; `adaptive` sets k_t per query, sequence and layer from the prefix only — complexity (token "
        "diversity, a unigram-count perplexity estimate, hidden-state variance) and the entropy of the indexer's "
        f"scores: share = {k['min_fraction']} + ({k['max_fraction']} − {k['min_fraction']}) · (w·complexity + (1−w)·entropy), "
        f"w = {k['complexity_weight']}, k_t in [{k['k_min']}, {k['k_max'] or 't+1'}]; `matched` keeps a fixed share "
        "chosen so that its mean keys per query equals adaptive's measured mean of the same seed (the budget-matched "
        "comparison: without it, better could just mean kept more).",
        "",
        f"Every model starts from the same dense branch point per (L, seed) ({t['dense_steps']} dense steps), sparse "
        f"models from one shared indexer warm-up (dense KL, main model frozen, {warmup_phrase(t)}), then "
        f"{t['steps']} steps on the same batches, batch {t['batch_size']}. Model: {m['attention_type'].upper()}, d_model "
        f"{m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads, {m['num_experts']} experts top-{m['expert_top_k']}, "
        f"indexer {m['indexer_heads']}×{m['indexer_dim']}, backend `{m['attention_backend']}`. Data: `{cfg['dataset']}` "
        f"(held-out documents for validation). Seeds {seeds} ({'mean ± 95 % CI half-width' if len(seeds) > 1 else 'one seed: no CI'}).",
        "",
        "Indexer recall after the shared warm-up (fixed 50 % selection): " + ("; ".join(warm) if warm else "n/a") + ".",
        "",
        warmup_table([([L, seed], record) for L, e in sorted(summary["results"].items(), key=lambda kv: int(kv[0]))
                      for seed, record in e.get("warmup_plateau", {}).items()], ["L", "seed"]),
        "",
        "## Findings (computed from the data)",
        "",
        *adaptive_sparsity_findings(summary),
        "",
        "## Significance",
        "",
        adaptive_sparsity_significance(summary),
        "",
        "## Tables",
        "",
        ADAPTIVE_COLUMNS,
        "",
        adaptive_sparsity_tables(summary, models),
        "",
        "![adaptive sparsity](adaptive_sparsity.png)",
        "",
    ])
