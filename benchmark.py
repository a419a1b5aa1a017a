"""Speed and memory of attention paths across sequence lengths.

    python benchmark.py [--device cpu|cuda] [--seq-lens 1024 2048 4096 8192 16384] [--top-k 256] [--heads 8]
                        [--head-dim 64] [--batch 1] [--dtype float32|bfloat16] [--out results] [--end-to-end]

Per backend and length: forward and forward+backward time *including* the indexer and top-k (selection
runs under no_grad, as in the model), the indexer+top-k time alone, and peak memory. Times are medians
of `--repeats` runs after one warm-up (CUDA events on GPU). Peak memory: on CUDA
`torch.cuda.max_memory_allocated` above the inputs; on CPU the resident-set high-water mark sampled
every millisecond during one fwd+bwd, above the RSS before it (after `malloc_trim`), so it includes
allocator slack and is approximate. Backends that cannot run on the device are listed with a note,
never a number. `--end-to-end` times one training step of the sparse vs the classic MoE LLM instead.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

from results_io import OneLineArgumentParser, atomic_write_json

INDEXER_SIZES = ((4, 64), (2, 32), (1, 16), (1, 8))  # (heads, dim) for the indexer-cost table


def parse_args(argv=None) -> argparse.Namespace:
    from config import ModelConfig
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--indexer-heads", type=int, default=ModelConfig.indexer_heads, help="the model's indexer")
    p.add_argument("--indexer-dim", type=int, default=ModelConfig.indexer_dim)
    p.add_argument("--block-size", type=int, default=ModelConfig.sparse_block_size)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results")
    p.add_argument("--end-to-end", action="store_true", help="time one training step, sparse vs classic LLM")
    p.add_argument("--e2e-seq-len", type=int, default=4096)
    args = p.parse_args(argv)
    for name in ("top_k", "heads", "head_dim", "batch", "indexer_heads", "indexer_dim", "block_size", "repeats",
                 "e2e_seq_len"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
    if any(L < 2 for L in args.seq_lens):
        p.error(f"--seq-lens {args.seq_lens} must all be >= 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device; use --device cpu")
    if args.device == "cpu" and args.dtype == "bfloat16":
        p.error("--dtype bfloat16 is for --device cuda (CPU bf16 timings are not meaningful); use float32")
    return args


# ----------------------------------------------------------------------------- measuring
class Meter:
    """Median wall time (CUDA events on GPU) and peak memory of a callable."""

    def __init__(self, device: str, repeats: int):
        self.cuda, self.repeats = device == "cuda", repeats

    def time_ms(self, fn) -> float:
        fn()  # warm-up (compiles, caches)
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_mb(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        _malloc_trim()
        base = _rss()
        peak, done = [base], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.001)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            fn()
        finally:
            done.set()
            sampler.join()
        return max(0, peak[0] - base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# ----------------------------------------------------------------------------- backends
def _skip_reason(backend: str, device: str) -> str | None:
    if backend == "triton":
        if device == "cpu":
            return "triton needs CUDA (the CPU interpreter is a correctness tool, not a speed)"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    if backend == "flex" and device == "cpu":
        return "flex_attention has no backward on CPU"
    if backend.startswith("sdpa_") and device == "cpu":
        return "flash/cuDNN SDPA are CUDA backends"
    return None


def backend_list(device: str) -> list[str]:
    dense = ["sdpa", "sdpa_flash", "sdpa_cudnn"] if device == "cuda" else ["sdpa"]
    return dense + ["gather", "block", "triton", "flex"]


def make_inputs(args, L: int, indexer_heads: int, indexer_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    B, H, D = args.batch, args.heads, args.head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dt)
    qkv = [rnd(B, H, L, D).requires_grad_() for _ in range(3)]  # (B, H, L, D)
    indexer = (rnd(B, L, indexer_heads, indexer_dim), rnd(B, L, indexer_dim), rnd(B, L, indexer_heads))
    return qkv, indexer, rnd(B, H, L, D)


def _sdpa_context(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if backend == "sdpa_flash":
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    if backend == "sdpa_cudnn":
        return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
    import contextlib
    return contextlib.nullcontext()


def step_fns(backend: str, args, qkv, indexer, grad_out):
    """-> (select, forward, forward_backward) closures for one backend (select is None for dense)."""
    from models import BACKENDS
    q, k, v = qkv
    if backend.startswith("sdpa"):
        def fwd():
            with _sdpa_context(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        select = None
    else:
        path = BACKENDS[backend](args.block_size) if backend in ("block", "flex") else BACKENDS[backend]()

        def select():
            return path.select_indexed(*indexer, args.top_k)

        def fwd():
            return path.attend(q, k, v, selection=select())[0]

    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        torch.autograd.grad(fwd(), (q, k, v), grad_out)
    return select, fwd_only, fwd_bwd


def measure(args, meter: Meter, backend: str, L: int, qkv, indexer, grad_out) -> dict:
    row = {"backend": backend, "seq_len": L, "top_k": args.top_k, "fwd_ms": None, "fwd_bwd_ms": None,
           "peak_mem_mb": None, "indexer_ms": None, "speedup_vs_sdpa": None, "note": ""}
    reason = _skip_reason(backend, args.device)
    if reason:
        row["note"] = reason
        return row
    select, fwd_only, fwd_bwd = step_fns(backend, args, qkv, indexer, grad_out)
    try:
        row["fwd_ms"] = meter.time_ms(fwd_only)
        row["fwd_bwd_ms"] = meter.time_ms(fwd_bwd)
        row["peak_mem_mb"] = meter.peak_mb(fwd_bwd)
        if select is not None:
            row["indexer_ms"] = meter.time_ms(select)
    except (RuntimeError, ValueError) as err:  # e.g. a CUDA SDPA backend unavailable for this shape/GPU
        row.update(fwd_ms=None, fwd_bwd_ms=None, peak_mem_mb=None, indexer_ms=None)
        row["note"] = f"failed: {str(err).splitlines()[0][:120]}"
    return row


def indexer_cost(args, meter: Meter, L: int, sdpa_row: dict) -> list[dict]:
    """Token-level chunked indexer + top-k time for several indexer sizes, as a share of dense SDPA."""
    import kernels
    rows = []
    for heads, dim in INDEXER_SIZES:
        _, indexer, _ = make_inputs(args, L, heads, dim, seed=1)
        ms = meter.time_ms(lambda: kernels.chunked_select(*indexer, args.top_k))
        fwd, fb = sdpa_row.get("fwd_ms"), sdpa_row.get("fwd_bwd_ms")
        rows.append({"seq_len": L, "indexer": f"{heads}x{dim}", "indexer_ms": ms,
                     "share_of_sdpa_fwd": ms / fwd if fwd else None,
                     "share_of_sdpa_fwd_bwd": ms / fb if fb else None})
    return rows


@torch.no_grad()
def selection_quality(args, L: int) -> list[dict]:
    """Token-level (gather) vs block selection at the same k on peaky random attention, both with the same
    informative indexer (the attention queries and head-mean keys): dense-attention mass inside the selected
    set (recall, rows with t >= k + block) and relative output error vs dense attention. A proxy only: the
    real quality comparison is the trained models' loss (run_experiment.py)."""
    from backends import BlockBackend, GatherBackend
    from sparse_attention import causal_attention_probs, sparse_attention_masked
    g = torch.Generator().manual_seed(2)
    B, H, D = 1, args.heads, args.head_dim
    q, k, v = (torch.randn(B, H, L, D, generator=g) * s for s in (2.0, 2.0, 1.0))
    iq, ik, iw = q.transpose(1, 2), k.mean(1), torch.ones(B, L, H)  # indexer = the attention's own q, mean k
    dense_p = causal_attention_probs(q, k)  # (B, H, L, L)
    dense_out = dense_p @ v
    rows = []
    for backend in (GatherBackend(), BlockBackend(args.block_size)):
        selection = backend.select_indexed(iq, ik, iw, args.top_k)
        idx, valid = selection.selected_idx, selection.valid
        out, _ = sparse_attention_masked(q, k, v, idx, valid)
        mass = (dense_p.gather(-1, idx.clamp(min=0)[:, None].expand(-1, H, -1, -1)) * valid[:, None]).sum(-1)
        rows_t = torch.arange(L) >= args.top_k + args.block_size
        rows.append({"backend": backend.name, "seq_len": L, "top_k": args.top_k,
                     "recall": float(mass[..., rows_t].mean()) if rows_t.any() else None,
                     "rel_err_vs_dense": float((out - dense_out).norm() / dense_out.norm())})
    return rows


# ----------------------------------------------------------------------------- end to end
def end_to_end(args, meter: Meter) -> list[dict]:
    """One training step (fwd + bwd + AdamW) of SparseAttentionMoELLM (sparse stage: LM loss + indexer KL)
    vs ClassicAttentionMoELLM at quick-preset widths, L = --e2e-seq-len, k = --top-k."""
    import dataclasses
    from config import PRESETS, ModelConfig
    from models import ClassicAttentionMoELLM, SparseAttentionMoELLM
    from sparse_attention import DENSE, AttentionMode
    quick = {f.name: PRESETS["quick"][f.name] for f in dataclasses.fields(ModelConfig) if f.name in PRESETS["quick"]}
    L = args.e2e_seq_len
    rows, base = [], None
    for name, backend in (("classic", "masked"), ("sparse_gather", "gather"), ("sparse_block", "block")):
        cfg = ModelConfig(vocab_size=4096, max_seq_len=L, sparse_top_k=args.top_k, attention_backend=backend,
                          sparse_block_size=args.block_size, **quick)
        torch.manual_seed(0)
        model = (ClassicAttentionMoELLM if name == "classic" else SparseAttentionMoELLM)(cfg).to(args.device)
        mode = AttentionMode(sparse=True, indexer_loss="sparse") if name != "classic" else DENSE
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, L + 1), generator=torch.Generator().manual_seed(0))
        ids = ids.to(args.device)

        def step():
            logits, aux = model(ids[:, :-1], mode, return_aux=True)
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + aux.balance_loss
            if name != "classic":
                loss = loss + aux.indexer_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ms = meter.time_ms(step)
        base = base or ms
        rows.append({"model": name, "seq_len": L, "top_k": args.top_k, "step_ms": ms, "ratio_vs_classic": ms / base})
    return rows


# ----------------------------------------------------------------------------- output
def plot_scaling(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        pts = [r for r in rows if r["backend"] == backend and r["fwd_bwd_ms"] is not None]
        if not pts:
            continue
        Ls = [r["seq_len"] for r in pts]
        axes[0].plot(Ls, [r["fwd_bwd_ms"] for r in pts], "o-", label=backend)
        axes[1].plot(Ls, [max(r["peak_mem_mb"], 1e-3) for r in pts], "o-", label=backend)
    for ax, title, unit in ((axes[0], "fwd+bwd time (incl. indexer + top-k)", "ms"),
                            (axes[1], "peak memory (fwd+bwd)", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'backend':<11}{'L':>7}{'k':>6}{'fwd ms':>11}{'fwd+bwd ms':>12}{'indexer ms':>12}"
             f"{'peak MiB':>10}{'x sdpa':>8}  note"]
    for r in rows:
        lines.append(f"{r['backend']:<11}{r['seq_len']:>7}{r['top_k']:>6}{_fmt(r['fwd_ms']):>11}"
                     f"{_fmt(r['fwd_bwd_ms']):>12}{_fmt(r['indexer_ms']):>12}{_fmt(r['peak_mem_mb']):>10}"
                     f"{_fmt(r['speedup_vs_sdpa'], '.2f'):>8}  {r['note']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm
    meter = Meter(args.device, args.repeats)
    header = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "dtype": args.dtype, "batch": args.batch, "heads": args.heads,
              "head_dim": args.head_dim, "indexer": f"{args.indexer_heads}x{args.indexer_dim}",
              "block_size": args.block_size,
              "peak_mem_method": ("torch.cuda.max_memory_allocated above the inputs" if args.device == "cuda" else
                                  "RSS high-water mark sampled every 1 ms during one fwd+bwd, above RSS before it")}
    if args.end_to_end:
        rows = end_to_end(args, meter)
        atomic_write_json(os.path.join(args.out, "benchmark_end_to_end.json"), {**header, "rows": rows})
        for r in rows:
            print(f"{r['model']:<14} L={r['seq_len']} k={r['top_k']}  step {r['step_ms']:.0f} ms  "
                  f"x classic {r['ratio_vs_classic']:.2f}")
        return 0
    backends = backend_list(args.device)
    rows, cost = [], []
    with tqdm(total=len(args.seq_lens) * len(backends), desc="benchmark", file=sys.stderr) as bar:
        for L in args.seq_lens:
            qkv, indexer, grad_out = make_inputs(args, L, args.indexer_heads, args.indexer_dim)
            for backend in backends:
                bar.set_postfix_str(f"L={L} {backend}")
                rows.append(measure(args, meter, backend, L, qkv, indexer, grad_out))
                bar.update()
            sdpa = next(r for r in rows if r["backend"] == "sdpa" and r["seq_len"] == L)
            for r in rows:
                if r["seq_len"] == L and r["fwd_bwd_ms"] and sdpa["fwd_bwd_ms"]:
                    r["speedup_vs_sdpa"] = sdpa["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            cost += indexer_cost(args, meter, L, sdpa)
            del qkv, indexer, grad_out
    quality = selection_quality(args, min(args.seq_lens[0], 2048))
    atomic_write_json(os.path.join(args.out, "benchmark.json"),
               {**header, "rows": rows, "indexer_cost": cost, "selection_quality": quality})
    plot_scaling(rows, os.path.join(args.out, "benchmark_scaling.png"))
    print(format_table(rows))
    print("\nindexer (chunked scores + top-k) cost vs dense SDPA causal")
    print(f"{'L':>7}{'indexer':>9}{'ms':>10}{'/ sdpa fwd':>12}{'/ sdpa fwd+bwd':>16}")
    for c in cost:
        print(f"{c['seq_len']:>7}{c['indexer']:>9}{c['indexer_ms']:>10.1f}{_fmt(c['share_of_sdpa_fwd'], '.2f'):>12}"
              f"{_fmt(c['share_of_sdpa_fwd_bwd'], '.2f'):>16}")
    print("\nselection quality proxy (same indexer, same k): token-level DSA vs query-block-shared")
    for qrow in quality:
        print(f"  {qrow['backend']:<7} L={qrow['seq_len']} recall {_fmt(qrow['recall'], '.3f')}  "
              f"rel. error vs dense {qrow['rel_err_vs_dense']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
