"""The experiment skeleton: what every runner (the sweep, long_context, adaptive_sparsity, the variant runs) does
the same way, written once.

A runner declares what is its own — presets, models or variants, task, extra metrics, figures — and calls:
`preset_settings` (its preset with the overrides on top), `prepare` (device and execution checks before any
work), `config_key` (the config plus the run fingerprint: device, device name, torch, dtype), `clear_stale`
(finished runs of another config are refused or cleared), `run_record` (one resumable run record; its resume
checkpoints through `checkpointing`), `cached_state` (a branch point or a warm start cached as <name>.pt +
<name>.json), `paired_differences` (`delta_<metric>_vs_<reference>`, `time_ratio_vs_<reference>`),
`significance` (paired t-tests, Holm-corrected across the family), `summary_head` and `finish` (summary.json ->
read back -> figures -> REPORT.md -> table).
"""
from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from dsa_lab.common import distributed
from dsa_lab.common.results_io import (ALPHA, atomic_save_torch, atomic_write_json, atomic_write_text, check_stale, fingerprint,
                        load_torch, mean_ci95, paired_tests, read_json, run_environment, run_fingerprint)
from dsa_lab.training.train import Execution, check_backend_device, checkpointed, discard_checkpoints, pick_device


def prepare(device_name: str, run: Execution | None, backends: Iterable[str], batch_sizes: Iterable[int]):
    """-> (device, run): the device resolved, and every backend, the execution and the batch sizes checked on it."""
    run = run or Execution()
    device = pick_device(device_name)
    for backend in backends:
        check_backend_device(backend, device)
    run.validate(device)
    for batch_size in batch_sizes:
        distributed.check_batch(batch_size)
    return device, run


def preset_settings(presets: dict, preset: str, experiment: str, overrides: dict) -> dict:
    """An experiment's preset (a dict of config keys) with `overrides` (CONFIG keys, CLI flags) on top; an unknown
    preset is refused naming the experiment's presets."""
    if preset not in presets:
        raise ValueError(f"preset={preset!r} is unknown for {experiment}; choose one of {', '.join(presets)}")
    return {**presets[preset], **overrides}


def check_experiment(out: Path, experiment: str) -> None:
    """Refuse to write one experiment's results over another's in the same folder."""
    summary = out / "summary.json"
    if summary.exists():
        found = read_json(summary, fix="delete it (summary.json is rebuilt from the finished runs)").get("experiment")
        if found != experiment:
            raise ValueError(f"{out} holds results of experiment {found!r}; give --experiment {experiment} "
                             f"its own --out folder")


def config_key(config: dict, device, run: Execution) -> tuple[dict, str]:
    """-> (the config with the run fingerprint under "run", its fingerprint): runs on another machine, torch or
    dtype are never read back as this config's."""
    config = {**config, "run": run_fingerprint(device, run.dtype)}
    return config, fingerprint(config)


def clear_stale(out: Path, expected: Mapping[Path, str], overwrite: bool,
                folder_of: Callable[[Path], Path] = lambda record: record) -> None:
    """Refuse finished records among `expected` ({path: fingerprint}) made with another config, or with `overwrite`
    remove what they belong to (`folder_of(record)`: the record itself, or its folder of runs and branch points)."""
    with distributed.main_first():  # rank 0 clears stale runs before the others look
        stale = check_stale(out, expected, overwrite)
        if distributed.is_main():
            for target in {folder_of(record) for record in stale}:
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)


@contextlib.contextmanager
def checkpointing(run: Execution, folder: Path, key: str, overwrite: bool) -> Iterator[Execution]:
    """`run` keeping its resume checkpoints in `folder` (train.checkpointed) for the span of the block; they are
    discarded when the block finishes (an exception keeps them for --resume)."""
    this_run = checkpointed(run, folder, key, overwrite)
    yield this_run
    discard_checkpoints(this_run)


def run_record(path: Path, key: str, labels: dict, compute: Callable[[Execution], dict], run: Execution,
               resume: Path, overwrite: bool, config: dict, device) -> dict:
    """The run record at `path`, read back when finished; else `compute(run)` (its checkpoints in `resume`) -> the
    record body, written atomically with the fingerprint, `labels`, wall time, config and environment."""
    if path.exists():
        record = read_json(path)
        print(f"{path}: finished run read back", flush=True)
        return record
    with checkpointing(run, resume, key, overwrite) as this_run:
        started = time.perf_counter()
        body = compute(this_run)
        atomic_write_json(path, {"config_fingerprint": key, **labels, **body,
                                 "wall_time_s": time.perf_counter() - started, "config": config,
                                 "environment": run_environment(device)})
    distributed.barrier()  # the others read what rank 0 wrote
    return read_json(path)


def cached_state(path: Path, key: str, compute: Callable[[], tuple[dict, dict]], device) -> dict:
    """A model state shared by several runs (a branch point, a warm start), cached as `path` (.pt) beside its
    record `path`.json (`compute()` -> (state, record); the record carries the config fingerprint, so a state
    left by a run of another config is found stale); read back when present."""
    if path.exists():
        return load_torch(path, device, fix="delete it (it is recomputed)")
    state, record = compute()
    atomic_write_json(path.with_suffix(".json"), {"config_fingerprint": key, **record})
    atomic_save_torch(state, path)
    return state


def paired_differences(finals: list[dict], references: list[dict], reference: str,
                       metrics: Iterable[str] = ("val_loss",), time: str | None = "avg_time_per_step") -> dict:
    """Per-seed paired statistics against `reference` (finals[i] and references[i]: the same seed):
    `delta_<metric>_vs_<reference>` (difference) and `time_ratio_vs_<reference>` (ratio of `time`)."""
    stats = {f"delta_{m}_vs_{reference}": mean_ci95([_sub(f.get(m), r.get(m)) for f, r in zip(finals, references)])
             for m in metrics}
    if time is not None:
        stats[f"time_ratio_vs_{reference}"] = mean_ci95([_div(f.get(time), r.get(time))
                                                         for f, r in zip(finals, references)])
    return stats


def _sub(a, b):
    return None if a is None or b is None else a - b


def _div(a, b):
    return None if a is None or not b else a / b


def significance(comparisons: list[dict], alpha: float = ALPHA) -> dict:
    """The paired tests of one question. Each comparison: its labels, "differences" (per seed, comparison minus
    reference) and "lower_is_better" (True for a loss); optionally "p" from another test of the same comparison
    (e.g. an exact test of counts). -> {"tests": [labels + delta (mean ± CI), p, p_holm, verdict], "n_tests",
    "correction": "holm", "alpha"}: Holm-corrected across every testable comparison."""
    tested = paired_tests({i: c["differences"] for i, c in enumerate(comparisons)}, alpha,
                          {i: c["p"] for i, c in enumerate(comparisons) if c.get("p") is not None})
    tests = []
    for i, c in enumerate(comparisons):
        delta, t = mean_ci95(c["differences"]), tested[i]
        better = (delta["mean"] or 0) < 0 if c["lower_is_better"] else (delta["mean"] or 0) > 0
        verdict = ("untestable (1 seed)" if t["p"] is None else "n.s." if not t["significant"]
                   else "better" if better else "worse")
        labels = {k: v for k, v in c.items() if k not in ("differences", "lower_is_better", "p")}
        tests.append({**labels, "delta": delta, "p": t["p"], "p_holm": t["p_holm"], "verdict": verdict})
    return {"tests": tests, "n_tests": sum(t["p"] is not None for t in tests), "correction": "holm", "alpha": alpha}


def summary_path(out: Path) -> Path:
    """Where an experiment's summary lies in its output folder."""
    return Path(out) / "summary.json"


def summary_head(experiment: str, config, seeds, device, started: float) -> dict:
    """The fields every summary.json starts with: experiment, config, seeds, environment, wall time."""
    return {"experiment": experiment, "config": config, "seeds": seeds, "environment": run_environment(device),
            "wall_time_s": time.perf_counter() - started}


def finish(out: Path, summary: dict, figures: Callable[[dict], list[str]], report: Callable[[dict], str],
           table: Callable[[dict], str]) -> dict:
    """The output tail: summary.json written, read back (NaN -> null, as every reader sees it), the figures drawn
    from it (`figures` -> their file names), REPORT.md written, the table printed. -> the read-back summary."""
    atomic_write_json(out / "summary.json", summary)
    summary = read_json(out / "summary.json")
    names = figures(summary)
    atomic_write_text(out / "REPORT.md", report(summary))
    print("\n" + table(summary))
    print(f"\nwrote {out}/summary.json, {', '.join([*names, 'REPORT.md'])}")
    return summary


def load_corpus_once(data_cfg, device):
    """The corpus (rank 0 builds the tokenizer and token caches, the others read them), described in one line."""
    from dsa_lab.common import distributed
    from dsa_lab.training.data import load_corpus
    with distributed.main_first():
        corpus = load_corpus(data_cfg)
    print(f"data: {data_cfg.dataset} — {corpus.describe()['train_docs']} train / {len(corpus.val_docs)} held-out "
          f"documents, {corpus.train_tokens.size:,} / {corpus.val_tokens.size:,} tokens, "
          f"vocab {corpus.tokenizer.vocab_size}; device {device}", flush=True)
    return corpus
