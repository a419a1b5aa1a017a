"""Comprehensive lightning-indexer ablations on real text, resumable, with a computed research report.

    python run_comprehensive_ablations.py --mode quick|research|all [--steps N] [--seq-lens ...]
        [--questions optimal_indexer_config attention_patterns k_values quantization combinations]
        [--seeds ...] [--device auto|cpu|cuda] [--out results/ablations] [--overwrite]

Categories: indexer architecture (heads {1,2,3,4} x dims {8,16,32,64}), attention patterns (13),
quantisation (12), k-selection strategies, and 20 combinations; each compared with the 4x64 baseline,
trained from the same dense branch point per (L, seed) on the same batches. Every finished run is a JSON
record under OUT/records/ and is read back, not redone. Writes OUT/summary.json, OUT/REPORT.md (answers
computed from the data), OUT/pareto_<category>.png and OUT/speed_memory_profile.png.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from dsa_lab.experiments import reports
from dsa_lab.common.results_io import OneLineArgumentParser, run_cli
from dsa_lab.common.variants import BASELINE, CATEGORIES, QUESTIONS, QUICK_SUBSET

MODES = {
    # quick: a few variants per family, 1 seed, tiny schedule: minutes on a laptop CPU
    "quick": {"preset": "quick", "seq_lens": [64, 128], "seeds": [42],
              "overrides": {"dense_steps": 80, "warmup_steps": 20, "steps": 40, "eval_every": 20}, "subset": True},
    # research: every variant but the combinations, 3 seeds, the research plan's model and lengths
    "research": {"preset": "default", "seq_lens": [64, 128, 256, 512, 1024], "seeds": [42, 43, 44],
                 "overrides": {}, "subset": False, "skip": ["combinations"]},
    "all": {"preset": "default", "seq_lens": [64, 128, 256, 512, 1024], "seeds": [42, 43, 44], "overrides": {},
            "subset": False},
}


def parse_args(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=MODES, default="quick")
    p.add_argument("--steps", type=int, help="sparse training steps per variant")
    p.add_argument("--seq-lens", type=int, nargs="+")
    p.add_argument("--questions", nargs="+", choices=list(QUESTIONS))
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dataset")
    p.add_argument("--out", default="results/ablations")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def selected_variants(subset: bool, questions: list[str]) -> tuple[dict, dict]:
    """-> ({variant: overrides}, {variant: category}) for the chosen research questions (+ the baseline)."""
    variants, category_of = {"baseline": BASELINE}, {"baseline": "baseline"}
    for q in questions:
        category = QUESTIONS[q]
        names = QUICK_SUBSET[category] if subset else list(CATEGORIES[category])
        for name in names:
            variants[name] = CATEGORIES[category][name]
            category_of[name] = category
    return variants, category_of


def main(argv=None) -> int:
    """Under torchrun (WORLD_SIZE > 1) every rank joins the process group (NCCL on CUDA, gloo on CPU) and trains
    its slice of every global batch; rank 0 alone writes records, summary, figures and the report."""
    from dsa_lab.common import distributed
    from dsa_lab.training.train import TrainingDiverged
    args = parse_args(argv)

    def job():
        distributed.init_from_env(args.device or "auto")
        run(args)
    try:
        return run_cli(job, failures=(TrainingDiverged,))
    finally:
        distributed.shutdown()


def run(args) -> None:
    from dsa_lab.experiments import ablations
    from dsa_lab.common import distributed
    from dsa_lab.experiments import skeleton as experiment
    from config import build_configs
    from dsa_lab.training.train import pick_device
    mode = MODES[args.mode]
    overrides = {"seq_lens": args.seq_lens or mode["seq_lens"], "seeds": args.seeds or mode["seeds"],
                 "out": args.out, **mode["overrides"]}
    for key, value in (("steps", args.steps), ("device", args.device), ("dataset", args.dataset)):
        if value is not None:
            overrides[key] = value
    model_cfg, train_cfg, data_cfg, exp_cfg = build_configs(overrides, preset=mode["preset"])
    questions = args.questions or [q for q, c in QUESTIONS.items() if c not in mode.get("skip", [])]
    variants, category_of = selected_variants(mode["subset"], questions)
    out = Path(args.out)
    t0 = time.perf_counter()
    records = ablations.run_variants(variants, model_cfg, train_cfg, data_cfg, exp_cfg, out, args.overwrite,
                                     category_of)
    if not distributed.is_main():  # the others trained in lockstep; rank 0 summarises, plots and reports
        return
    names_by_question = {q: (QUESTIONS[q], ["baseline"] + [n for n, c in category_of.items() if c == QUESTIONS[q]])
                         for q in questions}
    summary = {**experiment.summary_head("ablations", dataclasses.asdict(train_cfg), exp_cfg.seeds,
                                         pick_device(train_cfg.device), t0),
               "mode": args.mode, "questions": questions, "sequence_lengths": exp_cfg.seq_lens,
               "results": ablations.aggregate(records)}

    def figures(summary_json):
        from dsa_lab.experiments import plots
        results = summary_json["results"]
        for category, names in names_by_question.values():
            plots.speed_quality_tradeoffs(results, names, exp_cfg.seq_lens, reports.pareto_front,
                                          out / f"pareto_{category}.png", f"{category}: speed vs quality")
        plots.scaling_analysis(results, list(variants), exp_cfg.seq_lens, out / "speed_memory_profile.png")
        return [f"pareto_{category}.png" for category, _ in names_by_question.values()] + ["speed_memory_profile.png"]
    experiment.finish(out, summary, figures,
                      lambda s: reports.ablations_report(args.mode, s["results"], names_by_question, len(variants),
                                                         exp_cfg.seq_lens, exp_cfg.seeds, dataclasses.asdict(train_cfg)),
                      lambda s: f"{len(records)} runs ({len(variants)} variants) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
