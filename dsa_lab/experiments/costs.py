"""What a model costs per token and per step, beside its quality: analytic indexer and attention FLOPs, the
indexer's bit-width-aware memory traffic, and the peak memory of one training step (shared by the variant
runs and adaptive_sparsity)."""
from __future__ import annotations

import math

import torch

from config import ModelConfig


# ----------------------------------------------------------------------------- analytic costs
def indexer_flops_per_token(cfg: ModelConfig, L: int) -> float:
    """Indexer multiply-adds x2 per token, all layers: projections + ReLU scores over the causal prefix
    (mean (L+1)/2 keys); a shared indexer is counted once per group."""
    proj = 2 * cfg.d_model * (cfg.indexer_heads * cfg.indexer_dim + cfg.indexer_dim + cfg.indexer_heads)
    scores = (L + 1) / 2 * cfg.indexer_heads * (2 * cfg.indexer_dim + 2)
    groups = math.ceil(cfg.n_layers / cfg.shared_indexer_group)
    return groups * (proj + scores)


def attention_flops_per_token(cfg: ModelConfig, mean_keys: float) -> float:
    """Main attention per token, all layers: QKV/out projections + QK^T and PV over the attended keys."""
    return cfg.n_layers * (2 * cfg.d_model * 4 * cfg.d_model + 4 * cfg.d_model * mean_keys)


# bits per element of the indexer's q/k operands as the score product reads them, and bytes per scale
INDEXER_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "mixed": 16, "fp8": 8, "int8": 8, "int4": 4}
SCALE_BYTES = {"fp8": 1, "int8": 4, "int4": 4}  # fp8: one ue8m0 byte per vector; int: one fp32 per vector


def indexer_bytes_per_token(cfg: ModelConfig, L: int) -> float:
    """Bit-width-aware memory traffic of the indexer's score product per query token, all layers: the keys of
    the causal prefix (mean (L+1)/2, d_I each) and the query's H_I x d_I, at the precision's bit width, plus
    their scales (fp8/int) and the fp32 head weights; a shared indexer is counted once per group. The cost
    quantisation actually saves (its FLOPs are the same), beside wall time (fake quantisation on CPU is slower)."""
    bits = INDEXER_BITS[cfg.indexer_precision]
    keys = (L + 1) / 2
    operands = (keys * cfg.indexer_dim + cfg.indexer_heads * cfg.indexer_dim) * bits / 8
    scales = (keys + cfg.indexer_heads) * SCALE_BYTES.get(cfg.indexer_precision, 0)
    groups = math.ceil(cfg.n_layers / cfg.shared_indexer_group)
    return groups * (operands + scales + 4 * cfg.indexer_heads)


def step_peak_memory_mb(model, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
                        mode=None) -> float:
    """Peak memory of one sparse training step (forward + backward, gradients included) above what was
    allocated before it, in MB; the same definition on both devices. CUDA: max_memory_allocated. CPU: the
    running sum of tensor allocations and frees recorded by the torch profiler (an allocation peak like
    tracemalloc's; not the process RSS high-water mark, which never goes down). `mode`: what the step computes
    (default sparse attention + the sparse indexer KL; sparse_attention.DENSE for a classic model)."""
    import torch.nn.functional as F

    from sparse_attention import AttentionMode
    mode = AttentionMode(sparse=True, indexer_loss="sparse") if mode is None else mode
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    inputs, targets = inputs.to(device), targets.to(device)

    def step():
        logits, aux = model(inputs, mode, return_aux=True)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) + aux.balance_loss
        (loss + aux.indexer_loss if mode.indexer_loss else loss).backward()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        current = peak = 0
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            current += event.self_cpu_memory_usage  # allocations (+) and frees (-) in time order
            peak = max(peak, current)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return peak / 2**20
