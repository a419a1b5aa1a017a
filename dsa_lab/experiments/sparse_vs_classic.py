"""The default experiment: sparse vs classic per sequence length, as DeepSeek made V3.2 (docs/experiments.md).

For every L and seed: a shared dense branch point, the classic model trained on, and the sparse model warmed up
(to its KL plateau) and sparse-trained on the same batches; the paired sparse - classic differences with
Holm-corrected tests. Everything else (records, fingerprints, the output tail) is the skeleton's.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from dsa_lab.common.results_io import atomic_write_json, mean_ci95
from dsa_lab.experiments import reports
from dsa_lab.experiments import skeleton as experiment

SWEEP_METRICS = ["final_val_loss", "final_val_accuracy", "final_val_perplexity", "avg_time_per_step", "tokens_per_s",
                 "model_flops_utilization", "attention_time_share", "peak_memory_mb", "process_peak_rss_mb"]
METRICS = {"classic": SWEEP_METRICS,
           "sparse": [*SWEEP_METRICS, "indexer_time_share", "indexer_recall", "random_recall", "local_recall",
                      "warmup_indexer_recall", "warmup_random_recall", "warmup_local_recall"]}


def run_sparse_vs_classic(model_cfg, train_cfg, data_cfg, exp_cfg, overwrite: bool, run=None) -> dict:
    """The sequence-length sweep: classic vs sparse per L and seed; writes every result file. `run`
    (train.Execution): precision, compile and resume checkpoints (OUT/seq_<L>/resume/seed_<S>/)."""
    from tqdm.auto import tqdm

    from dsa_lab.common import distributed
    from config import config_for_length, fingerprint_fields
    from dsa_lab.training.data import build_windows
    from dsa_lab.training.train import run_seed

    device, run = experiment.prepare(train_cfg.device, run, [model_cfg.attention_backend], [train_cfg.batch_size])
    out = Path(exp_cfg.out)
    experiment.check_experiment(out, "sparse_vs_classic")
    corpus = experiment.load_corpus_once(data_cfg, device)
    models, configs, keys = {}, {}, {}
    for L in exp_cfg.seq_lens:
        models[L], d = config_for_length(model_cfg, data_cfg, exp_cfg, L, corpus.tokenizer.vocab_size)
        configs[L], keys[L] = experiment.config_key(
            {"model": fingerprint_fields(models[L]),
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
        from dsa_lab.experiments import plots
        plots.sequence_length_comparison(summary_json, curves, out / "sequence_length_comparison.png")
        return ["sequence_length_comparison.png"]
    return experiment.finish(out, summary, figures, lambda s: reports.sweep_report(s, reports.sweep_table(s)),
                             reports.sweep_table)


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
