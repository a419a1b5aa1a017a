"""Per-step training scalars held on the device and read back every N steps: one host sync per read-back instead of
several per step on CUDA (the logged losses, the NaN guard's loss and gradient norms, the expert loads, the step
times). A read-back returns the held steps in order, each with its numbers and its timed spans in seconds."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsa_lab.common.timing import elapsed_s

CUDA_READBACK_EVERY = 50  # readback_every=0 (auto): every step on CPU, every this many steps on CUDA


def readback_interval(every: int, device: torch.device) -> int:
    """The read-back interval the setting `every` means on `device` (0 = auto)."""
    return every or (CUDA_READBACK_EVERY if device.type == "cuda" else 1)


@dataclass
class StepRecord:
    step: int
    values: dict  # name -> tensor on the device (any shape, a floating dtype)
    spans: dict  # name -> (start mark, end mark): wall-clock floats or recorded CUDA events (dsa_lab.common.timing)


class Readback:
    """The steps not yet read back; `every` steps between read-backs (the caller also reads back before anything
    that needs the numbers: an evaluation, a checkpoint, the stage's end)."""

    def __init__(self, every: int):
        self.every = every
        self.pending: list[StepRecord] = []

    def add(self, step: int, values: dict, spans: dict) -> None:
        self.pending.append(StepRecord(step, values, spans))

    def due(self, step: int) -> bool:
        """Whether the read-back falls after `step` (0-based)."""
        return (step + 1) % self.every == 0

    def read(self) -> list[dict]:
        """-> [{"step": s, "spans": {name: seconds}, name: value, ...}] for the held steps in order, and forget them.
        A 0-dim value comes back as a float, any other as a CPU tensor of its own dtype (its numbers exact: every
        floating dtype travels as float64). One host sync, after which every recorded event is complete."""
        records, self.pending = self.pending, []
        tensors = [t for r in records for t in r.values.values()]
        if not tensors:
            return [{"step": r.step, "spans": {}} for r in records]
        numbers = torch.cat([t.detach().double().flatten() for t in tensors]).cpu()  # (sum of numel,) the sync
        for start, end in records[-1].spans.values():
            if hasattr(end, "synchronize"):  # a CUDA event: already complete (stream order), made explicit
                end.synchronize()
        rows, at = [], 0
        for r in records:
            row = {"step": r.step, "spans": {name: elapsed_s(*span) for name, span in r.spans.items()}}
            for name, t in r.values.items():
                chunk = numbers[at: at + t.numel()].view(t.shape)
                row[name] = chunk.item() if t.dim() == 0 else chunk.to(t.dtype)
                at += t.numel()
            rows.append(row)
        return rows
