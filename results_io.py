"""Result files: atomic JSON, mean with a 95 % confidence interval over seeds, Markdown tables."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

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


def atomic_write_json(path: str | Path, obj) -> None:
    """Write JSON to a temp file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False))
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(obj):
    """NaN/inf -> None so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


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
