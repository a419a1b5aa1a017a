"""Speed and memory of attention paths across sequence lengths.

    python benchmark.py --gpu-check [--dataset PATH]   # the one GPU check (gpu_check.py)
    python benchmark.py [--attention mha|mqa] [--device cpu|cuda] [--seq-lens 1024 2048 4096 8192 16384]
                        [--top-k 256] [--heads 8] [--head-dim 64] [--batch 1] [--dtype float32|bfloat16]
                        [--out results] [--end-to-end [--attention-type mha|mla]]
                        [--backends sdpa gather ...] [--no-memory] [--repeats 3]

`--attention mha`: H heads with their own K/V rows (the MHA model). `--attention mqa`: H query heads sharing
ONE KV row per token of the same head dim (keys = values = that row, as MLA's MQA mode attends over its
latent rows; the sparse path is the backend's `attend_latent`).

Per backend and length: forward and forward+backward time *including* the indexer and top-k (selection
runs under no_grad, as in the model), the indexer+top-k time alone, and peak memory. Times are medians
of `--repeats` runs after one warm-up (CUDA events on GPU; on CPU a warm-up slower than 10 s counts as one of
the runs). Dense baselines: SDPA causal on the same shapes
(MQA: both with `enable_gqa=True` and with K/V expanded to H heads); on CUDA also each of SDPA's math /
flash / efficient / cuDNN backends. Every speedup is against the FASTEST dense row at that length, and the
crossover length of a sparse backend is the smallest measured L from which on (at that L and every longer
one measured) its fwd+bwd beats that baseline.
Peak memory: on CUDA `torch.cuda.max_memory_allocated` above the inputs; on CPU each (backend, L) runs one
fwd+bwd in a FRESH subprocess: after one warm-up step on a small problem and building the inputs it resets its peak-RSS counter
(/proc/self/clear_refs) and reads VmHWM after a second step: the high-water mark above the resident set before
it (incl. allocator slack; blocks >= 128 KiB are mmapped, so freed memory leaves the RSS). (A child's ru_maxrss is not used: on Linux it inherits the parent's peak across fork/vfork + exec.)
Backends that cannot run on the device are listed with a note, never a number. `--end-to-end` times one
training step of the sparse vs the classic MoE LLM instead (`--attention-type mla`: the MLA models).
`--decode` times generation instead (dsa_lab/inference/decode.py): per cached prefix L in --seq-lens, MHA and MLA, one sparse
model at --decode-preset widths prefills L random tokens, then the median time of one decode step (batch
--batch) on the dense path (attention over every cached key, as the classic model decodes) vs DSA's decode
path (k = --top-k), the two timed in turns on the same cache.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from dsa_lab.common.results_io import OneLineArgumentParser, atomic_write_json, device_name

INDEXER_SIZES = ((4, 64), (2, 32), (1, 16), (1, 8))  # (heads, dim) for the indexer-cost table
SDPA_KERNELS = ("math", "flash", "efficient", "cudnn")  # SDPA's explicit backends (CUDA rows)
SPARSE_BACKENDS = {"mha": ("gather", "gather_bf16", "gather_torch", "block", "triton", "flex"), "mqa": ("gather", "triton")}
# benchmark rows beside the backends: gather_bf16 = gather with the bf16 indexer GEMM (chunked_select index_dtype);
# gather_torch = gather's torch path (the C++ kernel's twin, what 'gather' ran before it; KV heads repeated for GQA)
GOALS = (  # issue 31's goal rows: (name, attention, L, what, target ratio vs the fastest dense fwd+bwd)
    ("MHA token-level (gather) fwd+bwd incl. indexer", "mha", 16384, "gather", 0.5),
    ("indexer 4x64 + top-k (fp32)", "mha", 16384, "indexer", 0.12),
    ("MQA token-level (gather) fwd+bwd incl. indexer", "mqa", 16384, "gather", 0.33),
    ("best sparse backend fwd+bwd incl. indexer", "mha", 8192, "best", 0.33))
MEMORY_FLAG = "--_measure-memory"
SDPA_MATH_MAX_L = 8192  # sdpa_math materialises (B, H, L, L) fp32 scores (bf16 is upcast): 64 GiB at L 32768, H 16
RETROFIT_LENS, RETROFIT_TOP_K = (2048, 4096, 8192), 128  # --retrofit's defaults (issue 31's table)
SLOW_WARMUP_S = 10.0  # CPU: a warm-up call slower than this counts as one of the --repeats samples


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The --decode and --retrofit modes' flags."""
    p.add_argument("--decode", action="store_true", help="decode tokens/s at a cached prefix, dense vs sparse")
    p.add_argument("--decode-steps", type=int, default=20, help="--decode: timed decode steps per row (median)")
    p.add_argument("--decode-preset", default="default", choices=["quick", "default"],
                   help="--decode: the model widths (config.PRESETS)")
    p.add_argument("--retrofit", action="store_true",
                   help="SmolLM2 retrofit: prefill ms and decode tokens/s, dense vs DSA (defaults L 2048 4096 8192, k 128)")
    p.add_argument("--retrofit-model", default=None, help="--retrofit: smollm2 (default) or a Llama-family NAME|PATH")
    p.add_argument("--retrofit-backend", default="gather", choices=["gather", "masked", "sdpa_mask"],
                   help="--retrofit: DSA's attention backend in the prefill")
    p.add_argument("--retrofit-index-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="--retrofit: DSA's indexer GEMM (bf16: q and k rounded, the decode's indexer-key cache in bf16)")
    p.add_argument("--recompute-len", type=int, default=2048,
                   help="--retrofit: context of the generation without caches (a full forward per token)")


def parse_args(argv=None) -> argparse.Namespace:
    from config import ATTENTION_TYPES, ModelConfig
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attention", default="mha", choices=["mha", "mqa"],
                   help="mha: per-head K/V; mqa: H query heads sharing one KV row per token")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--indexer-heads", type=int, default=ModelConfig.indexer_heads,
                   help="the model's indexer (--retrofit: the retrofitted indexers'; 4 x 64 as the retrofit presets', "
                        "16 = the capacity lever heads16)")
    p.add_argument("--indexer-dim", type=int, default=ModelConfig.indexer_dim)
    p.add_argument("--block-size", type=int, default=ModelConfig.sparse_block_size)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop starting rows after this many seconds (each later row says so); default: no limit")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="only these rows (dense and sparse names as printed; default: all of --attention's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocess of every row (faster)")
    p.add_argument("--out", default="results")
    p.add_argument("--end-to-end", action="store_true", help="time one training step, sparse vs classic LLM")
    p.add_argument("--e2e-seq-len", type=int, default=4096)
    p.add_argument("--attention-type", default="mha", choices=list(ATTENTION_TYPES),
                   help="--end-to-end only: the MHA or the MLA model pair")
    add_generation_args(p)
    p.add_argument(MEMORY_FLAG, nargs=2, metavar=("BACKEND", "L"), default=None, help=argparse.SUPPRESS)
    if "--retrofit" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(seq_lens=list(RETROFIT_LENS), top_k=RETROFIT_TOP_K)
    args = p.parse_args(argv)
    for name in ("top_k", "heads", "head_dim", "batch", "indexer_heads", "indexer_dim", "block_size", "repeats",
                 "e2e_seq_len", "decode_steps", "recompute_len"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        p.error(f"--time-budget-s={args.time_budget_s} must be positive (or left out: no limit)")
    if any(L < 2 for L in args.seq_lens):
        p.error(f"--seq-lens {args.seq_lens} must all be >= 2")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error(f"benchmark.py runs in one process (one device), but WORLD_SIZE={os.environ['WORLD_SIZE']} "
                f"(torchrun); start it with python")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device; use --device cpu")
    if args.device == "cpu" and args.dtype == "bfloat16":
        p.error("--dtype bfloat16 is for --device cuda (CPU bf16 timings are not meaningful); use float32")
    if args.backends:
        known = backend_list(args.device, args.attention)
        unknown = [b for b in args.backends if b not in known]
        if unknown:
            p.error(f"--backends {' '.join(unknown)} unknown for --attention {args.attention}; choose from {' '.join(known)}")
    if args.attention_type != "mha" and not args.end_to_end:
        p.error("--attention-type picks the models of --end-to-end; for the kernel tables use --attention mha|mqa")
    return args


# ----------------------------------------------------------------------------- measuring
class Meter:
    """Median wall time (CUDA events on GPU) of a callable."""

    def __init__(self, device: str, repeats: int):
        self.cuda, self.repeats = device == "cuda", repeats

    def time_ms(self, fn) -> float:
        t0 = time.perf_counter()
        fn()  # warm-up (compiles, caches)
        warm_s = time.perf_counter() - t0
        times, repeats = [], self.repeats
        if not self.cuda and warm_s > SLOW_WARMUP_S:  # a very slow call: one-time set-up is noise, keep it as a sample
            times, repeats = [warm_s * 1e3], self.repeats - 1
        for _ in range(repeats):
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


def cuda_peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def own_peak_mb(fn, warmup=None) -> float:
    """Peak resident memory of THIS process during fn() above its resident set before it (MiB). `warmup` (by
    default fn itself) runs first (one-time library/thread-pool initialisation is not the step's memory),
    freed heap pages are returned (malloc_trim), the peak-RSS counter is reset (echo 5 >
    /proc/self/clear_refs), then VmHWM is read after fn()."""
    (warmup or fn)()
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_kib("VmRSS")
    fn()
    return max(0, _proc_status_kib("VmHWM") - base) / 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def child_argv(args, backend: str, L: int) -> list[str]:
    """The command line that re-creates this run's inputs for one (backend, L) in a fresh process."""
    argv = [sys.executable, os.path.abspath(__file__), "--attention", args.attention, "--device", args.device,
            "--seq-lens", str(L), "--dtype", args.dtype, "--out", args.out]
    for name in ("top_k", "heads", "head_dim", "batch", "indexer_heads", "indexer_dim", "block_size"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv + [MEMORY_FLAG, backend, str(L)]


def cpu_peak_mb_fresh(args, backend: str, L: int) -> float:
    """Run one fwd+bwd of `backend` at length L in a fresh Python process and return its peak (MiB)."""
    result = subprocess.run(child_argv(args, backend, L), capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__)),
                                 # big blocks mmapped and unmapped on free: RSS follows live memory
                                 "MALLOC_MMAP_THRESHOLD_": "131072"})
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"memory subprocess failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return float(json.loads(lines[-1])["peak_mem_mb"])


def measure_memory_child(args) -> int:
    """Entry point of the fresh subprocess: build the inputs, run one fwd+bwd, print its peak as JSON."""
    backend, L = args._measure_memory[0], int(args._measure_memory[1])
    small = make_inputs(args, min(L, 256), args.indexer_heads, args.indexer_dim)  # warm-up on a small problem
    _, _, warmup = step_fns(backend, args, small)
    inputs = make_inputs(args, L, args.indexer_heads, args.indexer_dim)
    _, _, fwd_bwd = step_fns(backend, args, inputs)
    print(json.dumps({"backend": backend, "seq_len": L, "peak_mem_mb": own_peak_mb(fwd_bwd, warmup)}))
    return 0


# ----------------------------------------------------------------------------- backends
def dense_backends(attention: str, device: str) -> list[str]:
    """SDPA rows: 'sdpa' (MHA) or 'sdpa_gqa' / 'sdpa_expand' (MQA), plus each explicit SDPA kernel on CUDA."""
    forms = ["sdpa"] if attention == "mha" else ["sdpa_gqa", "sdpa_expand"]
    kinds = [""] + [f"_{k}" for k in SDPA_KERNELS] if device == "cuda" else [""]
    return [f + k for f in forms for k in kinds]


def backend_list(device: str, attention: str = "mha") -> list[str]:
    return dense_backends(attention, device) + list(SPARSE_BACKENDS[attention])


def is_dense(backend: str) -> bool:
    return backend.startswith("sdpa")


def _skip_reason(backend: str, device: str, L: int = 0) -> str | None:
    if backend == "triton":
        if device == "cpu":
            return "triton needs CUDA (the CPU interpreter is a correctness tool, not a speed)"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    if backend == "flex" and device == "cpu":
        return "flex_attention has no backward on CPU"
    if is_dense(backend) and backend.split("_")[-1] in SDPA_KERNELS and device == "cpu":
        return "explicit SDPA kernels are CUDA rows"
    if backend.endswith("_math") and L > SDPA_MATH_MAX_L:
        return f"skipped: sdpa_math above L {SDPA_MATH_MAX_L} (its fp32 L x L scores do not fit)"
    return None


def failure_reason(err: BaseException) -> str:
    """One line for a row that raised: 'OOM: ...', 'compile error (Type): ...' (Triton / Inductor / Dynamo),
    else 'Type: first line of the message'."""
    first = (str(err).strip().splitlines() or [""])[0][:160]
    name, module = type(err).__name__, type(err).__module__
    if isinstance(err, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)) or \
            "out of memory" in first.lower():
        return f"OOM: {first}"
    if module.startswith(("triton", "torch._inductor", "torch._dynamo")) or name in ("CompilationError",
                                                                                     "OutOfResources"):
        return f"compile error ({name}): {first}"
    return f"{name}: {first}"


def make_inputs(args, L: int, indexer_heads: int, indexer_dim: int, seed: int = 0) -> dict:
    """Inputs of one length. MHA: q, k, v (B, H, L, D). MQA: the sparse layout q (B, L, H, D), kv (B, L, D) and
    the SDPA layout of the SAME values, q (B, H, L, D), kv (B, 1, L, D) (layout changes are not timed)."""
    g = torch.Generator().manual_seed(seed)
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    B, H, D = args.batch, args.heads, args.head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dt)
    indexer = (rnd(B, L, indexer_heads, indexer_dim), rnd(B, L, indexer_dim), rnd(B, L, indexer_heads))
    if args.attention == "mha":
        qkv = [rnd(B, H, L, D).requires_grad_() for _ in range(3)]  # (B, H, L, D)
        return {"indexer": indexer, "qkv": qkv, "grad_out": rnd(B, H, L, D)}
    q, kv, grad_out = rnd(B, L, H, D), rnd(B, L, D), rnd(B, L, H, D)
    return {"indexer": indexer, "grad_out": grad_out.transpose(1, 2).contiguous(), "grad_out_lhd": grad_out,
            "q_lhd": q.clone().requires_grad_(), "kv": kv.clone().requires_grad_(),  # sparse layout
            "q": q.transpose(1, 2).contiguous().requires_grad_(), "kv1": kv[:, None].clone().requires_grad_()}


def _sdpa_context(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kind = backend.split("_")[-1]
    table = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    if kind in table:
        return sdpa_kernel(table[kind])
    import contextlib
    return contextlib.nullcontext()


def step_fns(backend: str, args, inputs: dict):
    """-> (select, forward, forward_backward) closures for one backend (select is None for dense)."""
    from dsa_lab.kernels.backends import sparse_attention_gather_torch
    indexer = inputs["indexer"]
    select = None
    if args.attention == "mha":
        q, k, v = inputs["qkv"]
        leaves, grad_out = (q, k, v), inputs["grad_out"]
    elif is_dense(backend):
        q, kv1 = inputs["q"], inputs["kv1"]
        leaves, grad_out = (q, kv1), inputs["grad_out"]
    else:
        q, kv = inputs["q_lhd"], inputs["kv"]
        leaves, grad_out = (q, kv), inputs["grad_out_lhd"]
    if is_dense(backend):
        def fwd():
            with _sdpa_context(backend):
                if args.attention == "mha":
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                if backend.startswith("sdpa_gqa"):
                    return F.scaled_dot_product_attention(q, kv1, kv1, is_causal=True, enable_gqa=True)
                kv_h = kv1.expand(-1, args.heads, -1, -1)  # (B, H, L, D): the expand's backward sums over heads
                return F.scaled_dot_product_attention(q, kv_h, kv_h, is_causal=True)
    else:
        path = sparse_path(backend, args.block_size)

        def select():
            return path.select_indexed(*indexer, args.top_k)

        if args.attention == "mha":
            attend = (lambda *a, selection: sparse_attention_gather_torch(*a, selection)) if backend == "gather_torch" \
                else path.attend

            def fwd():
                return attend(q, k, v, selection=select())[0]
        else:
            D = args.head_dim

            def fwd():
                return path.attend_latent(q, kv, selection=select(), v_dim=D, scale=D ** -0.5)[0]

    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        torch.autograd.grad(fwd(), leaves, grad_out)
    return select, fwd_only, fwd_bwd


def sparse_path(backend: str, block_size: int):
    """The backend object of a sparse benchmark row (gather_bf16 / gather_torch are gather rows, see SPARSE_BACKENDS)."""
    from models import BACKENDS
    if backend in ("block", "flex"):
        return BACKENDS[backend](block_size)
    if backend == "gather_bf16":
        return BACKENDS["gather"](index_dtype=torch.bfloat16)
    return BACKENDS["gather" if backend == "gather_torch" else backend]()


def measure(args, meter: Meter, backend: str, L: int, inputs: dict) -> dict:
    """One row: its times and peak memory, or in `note` why it has none (skipped, or the one-line failure)."""
    row = empty_row(args, backend, L)
    reason = _skip_reason(backend, args.device, L)
    if reason:
        row["note"] = reason
        return row
    t0 = time.perf_counter()
    if backend in ("gather", "gather_bf16") and args.attention == "mha":
        from dsa_lab.kernels.cpu_sparse import kernel_available, kernel_status
        row["note"] = "C++ kernel" if kernel_available(inputs["qkv"][0]) else "torch path: " + (
            kernel_status() if args.device == "cpu" else args.device)
    try:
        select, fwd_only, fwd_bwd = step_fns(backend, args, inputs)
        row["fwd_ms"] = meter.time_ms(fwd_only)
        row["fwd_bwd_ms"] = meter.time_ms(fwd_bwd)
        if not args.no_memory:
            row["peak_mem_mb"] = cuda_peak_mb(fwd_bwd) if args.device == "cuda" else cpu_peak_mb_fresh(args, backend, L)
        if select is not None:
            row["indexer_ms"] = meter.time_ms(select)
            row["indexer_share_of_fwd"] = row["indexer_ms"] / row["fwd_ms"]
    except Exception as err:  # noqa: BLE001 - any failure (OOM, Triton compile error, unavailable kernel) is a row
        row.update(fwd_ms=None, fwd_bwd_ms=None, peak_mem_mb=None, indexer_ms=None)
        row["note"] = f"failed: {failure_reason(err)}"
        if args.device == "cuda":
            torch.cuda.empty_cache()
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def attach_baseline(rows: list[dict]) -> None:
    """Per length: the fastest dense row (fwd+bwd) is the baseline; speedup_vs_sdpa = its time / a row's time."""
    for L in dict.fromkeys(r["seq_len"] for r in rows):
        at_L = [r for r in rows if r["seq_len"] == L]
        dense = [r for r in at_L if r["dense"] and r["fwd_bwd_ms"]]
        if not dense:
            continue
        best = min(dense, key=lambda r: r["fwd_bwd_ms"])
        for r in at_L:
            if r["fwd_bwd_ms"]:
                r["speedup_vs_sdpa"] = best["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                r["baseline"] = best["backend"]


def crossover_lengths(rows: list[dict]) -> dict[str, int | None]:
    """Per sparse backend with numbers: the smallest measured L from which on (at L and every longer measured L)
    its fwd+bwd beats the fastest dense baseline; None if it does not beat it at the longest length."""
    out = {}
    for backend in dict.fromkeys(r["backend"] for r in rows if not r["dense"]):
        pts = sorted((r["seq_len"], r["speedup_vs_sdpa"]) for r in rows if r["backend"] == backend)
        if not any(s is not None for _, s in pts):
            continue
        crossover = None
        for L, speedup in reversed(pts):
            if speedup is None or speedup <= 1.0:
                break
            crossover = L
        out[backend] = crossover
    return out


def indexer_cost(args, meter: Meter, L: int, dense_row: dict) -> list[dict]:
    """Token-level chunked indexer + top-k time for several indexer sizes, as a share of the dense baseline; the
    model's indexer also with its q.k GEMM in bf16 (chunked_select index_dtype), with the share of slots its sets
    share with the fp32 sets on the same inputs."""
    from dsa_lab.kernels import chunked as kernels
    rows = []
    sizes = [(h, d, None) for h, d in INDEXER_SIZES] + [(args.indexer_heads, args.indexer_dim, torch.bfloat16)]
    for heads, dim, index_dtype in sizes:
        indexer = make_inputs(args, L, heads, dim, seed=1)["indexer"]
        ms = meter.time_ms(lambda: kernels.chunked_select(*indexer, args.top_k, index_dtype=index_dtype))
        fwd, fb = dense_row.get("fwd_ms"), dense_row.get("fwd_bwd_ms")
        rows.append({"seq_len": L, "indexer": f"{heads}x{dim}" + (" bf16" if index_dtype else ""), "indexer_ms": ms,
                     "baseline": dense_row["backend"], "share_of_sdpa_fwd": ms / fwd if fwd else None,
                     "share_of_sdpa_fwd_bwd": ms / fb if fb else None,
                     "set_overlap_vs_fp32": set_overlap(kernels.chunked_select(*indexer, args.top_k, index_dtype=index_dtype)[0],
                                                        kernels.chunked_select(*indexer, args.top_k)[0])
                     if index_dtype else None})
    return rows


def set_overlap(idx_a: torch.Tensor, idx_b: torch.Tensor) -> float:
    """Selections (B, L, K) (-1 invalid) -> the share of idx_b's valid slots whose token idx_a also selects (rows
    hold distinct tokens, so a token present in both rows appears twice in their sorted concatenation)."""
    both = torch.cat([idx_a, idx_b], dim=-1).sort(dim=-1).values
    shared = ((both[..., 1:] == both[..., :-1]) & (both[..., 1:] >= 0)).sum()
    return shared.item() / (idx_b >= 0).sum().item()


@torch.no_grad()
def selection_quality(args, L: int) -> list[dict]:
    """Token-level (gather) vs block selection at the same k on peaky random attention, both with the same
    informative indexer (the attention queries and head-mean keys): dense-attention mass inside the selected
    set (recall, rows with t >= k + block) and relative output error vs dense attention; token-level also with
    the bf16 indexer GEMM (its recall change and set overlap with the fp32 sets). A proxy only: the
    real quality comparison is the trained models' loss (run_experiment.py). Runs on --device, in fp32."""
    from dsa_lab.kernels.backends import BlockBackend, GatherBackend
    from sparse_attention import causal_attention_probs, sparse_attention_masked
    g = torch.Generator().manual_seed(2)
    B, H, D = 1, args.heads, args.head_dim
    q, k, v = ((torch.randn(B, H, L, D, generator=g) * s).to(args.device) for s in (2.0, 2.0, 1.0))  # fp32
    iq, ik, iw = q.transpose(1, 2), k.mean(1), q.new_ones(B, L, H)  # indexer = the attention's own q, mean k
    dense_p = causal_attention_probs(q, k)  # (B, H, L, L)
    dense_out = dense_p @ v
    rows, fp32_idx = [], None
    for backend in (GatherBackend(), GatherBackend(index_dtype=torch.bfloat16), BlockBackend(args.block_size)):
        selection = backend.select_indexed(iq, ik, iw, args.top_k)
        idx, valid = selection.selected_idx, selection.valid
        fp32_idx = idx if fp32_idx is None else fp32_idx
        out, _ = sparse_attention_masked(q, k, v, idx, valid)
        mass = (dense_p.gather(-1, idx.clamp(min=0)[:, None].expand(-1, H, -1, -1)) * valid[:, None]).sum(-1)
        rows_t = torch.arange(L, device=q.device) >= args.top_k + args.block_size
        rows.append({"backend": backend.name + (" bf16 indexer" if backend.index_dtype else ""), "seq_len": L,
                     "top_k": args.top_k, "set_overlap_vs_fp32": set_overlap(idx, fp32_idx) if backend.index_dtype else None,
                     "recall": float(mass[..., rows_t].mean()) if rows_t.any() else None,
                     "rel_err_vs_dense": float((out - dense_out).norm() / dense_out.norm())})
    return rows


# ----------------------------------------------------------------------------- end to end
E2E_PRECISION = {"float32": "fp32", "bfloat16": "bf16 autocast (fp32 weights and optimizer)"}


def e2e_autocast(args):
    """--dtype bfloat16: the training step under CUDA bf16 autocast, as dsa_lab/training/train.py runs --dtype
    bf16; float32: no autocast."""
    import contextlib
    if args.dtype == "bfloat16":
        return torch.autocast(args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def end_to_end(args, meter: Meter, record: "Record | None" = None) -> list[dict]:
    """One training step (fwd + bwd + AdamW) of SparseAttentionMoELLM (sparse stage: LM loss + indexer KL)
    vs ClassicAttentionMoELLM at quick-preset widths, L = --e2e-seq-len, k = --top-k. With
    --attention-type mla: classic MLA (dense, MHA mode) vs sparse MLA (DSA in MQA mode, gather backend), with
    ModelConfig's MLA fields at their defaults. A model whose step raises is a row with the one-line reason; the
    record (if any) is rewritten after every row."""
    variants = [("classic", "masked"), ("sparse_gather", "gather")]
    if args.attention_type == "mha":
        variants.append(("sparse_block", "block"))
    rows, base = (record.rows if record else []), None
    for name, backend in variants:
        row = {"model": name, "attention_type": args.attention_type, "seq_len": args.e2e_seq_len,
               "top_k": args.top_k, "precision": E2E_PRECISION[args.dtype], "step_ms": None,
               "ratio_vs_classic": None, "note": ""}
        if record:
            record.running = {"model": name}
            record.write()
        try:
            ms = meter.time_ms(e2e_step(args, name, backend))
            base = ms if name == "classic" else base
            row.update(step_ms=ms, ratio_vs_classic=ms / base if base else None)
        except Exception as err:  # noqa: BLE001 - OOM or a compile error is this row's reason, the others run
            row["note"] = f"failed: {failure_reason(err)}"
            if args.device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    if record:
        record.running = None
    return rows


def e2e_step(args, name: str, backend: str):
    """The training-step closure of one model of the end-to-end comparison (built here, on --device)."""
    import dataclasses
    from config import PRESETS, ModelConfig
    from models import ClassicAttentionMoELLM, SparseAttentionMoELLM
    from sparse_attention import DENSE, AttentionMode
    quick = {f.name: PRESETS["quick"][f.name] for f in dataclasses.fields(ModelConfig)
             if f.name in PRESETS["quick"] and f.name != "attention_backend"}  # the backend is what is compared
    L, autocast = args.e2e_seq_len, e2e_autocast(args)
    cfg = ModelConfig(vocab_size=4096, max_seq_len=L, sparse_top_k=args.top_k, attention_backend=backend,
                      sparse_block_size=args.block_size, attention_type=args.attention_type, **quick)
    torch.manual_seed(0)
    model = (ClassicAttentionMoELLM if name == "classic" else SparseAttentionMoELLM)(cfg).to(args.device)
    mode = AttentionMode(sparse=True, indexer_loss="sparse") if name != "classic" else DENSE
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, L + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)

    def step():
        with autocast:
            logits, aux = model(ids[:, :-1], mode, return_aux=True)
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()) + aux.balance_loss
            if name != "classic":
                loss = loss + aux.indexer_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


# ----------------------------------------------------------------------------- decoding
def interleaved_ms(fns: dict, repeats: int, cuda: bool) -> dict:
    """{name: (median wall ms, median process-CPU ms)} of each callable, timed in turns (a, b, a, b, ...) after one
    discarded round (dsa_lab/common/timing.py), so that load from other processes on a shared machine falls on all
    of them alike. The process CPU time (all threads; None on CUDA) is what a call cost when other processes
    preempt it."""
    from dsa_lab.common.timing import interleaved
    samples = interleaved(fns, repeats, cuda)
    return {name: (statistics.median(s["wall_ms"]), None if cuda else statistics.median(s["cpu_ms"]))
            for name, s in samples.items()}


def decode_speed(args) -> list[dict]:
    """Per attention type (MHA, MLA) and cached prefix L: one SparseAttentionMoELLM (--decode-preset widths,
    k = --top-k) prefills L random tokens once (timed; the caches hold K/V or MLA latent rows and the indexer
    keys), then decode steps at position L alternate between the dense path (attention over all L + 1 cached
    positions: what the classic model's decode does) and DSA's decode path (indexer over the cached keys,
    top-k, attention over k of them). The state is rewound to L before every step, so each timed step sees the
    same cache. -> one row per (attention type, L, path) with the median wall and process-CPU ms per step."""
    import dataclasses
    from config import PRESETS, ModelConfig
    from dsa_lab.inference.decode import decode_step, prefill
    from models import SparseAttentionMoELLM
    widths = {f.name: PRESETS[args.decode_preset][f.name] for f in dataclasses.fields(ModelConfig)
              if f.name in PRESETS[args.decode_preset] and f.name != "attention_backend"}
    rows = []
    for attention_type in ("mha", "mla"):
        for L in args.seq_lens:
            cfg = ModelConfig(vocab_size=4096, max_seq_len=L + 1, sparse_top_k=args.top_k, attention_backend="gather",
                              attention_type=attention_type, **widths)
            torch.manual_seed(0)
            model = SparseAttentionMoELLM(cfg).to(args.device).eval()
            ids = torch.randint(0, cfg.vocab_size, (args.batch, L + 1), generator=torch.Generator().manual_seed(0))
            ids = ids.to(args.device)
            t0 = time.perf_counter()
            _, state = prefill(model, ids[:, :L])
            if args.device == "cuda":
                torch.cuda.synchronize()
            prefill_s = time.perf_counter() - t0

            def step(sparse: bool):
                state.length, state.sparse = L, sparse
                decode_step(model, state, ids[:, L:])
            ms = interleaved_ms({"dense": lambda: step(False), "sparse": lambda: step(True)}, args.decode_steps,
                                args.device == "cuda")
            for path in ("dense", "sparse"):
                (wall, cpu), (dense_wall, dense_cpu) = ms[path], ms["dense"]
                rows.append({"attention_type": attention_type, "decode": path, "cached_prefix": L,
                             "top_k": args.top_k if path == "sparse" else None, "batch": args.batch,
                             "prefill_s": prefill_s, "decode_ms_per_step": wall,
                             "decode_tokens_per_s": 1e3 * args.batch / wall, "speedup_vs_dense": dense_wall / wall,
                             "decode_cpu_ms_per_step": cpu, "cpu_speedup_vs_dense": cpu and dense_cpu / cpu})
    return rows


# ----------------------------------------------------------------------------- output
def plot_scaling(rows: list[dict], crossover: dict, path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        pts = [r for r in rows if r["backend"] == backend and r["fwd_bwd_ms"] is not None]
        if not pts:
            continue
        Ls = [r["seq_len"] for r in pts]
        label = backend
        if backend in crossover:
            label += f" (crossover {crossover[backend] or 'none'})"
        (line,) = axes[0].plot(Ls, [r["fwd_bwd_ms"] for r in pts], "o-", label=label)
        if crossover.get(backend):
            axes[0].axvline(crossover[backend], color=line.get_color(), ls=":", alpha=0.7)
        mem = [(r["seq_len"], r["peak_mem_mb"]) for r in pts if r["peak_mem_mb"] is not None]
        if mem:
            axes[1].plot([m[0] for m in mem], [max(m[1], 1e-3) for m in mem], "o-", label=backend)
    for ax, t, unit in ((axes[0], "fwd+bwd time (incl. indexer + top-k); dotted: crossover", "ms"),
                        (axes[1], "peak memory (fwd+bwd)", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(unit)
        ax.set_title(t, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no row has numbers: no legend (and no warning)
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _load_avg() -> list[float] | None:
    """The machine's load average (1, 5, 15 min): timings on a shared CPU are only comparable at low load."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'backend':<14}{'L':>7}{'k':>6}{'fwd ms':>11}{'fwd+bwd ms':>12}{'indexer ms':>12}{'idx/fwd':>9}"
             f"{'peak MiB':>10}{'x dense':>9}  note"]
    for r in rows:
        lines.append(f"{r['backend']:<14}{r['seq_len']:>7}{r['top_k']:>6}{_fmt(r['fwd_ms']):>11}"
                     f"{_fmt(r['fwd_bwd_ms']):>12}{_fmt(r['indexer_ms']):>12}{_fmt(r.get('indexer_share_of_fwd'), '.2f'):>9}"
                     f"{_fmt(r['peak_mem_mb']):>10}{_fmt(r['speedup_vs_sdpa'], '.2f'):>9}  {r['note']}")
    return "\n".join(lines)


def format_crossover(crossover: dict, max_len: int) -> str:
    parts = [f"{b} {L}" if L else f"{b} none up to {max_len}" for b, L in crossover.items()]
    return ("crossover (smallest L from which fwd+bwd beats the fastest dense baseline): "
            + ("; ".join(parts) if parts else "no sparse backend ran"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--gpu-check" in argv:  # the one GPU check (gpu_check.py): its own small argument set and imports
        import gpu_check
        return gpu_check.main([a for a in argv if a != "--gpu-check"])
    args = parse_args(argv)
    if args._measure_memory:
        return measure_memory_child(args)
    meter = Meter(args.device, args.repeats)
    header = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "device_name": device_name(args.device), "torch": torch.__version__, "dtype": args.dtype,
              "batch": args.batch, "heads": args.heads,
              "head_dim": args.head_dim, "indexer": f"{args.indexer_heads}x{args.indexer_dim}",
              "block_size": args.block_size, "attention": args.attention,
              "peak_mem_method": ("torch.cuda.max_memory_allocated above the inputs" if args.device == "cuda" else
                                  "fresh subprocess per (backend, L): VmHWM during one fwd+bwd (after a small warm-up step; "
                                  "peak RSS counter reset via /proc/self/clear_refs) minus VmRSS before it")}
    header["load_avg_start"] = _load_avg()
    if args.retrofit:
        return run_retrofit(args, header)
    if args.decode:
        run_decode(args, header)
    elif args.end_to_end:
        run_end_to_end(args, meter, header)
    else:
        run_kernels(args, meter, header)
    return 0


def run_decode(args, header: dict) -> None:
    """--decode: dense vs DSA decode steps -> benchmark_decode.json and a printed table."""
    rows = decode_speed(args)
    header["load_avg_end"] = _load_avg()
    header["decode_preset"] = args.decode_preset
    atomic_write_json(os.path.join(args.out, "benchmark_decode.json"), {**header, "rows": rows})
    print(f"decode on {header['device']}, {args.decode_preset}-preset widths, batch {args.batch}, median of "
          f"{args.decode_steps} steps (dense and sparse steps alternate on one model and cache); load avg (1/5/15 min) {header['load_avg_start']} at start, "
          f"{header['load_avg_end']} at end")
    for r in rows:
        print(f"{r['attention_type']} {r['decode']:<7} prefix {r['cached_prefix']:>6} k={r['top_k'] or '-':<5} "
              f"prefill {r['prefill_s']:7.2f} s  decode {r['decode_ms_per_step']:8.2f} ms/token "
              f"{r['decode_tokens_per_s']:8.1f} tokens/s  x dense {r['speedup_vs_dense']:.2f}  |  process CPU "
              f"{_fmt(r['decode_cpu_ms_per_step'], '.2f')} ms/token  x dense {_fmt(r['cpu_speedup_vs_dense'], '.2f')}")


def retrofit_model(args):
    """--retrofit's model: the base model with random (untrained) indexers; its positions must hold every L."""
    from dsa_lab.experiments.retrofit import COMMON
    from dsa_lab.interop import retrofit
    rope_dim = COMMON["indexer_rope_dim"]  # the experiment's, at every indexer size
    if args.indexer_dim < rope_dim:
        raise ValueError(f"--indexer-dim {args.indexer_dim} is below the retrofit indexer's {rope_dim} RoPE dims; use "
                         f"--indexer-dim >= {rope_dim}")
    model_id = retrofit.resolve_model(args.retrofit_model)
    base, _ = retrofit.load_base(model_id)
    limit = getattr(base.config, "max_position_embeddings", None) or max(args.seq_lens)
    longest = max(*args.seq_lens, args.recompute_len)
    if longest > limit:
        raise ValueError(f"--seq-lens/--recompute-len up to {longest} exceed the model's {limit} positions; use "
                         f"lengths <= {limit}")
    torch.manual_seed(0)
    model = retrofit.RetrofitLM(base, heads=args.indexer_heads, dim=args.indexer_dim, rope_dim=rope_dim,
                                max_seq_len=longest, base_id=model_id).to(args.device).eval()
    return model, model_id


def retrofit_speed_rows(args, model) -> dict:
    """Per L: prefill dense vs DSA, then decode at a context of L on those caches; full recomputation at
    --recompute-len. Random token ids (speed does not depend on them)."""
    from dsa_lab.experiments import retrofit_speed as speed
    from dsa_lab.interop.retrofit import Plan
    cuda, longest = args.device == "cuda", max(*args.seq_lens, args.recompute_len)
    ids = torch.randint(0, model.base.config.vocab_size, (1, longest), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    out = {"prefill": [], "decode": []}
    plan = Plan("dsa", top_k=args.top_k, backend=args.retrofit_backend, index_dtype=args.retrofit_index_dtype)
    for L in args.seq_lens:
        row, states = speed.prefill_speed(model, ids[:, :L], args.top_k, args.retrofit_backend, args.repeats,
                                          cuda=cuda, plan=plan)
        out["prefill"].append(row)
        out["decode"].append(speed.decode_speed(model, states, ids[:, L - 1:L], args.decode_steps, cuda))
        print(format_retrofit_row(row, out["decode"][-1]), flush=True)
        del states
    out["recompute"] = speed.recompute_speed(model, ids[:, :args.recompute_len], args.top_k, args.retrofit_backend,
                                             args.repeats, cuda, plan)
    return out


def format_retrofit_row(p: dict, d: dict) -> str:
    share = lambda r: _fmt(r["indexer_share"] and 100 * r["indexer_share"], ".0f") + " %"  # noqa: E731
    return (f"L {p['seq_len']:>6}  prefill dense {p['dense_ms']:9.0f} ms  DSA {p['dsa_ms']:9.0f} ms  "
            f"DSA/dense {p['dsa_over_dense']:.2f} (CPU time {p['dsa_over_dense_cpu']:.2f})  indexer {share(p)}  |  "
            f"decode at {d['context']}: dense {d['dense_tokens_per_s']:6.1f} tok/s  DSA {d['dsa_tokens_per_s']:6.1f} "
            f"tok/s  DSA/dense speed {d['dense_ms'] / d['dsa_ms']:.2f} (CPU time {1 / d['dsa_over_dense_cpu']:.2f})  "
            f"indexer {share(d)}")


def run_retrofit(args, header: dict) -> int:
    """--retrofit: the retrofitted model's prefill and decode speed -> benchmark_retrofit.json and printed rows."""
    try:
        model, model_id = retrofit_model(args)
    except ValueError as e:
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2
    print(f"retrofit speed: {model_id.describe()} fp32, B 1, k {args.top_k}, DSA prefill backend "
          f"{args.retrofit_backend}, indexers {args.indexer_heads} x {args.indexer_dim}, indexer GEMM "
          f"{args.retrofit_index_dtype}; indexers UNTRAINED (random init: "
          f"timing only, their selections mean nothing); "
          f"{header['device_name']}, {header['device']}; medians of {args.repeats} prefill / {args.decode_steps} "
          f"decode calls after a discarded first call, dense and DSA in turns; load avg {header['load_avg_start']}",
          flush=True)
    rows = retrofit_speed_rows(args, model)
    rc, header["load_avg_end"] = rows["recompute"], _load_avg()
    cached = {d["context"]: d for d in rows["decode"]}
    print(f"generation without caches at {rc['context']} (a full forward per token): dense "
          f"{rc['dense_tokens_per_s']:.3f} tok/s, DSA {rc['dsa_tokens_per_s']:.3f} tok/s")
    for context, d in cached.items():
        print(f"  cached DSA at {context} / uncached DSA at {rc['context']}: "
              f"{d['dsa_tokens_per_s'] / rc['dsa_tokens_per_s']:.1f}x; cached dense / uncached dense: "
              f"{d['dense_tokens_per_s'] / rc['dense_tokens_per_s']:.1f}x")
    print(f"load avg (1/5/15 min) {header['load_avg_start']} at start, {header['load_avg_end']} at end")
    atomic_write_json(os.path.join(args.out, "benchmark_retrofit.json"),
                      {**header, "model": model_id.describe(), "top_k": args.top_k, "backend": args.retrofit_backend,
                       "index_dtype": args.retrofit_index_dtype, "indexer": f"{args.indexer_heads}x{args.indexer_dim}",
                       "indexers": "untrained (random init)", "repeats": args.repeats,
                       "decode_steps": args.decode_steps, **rows})
    return 0


def run_end_to_end(args, meter, header: dict) -> None:
    """--end-to-end: whole training steps, classic vs sparse -> benchmark_end_to_end.json and a printed table."""
    record = Record(os.path.join(args.out, "benchmark_end_to_end.json"), header, None)
    rows = end_to_end(args, meter, record)
    header["load_avg_end"] = _load_avg()
    record.write(complete=True)
    print(f"load avg (1/5/15 min) {header['load_avg_start']} at start, {header['load_avg_end']} at end")
    for r in rows:
        print(f"{args.attention_type} {r['model']:<14} L={r['seq_len']} k={r['top_k']}  step {_fmt(r['step_ms'], '.0f')} "
              f"ms  x classic {_fmt(r['ratio_vs_classic'], '.2f')}  {r['note']}")


def run_kernels(args, meter, header: dict) -> None:
    """The attention backends per L: rows, crossover, indexer cost, selection quality -> benchmark.json (rewritten
    atomically after every row, so a killed run leaves every finished row and names the one it was in), the
    scaling figure and the printed tables."""
    record = Record(os.path.join(args.out, "benchmark.json"), header, args.time_budget_s)
    rows, cost = measure_rows(args, meter, record)
    header["load_avg_end"] = _load_avg()
    crossover = crossover_lengths(rows)
    record.extra["crossover"] = crossover
    quality = []
    if record.over_budget():
        record.extra["selection_quality_note"] = record.budget_note()
    else:
        quality = selection_quality(args, min(args.seq_lens[0], 2048))
    record.extra["selection_quality"] = quality
    goals = record.extra["goals"] = goal_rows(rows, cost, args.attention)
    record.write(complete=True)
    plot_scaling(rows, crossover, os.path.join(args.out, "benchmark_scaling.png"),
                 f"{args.attention.upper()} H={args.heads} d={args.head_dim} k={args.top_k} {args.dtype} ({header['device']})")
    print(f"attention={args.attention} B={args.batch} H={args.heads} d={args.head_dim} k={args.top_k} "
          f"indexer {header['indexer']} {args.dtype} on {header['device']}; "
          f"load avg (1/5/15 min) {header['load_avg_start']} at start, {header['load_avg_end']} at end")
    print(format_table(rows))
    print(format_crossover(crossover, max(args.seq_lens)))
    print_costs(cost, quality)
    print_goals(goals, header["device_name"])


class Record:
    """benchmark.json as it grows: the header, the rows so far, the row being measured (`running`: a run killed
    there leaves it named) and the extras; `complete` is true only once every part is in."""

    def __init__(self, path: str, header: dict, budget_s: float | None):
        self.path, self.header, self.budget_s, self.t0 = path, header, budget_s, time.perf_counter()
        self.rows, self.extra, self.running = [], {}, None
        self.write()  # replaces any earlier run's file at once: nothing stale is left to be read as fresh

    def write(self, complete: bool = False) -> None:
        atomic_write_json(self.path, {**self.header, "complete": complete, "running": self.running,
                                      "elapsed_s": round(time.perf_counter() - self.t0, 1),
                                      "rows": self.rows, **self.extra})

    def over_budget(self) -> bool:
        return self.budget_s is not None and time.perf_counter() - self.t0 > self.budget_s

    def budget_note(self) -> str:
        return f"skipped: the --time-budget-s {self.budget_s:g} s was spent"

    def projected_note(self, last: tuple | None, L: int) -> str:
        """'' unless the row's time at a shorter L, scaled by (L / that L)^2, exceeds the budget left (on an
        H200 the MHA gather row took the whole section at L 4096, and every faster row after it was skipped)."""
        if self.budget_s is None or last is None:
            return ""
        expected = last[1] * (L / last[0]) ** 2
        left = self.budget_s - (time.perf_counter() - self.t0)
        return (f"skipped: expected ~{expected:.0f} s from its L {last[0]} row, {max(left, 0):.0f} s of the "
                f"--time-budget-s left" if expected > left else "")


def measure_rows(args, meter, record: Record) -> tuple[list[dict], list[dict]]:
    """Every (L, backend) row, then per L the indexer cost vs the fastest dense row; the record is rewritten
    after each row. Rows past the time budget carry its note instead of numbers."""
    from tqdm import tqdm
    backends = [b for b in backend_list(args.device, args.attention) if not args.backends or b in args.backends]
    rows, cost = record.rows, record.extra.setdefault("indexer_cost", [])
    took = {}  # backend -> (L, seconds its row took): a row expected to outlast the budget left is skipped
    with tqdm(total=len(args.seq_lens) * len(backends), desc="benchmark", file=sys.stderr) as bar:
        for L in args.seq_lens:
            inputs = None if record.over_budget() else make_inputs(args, L, args.indexer_heads, args.indexer_dim)
            for backend in backends:
                bar.set_postfix_str(f"L={L} {backend}")
                record.running = {"backend": backend, "seq_len": L}
                record.write()
                note = record.budget_note() if inputs is None or record.over_budget() else \
                    record.projected_note(took.get(backend), L)
                start = time.perf_counter()
                rows.append(empty_row(args, backend, L, note) if note else measure(args, meter, backend, L, inputs))
                if not note:
                    took[backend] = (L, time.perf_counter() - start)
                bar.update()
            record.running = None
            attach_baseline([r for r in rows if r["seq_len"] == L])
            dense = [r for r in rows if r["seq_len"] == L and r["dense"] and r["fwd_bwd_ms"]]
            if dense and not record.over_budget():
                try:
                    cost += indexer_cost(args, meter, L, min(dense, key=lambda r: r["fwd_bwd_ms"]))
                except Exception as err:  # noqa: BLE001 - recorded, the rows stand
                    record.extra[f"indexer_cost_note_L{L}"] = f"failed: {failure_reason(err)}"
            record.write()
            del inputs
    return rows, cost


def empty_row(args, backend: str, L: int, note: str = "") -> dict:
    """A row without numbers (yet); `note` says why."""
    return {"backend": backend, "attention": args.attention, "seq_len": L, "top_k": args.top_k,
            "dense": is_dense(backend), "fwd_ms": None, "fwd_bwd_ms": None, "peak_mem_mb": None,
            "indexer_ms": None, "indexer_share_of_fwd": None, "speedup_vs_sdpa": None, "baseline": None,
            "note": note}


def print_costs(cost: list[dict], quality: list[dict]) -> None:
    """The indexer's cost against the fastest dense baseline, and the selection-quality proxy."""
    print("\nindexer (chunked scores + top-k) cost vs the fastest dense baseline")
    print(f"{'L':>7}{'indexer':>12}{'ms':>10}{'/ dense fwd':>13}{'/ dense fwd+bwd':>17}{'set overlap vs fp32':>21}")
    for c in cost:
        print(f"{c['seq_len']:>7}{c['indexer']:>12}{c['indexer_ms']:>10.1f}{_fmt(c['share_of_sdpa_fwd'], '.2f'):>13}"
              f"{_fmt(c['share_of_sdpa_fwd_bwd'], '.2f'):>17}{_fmt(c.get('set_overlap_vs_fp32'), '.4f'):>21}")
    print("\nselection quality proxy (same indexer, same k): token-level DSA (fp32 / bf16 indexer GEMM) vs query-block-shared")
    for qrow in quality:
        overlap = qrow.get("set_overlap_vs_fp32")
        print(f"  {qrow['backend']:<20} L={qrow['seq_len']} recall {_fmt(qrow['recall'], '.4f')}  "
              f"rel. error vs dense {qrow['rel_err_vs_dense']:.4f}" + (f"  set overlap vs fp32 {overlap:.4f}" if overlap else ""))


def goal_rows(rows: list[dict], cost: list[dict], attention: str) -> list[dict]:
    """Issue 31's goals (GOALS) that this run measured: each as a ratio to the fastest dense fwd+bwd at its L."""
    out = []
    for name, att, L, what, target in GOALS:
        if att != attention:
            continue
        if what == "indexer":
            ratios = [(c["indexer"], c["share_of_sdpa_fwd_bwd"]) for c in cost if c["seq_len"] == L and c["indexer"] == "4x64"]
        else:
            ratios = [(r["backend"], 1 / r["speedup_vs_sdpa"]) for r in rows if r["seq_len"] == L and not r["dense"]
                      and r["speedup_vs_sdpa"] and (what == "best" or r["backend"] == what)]
        if ratios and ratios[0][1] is not None:
            which, ratio = min(ratios, key=lambda x: x[1])
            out.append({"goal": name, "seq_len": L, "path": which, "ratio_vs_dense": ratio, "target": target,
                        "met": ratio <= target})
    return out


def print_goals(goals: list[dict], cpu: str) -> None:
    if goals:
        print(f"\nissue 31 goals on {cpu} (time / fastest dense fwd+bwd at that L; below the target = met)")
    for g in goals:
        print(f"  {g['goal']:<48} L={g['seq_len']:<6} {g['path']:<13} {g['ratio_vs_dense']:.3f}  target <= {g['target']}"
              f"  {'met' if g['met'] else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
