"""Build and load one of the C++ CPU kernels (cpu_sparse.cpp, cpu_select.cpp) with the system compiler, cached.

  CppKernel(source, fallback).library()   the loaded ctypes.CDLL, or None (warned once: why, and `fallback`)
  CppKernel(...).status()                 'built' or why the kernel is not used

The build: `g++ -O3 -march=native -fopenmp-simd -shared -fPIC` (CXX overrides g++) into $DSA_LAB_KERNEL_CACHE
(default ~/.cache/dsa_lab/kernels), named by a hash of the source, the compiler's version, the flags and this CPU's
feature flags; built to a temporary name and renamed (concurrent processes are safe). DSA_LAB_CPU_KERNEL=0 turns
every C++ kernel off (each caller then takes its torch twin).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


class CppKernel:
    """One C++ source file built on first use; `state` holds "lib" (the CDLL) or "reason" (why there is none)."""

    def __init__(self, source: Path, fallback: str):
        self.source, self.fallback, self.state = Path(source), fallback, {}

    def build(self) -> ctypes.CDLL:
        """Compile (or reuse the cached) shared library and load it; raise OSError/RuntimeError when that fails."""
        cxx = os.environ.get("CXX", "g++")
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
        text = "\0".join([self.source.read_text(), version, " ".join(FLAGS), _cpu_flags()])
        key = hashlib.sha256(text.encode()).hexdigest()
        cache = Path(os.environ.get("DSA_LAB_KERNEL_CACHE") or Path.home() / ".cache" / "dsa_lab" / "kernels")
        cache.mkdir(parents=True, exist_ok=True)
        lib = cache / f"{self.source.stem}_{key[:16]}.so"
        if not lib.exists():
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            try:
                done = subprocess.run([cxx, *FLAGS, str(self.source), "-o", tmp], capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{cxx} failed: {(done.stderr.strip().splitlines() or ['?'])[0][:200]}")
                os.replace(tmp, lib)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(lib))

    def library(self):
        """The loaded library, or None (the reason is in status(); warned once)."""
        if "lib" in self.state or "reason" in self.state:
            return self.state.get("lib")
        if os.environ.get("DSA_LAB_CPU_KERNEL", "1") == "0":
            self.state["reason"] = "turned off by DSA_LAB_CPU_KERNEL=0"
            return None
        try:
            self.state["lib"] = self.build()
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            self.state["reason"] = f"C++ kernel {self.source.name} not built ({str(err).splitlines()[0][:200]}); " \
                                   f"{self.fallback}"
            warnings.warn(self.state["reason"], RuntimeWarning, stacklevel=3)
        return self.state.get("lib")

    def status(self) -> str:
        """'built' or why the kernel is not used."""
        return "built" if self.library() is not None else self.state["reason"]


def ptr(t):
    """A tensor's data pointer for ctypes (None -> a null pointer)."""
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def longs(*xs):
    """An int64 array for ctypes."""
    return (ctypes.c_int64 * len(xs))(*xs)
