"""A backend's bf16 training step against its reference twin, the masked backend's, with the keys chosen once.

Under bf16 the indexer's scores tie or reorder, so two backends may select different keys and a tight comparison
fails for the wrong reason. Here the keys are pinned: the backend's model runs once in fp32 and each layer records
the keys its backend selected (the block backend's block-level choice too); every later step, of that model and
of the masked twins, attends over those keys (the token-level expansion for the masked twin), while each backend
still computes its own index scores at them (the indexer loss's gradient path). The MoE router's top-k is the
other choice a rounding could flip: the models compared route every token to every expert
(`expert_top_k = num_experts`), so no choice is left.

`twin_steps` returns the three steps (logits, losses, every gradient by name): the backend under autocast, the masked
twin under autocast, the masked twin in fp64; `assert_bounded_by_own_error` checks the first against the third
within a multiple of the second's own error (tests/test_autocast_policy.py on CPU, tests/test_cuda.py on CUDA).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from sparse_attention import AttentionMode

SPARSE_STEP = AttentionMode(sparse=True, indexer_loss="sparse")
# (a backend's bf16 error) / (its masked twin's own bf16 error), each tensor against the fp64 masked step, keys
# pinned, measured on CPU under tests/cuda_autocast_policy.py (torch 2.13): at most 2.5 in the tests of
# tests/test_autocast_policy.py (MLA gather, the indexer's k_proj gradient), 3.4 over the ids of seeds 1-5 (MHA
# gather, seed 4, the indexer's k_norm).
# Caught at 4: a dropped key (logits 0.13 vs own 0.007), the KL target rounded to bf16 (tiny model: 7-28), attention
# output or dV scaled by 1.05; missed: 1.01-1.02 scalings, dQ x 1.05 (within bf16's own error). Not yet measured on
# a GPU: tests/test_cuda.py uses the CPU figure.
TWIN_FACTOR = 4.0
TOKEN_KEYS = ("selected_idx", "valid")
BLOCK_KEYS = TOKEN_KEYS + ("block_idx", "block_valid")


class PinnedBackend:
    """One layer's backend with pinned keys: select() returns the wrapped backend's selection (its index scores or
    index inputs) with `keys` in place of its own; with no keys yet, it records the first selection's."""

    def __init__(self, inner, keys: dict | None = None):
        self.inner, self.keys = inner, keys

    def __getattr__(self, name):  # attend, attend_latent, selected_scores, name, block_size: the wrapped backend's
        if name == "inner":  # not set yet (a copy): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def select(self, *args, **kwargs):
        selection = self.inner.select(*args, **kwargs)
        if self.keys is None:
            self.keys = {key: getattr(selection, key) for key in BLOCK_KEYS if getattr(selection, key) is not None}
        return dataclasses.replace(selection, **self.keys)


class PinnedPositionalSelect:
    """An indexer-free selector's select(B, L, device, ...) with pinned keys (recorded from its first call)."""

    def __init__(self, select, keys: dict | None = None):
        self.select, self.keys = select, keys

    def __call__(self, *args, **kwargs):
        if self.keys is None:
            self.keys = dict(zip(TOKEN_KEYS, self.select(*args, **kwargs)))
        return self.keys["selected_idx"], self.keys["valid"]


def pin_keys(model, keys: list | None = None) -> list:
    """Pin the keys of every sparse layer of `model` (to keys[i] for layer i, or record them); -> the pins."""
    pins = []
    for i, layer in enumerate(layer for layer in model.attentions if hasattr(layer, "backend")):
        given = None if keys is None else {key: keys[i][key] for key in TOKEN_KEYS}
        if getattr(layer.selector, "positional", False):
            pin = layer.selector.select = PinnedPositionalSelect(layer.selector.select, given)
        else:
            pin = layer.backend = PinnedBackend(layer.backend, given)
        pins.append(pin)
    return pins


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def training_step(model, ids: torch.Tensor, autocast, mode: AttentionMode = SPARSE_STEP) -> dict:
    """The step dsa_lab/training/train.py runs: forward under `autocast()` (LM loss + indexer KL in fp32, or fp64
    for an fp64 model), backward with autocast off -> {'logits', 'token losses' (B, L), 'indexer losses' (one per
    layer; with an indexer loss), parameter name: gradient}: tensors, whose relative errors are stable where a
    scalar loss's own error can come out near 0 by chance. The backward stays inside `autocast()` (autocast
    disabled): an activation checkpoint's recompute re-enters the forward's autocast, and the CPU emulation's kernels
    exist only while its context is open."""
    model.zero_grad(set_to_none=True)
    with autocast():
        logits, aux = model(ids, mode, return_aux=True)
        token_losses = F.cross_entropy(_wide(logits).flatten(0, 1), ids.roll(-1, 1).flatten(), reduction="none")
        parts = {"logits": _wide(logits), "token losses": token_losses}
        if mode.indexer_loss:
            per_layer = [_wide(a.indexer_loss) for a in aux.layers if a.indexer_loss is not None]
            parts["indexer losses"] = torch.stack(per_layer)
        loss = token_losses.mean() + parts.get("indexer losses", token_losses.new_zeros(1)).sum()
        with torch.autocast(ids.device.type, enabled=False):
            loss.backward()
    return {**{key: t.detach() for key, t in parts.items()},
            **{name: p.grad for name, p in model.named_parameters() if p.grad is not None}}


def twin_steps(make_model, backend: str, ids: torch.Tensor, autocast, mode: AttentionMode = SPARSE_STEP):
    """make_model(backend name) -> a seeded model (the same weights for every name). -> (backend step, masked step)
    under `autocast`, and the masked step in fp64, all three over the keys the backend's model selects in fp32."""
    fast = make_model(backend)
    pins = pin_keys(fast)
    with torch.no_grad():
        fast(ids, mode)  # records each layer's keys
    keys = [pin.keys for pin in pins]
    got = training_step(fast, ids, autocast, mode)
    low = training_step(_pinned(make_model("masked"), keys), ids, autocast, mode)
    high = training_step(_pinned(make_model("masked").double(), keys), ids, contextlib.nullcontext, mode)
    return got, low, high


def _pinned(model, keys: list):
    pin_keys(model, keys)
    return model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius norms, in fp64)."""
    b = b.double()
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def assert_bounded_by_own_error(got: dict, high: dict, low: dict, factor: float, floor: float = 1e-6) -> None:
    """Each entry of `got` (a path in low precision) is within `factor` times the reference path's own
    low-precision error (`low` against `high`) of `high`, plus `floor`. The same names in all three: a missing
    gradient never shortens the comparison."""
    assert list(got) == list(high) == list(low), (list(got), list(high), list(low))
    for name in got:
        own, err = rel_error(low[name], high[name]), rel_error(got[name], high[name])
        assert err <= factor * own + floor, f"{name}: error {err:.3g} vs the reference's own error {own:.3g}"
