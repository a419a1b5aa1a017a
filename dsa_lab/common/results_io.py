"""Run plumbing shared by every runner: config fingerprints, atomic JSON/text/torch saves, reading them back
(a truncated or corrupt file is one line naming it and the fix), the refusal to mix finished runs made with
another config, one-line CLI errors (`OneLineArgumentParser`, `run_cli`), and mean with a 95 % confidence
interval over seeds, and `run_environment` (what every results folder records about the machine and code).
Layer 1: imports only the standard library, torch and `distributed` (rank 0 alone writes files).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from dsa_lab.common import distributed

# two-sided 95 % Student-t quantiles for 1..30 degrees of freedom (then the normal 1.96)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def mean_ci95(values: list[float]) -> dict:
    """{'mean', 'ci95': [lo, hi], 'per_seed'}; the interval is Student-t, None bounds for a single seed."""
    vals = [math.nan if v is None else float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    n = len(finite)
    mean = sum(finite) / n if n else None
    if n < 2:
        return {"mean": mean, "ci95": [None, None], "per_seed": vals}
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "per_seed": vals}


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (continued fraction, Numerical Recipes' betacf)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return front * f


def paired_t_pvalue(differences: list[float]) -> float | None:
    """Two-sided p-value of a paired t-test (H0: mean difference 0) from per-seed differences; None with fewer
    than 2 finite values; 0.0 when all differences are equal and non-zero, 1.0 when all are zero."""
    vals = [float(v) for v in differences if v is not None and math.isfinite(v)]
    n = len(vals)
    if n < 2:
        return None
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (sd / math.sqrt(n))
    df = n - 1
    return _betainc(df / 2, 0.5, df / (df + t * t))


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1) for a family of comparisons:
    the i-th smallest p (0-based) is multiplied by (m - i). Controls the family-wise error rate."""
    order = sorted(pvalues, key=lambda name: pvalues[name])
    m, running, adjusted = len(order), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[name]))
        adjusted[name] = running
    return adjusted


ALPHA = 0.05  # family-wise significance level of every report's paired tests


def paired_tests(differences: Mapping, alpha: float = ALPHA, given: Mapping | None = None) -> dict:
    """One family of paired comparisons {name: per-seed differences} -> {name: {'p', 'p_holm', 'significant'}}:
    a paired t-test each (or the p-value `given` for that name by another test, e.g. an exact one), Holm-corrected
    across the testable ones (>= 2 finite differences); an untestable one gets None for all three."""
    given = given or {}
    raw = {name: given[name] if name in given else paired_t_pvalue(list(diffs)) for name, diffs in differences.items()}
    adjusted = holm({name: p for name, p in raw.items() if p is not None})
    return {name: {"p": raw[name], "p_holm": adjusted.get(name),
                   "significant": None if raw[name] is None else adjusted[name] < alpha} for name in differences}


# ----------------------------------------------------------------------------- fingerprints
def fingerprint(obj) -> str:
    """16 hex digits identifying a JSON-able config (dict keys sorted; Paths etc. via str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_fingerprint(device, dtype: str = "fp32") -> dict:
    """What a run's numbers depend on beyond its config, and part of every run's config fingerprint (so resumed
    runs are never paired across machines or precisions): the resolved device, its name, torch, the dtype."""
    return {**machine_key(device), "dtype": dtype}


# ----------------------------------------------------------------------------- self-logging
def run_environment(device=None) -> dict:
    """What a run's numbers may depend on beyond its config, recorded in every summary.json and run record
    (never part of a config fingerprint): python, torch, triton (None when not installed), CUDA and the
    device name, the git commit and whether tracked files differ from it (None outside a git checkout),
    the command line and the torchrun world size."""
    import torch
    from importlib import metadata
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    device = torch.device(device) if device is not None else None
    commit, dirty = _git_state()
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton,
            "cuda": torch.version.cuda, "device": None if device is None else str(device),
            "device_name": device_name(device),
            "git_commit": commit, "git_dirty": dirty, "command_line": list(sys.argv),
            "world_size": distributed.world_size()}


def cpu_model() -> str:
    """The processor model ('model name' in /proc/cpuinfo on Linux; else platform's), e.g. 'AMD EPYC 7B13'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device) -> str:
    """A CUDA device's name, or on CPU the processor model (so figures from different machines are not mixed)."""
    import torch
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model() if device.type == "cpu" else device.type


def machine_key(device) -> dict:
    """The part of every run fingerprint that says where it ran: the resolved device (never 'auto'), its name
    and the torch version. A finished run from another machine or torch is then stale, never read back into
    this one's summary (its ms/step, memory and numerics belong to that machine)."""
    import torch
    device = torch.device(device)
    return {"device": device.type, "device_name": device_name(device), "torch": torch.__version__}


def _git_state() -> tuple[str | None, bool | None]:
    """(HEAD commit, tracked files modified?) of the checkout holding this file; (None, None) without git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip())


# ----------------------------------------------------------------------------- atomic saves
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block finishes, rename it onto `path` (a crash never leaves
    half a file, and a failed write leaves the old file as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj) -> None:
    """Standard JSON (NaN/inf written as null), indent 2, written atomically (by rank 0 only under torchrun)."""
    text = json.dumps(_clean(obj), indent=2, allow_nan=False)
    if not distributed.is_main():
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text, written atomically (by rank 0 only under torchrun)."""
    if not distributed.is_main():
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_save_torch(obj, path: str | Path) -> None:
    """torch.save, atomically (by rank 0 only under torchrun)."""
    import torch
    if not distributed.is_main():
        return
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class CorruptFile(ValueError):
    """A results/checkpoint file that cannot be read back (half-written, truncated, not what it should be)."""

    def __init__(self, path: Path, detail: str, fix: str):
        super().__init__(f"{path} is truncated or corrupt ({detail}); {fix}")
        self.path = path


RECORD_FIX = "delete it or pass --overwrite (only that run is redone; the other finished runs are kept)"


def read_json(path: str | Path, fix: str = RECORD_FIX) -> dict:
    """The JSON object in `path`; a truncated/corrupt file raises CorruptFile (a ValueError) naming the path
    and `fix` — never a bare "Expecting ':' delimiter"."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptFile(path, f"{e.msg} at line {e.lineno} column {e.colno}", fix) from None
    except UnicodeDecodeError:
        raise CorruptFile(path, "not UTF-8 text", fix) from None
    if not isinstance(obj, dict):
        raise CorruptFile(path, f"a JSON {type(obj).__name__}, not an object", fix)
    return obj


def load_torch(path: str | Path, map_location=None, fix: str = "delete it (it is recomputed)"):
    """torch.load(weights_only=True) of a file written by atomic_save_torch; a truncated/corrupt file raises
    CorruptFile (a ValueError) naming the path and `fix`."""
    import torch
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)  # never runs code from the file
    except Exception as e:  # a truncated zip, an unpickling error, a foreign file: all one line for the user
        lines = str(e).strip().splitlines()
        raise CorruptFile(path, f"{type(e).__name__}: {lines[0][:120]}" if lines else type(e).__name__, fix) from None


def _clean(obj):
    """NaN/inf -> None so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- finished runs
def check_stale(out: str | Path, expected: Mapping[Path, str], overwrite: bool) -> list[Path]:
    """The run records among `expected` ({record path: fingerprint of the config it must have been made
    with}) that exist with another `config_fingerprint`. Refuses (ValueError) if there are any and
    `overwrite` is false: finished runs are never silently mixed with or replaced by another config's. A
    truncated/corrupt record is refused naming it (CorruptFile), or with `overwrite` deleted alone (not returned)."""
    stale = []
    for p, key in expected.items():
        if not p.exists():
            continue
        try:
            found = read_json(p).get("config_fingerprint")
        except CorruptFile:
            if not overwrite:
                raise
            p.unlink()  # only this run is redone; every other finished run is kept
            print(f"removed the corrupt run record {p} (--overwrite): that run is redone", file=sys.stderr)
            continue
        if found != key:
            stale.append(p)
    if stale and not overwrite:
        raise ValueError(f"{out} holds {len(stale)} finished run(s) made with a different config "
                         f"(e.g. {stale[0]}); use another --out or pass --overwrite to replace them")
    return stale


# ----------------------------------------------------------------------------- command line
class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2 (no usage block)."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(job: Callable[[], object], failures: tuple[type[BaseException], ...] = ()) -> int:
    """Run `job()` the way every CLI here does: a user error (ValueError) is one line and exit 2; an
    exception of a `failures` type (e.g. train.TrainingDiverged) one line and exit 1; Ctrl-C keeps what is
    finished (exit 130); anything else is a bug and shows its traceback. Under torchrun the line comes from
    rank 0 only (every rank meets the same user error)."""
    def say(line: str) -> None:
        if distributed.is_main():
            print(line, file=sys.stderr)
    try:
        job()
    except ValueError as e:
        say(f"error: {e}")
        return 2
    except failures as e:
        say(f"error: {e} (finished runs are kept)")
        return 1
    except KeyboardInterrupt:
        say("interrupted: finished runs are kept and will be read back next time")
        return 130
    return 0
