"""Train a transformers DSA model's indexers here (their own code is inference-only: `@torch.no_grad()`, no KL).

    model, report = warmup_hf_indexers("path/or/hub-name", windows, tcfg, device)
    to_hf(model, "out_dir")      # back to transformers

Import with hf_interop.from_hf, dense warm-up of the indexers with the paper's KL (main model frozen,
train.warmup_stage), an optional sparse stage (train.sparse_stage, `sparse_steps` > 0), and indexer recall before /
after against a random and a local selection of the same size.
"""
from __future__ import annotations

import dataclasses

import torch

from config import TrainConfig
from training.data import STREAM_TRAIN, STREAM_WARMUP, BatchStream, Windows, eval_subset, stream_seed
from interop.hf_interop import from_hf
from models import SparseAttentionMoELLM
from training.train import sparse_stage, train_lm, warmup_indexer


def warmup_hf_indexers(model_or_path, windows: Windows, tcfg: TrainConfig, device: torch.device, seed: int = 0,
                       sparse_steps: int = 0, max_seq_len: int | None = None, **overrides):
    """-> (our SparseAttentionMoELLM with trained indexers, report).

    report: recall_before / recall_after (share of dense attention mass inside the indexer's top-k, on held-out
    windows, rows where selection drops tokens), random_recall / local_recall (same-size random / last-k
    selections), indexer_kl (per step), and with sparse_steps the sparse stage's final metrics.
    `overrides` are ModelConfig fields that leave the maths unchanged (attention_backend='gather', sparse_top_k=...)."""
    model = from_hf(model_or_path, max_seq_len=max_seq_len or windows.seq_len, **overrides)
    if not isinstance(model, SparseAttentionMoELLM):
        raise ValueError(f"{model.hf_config.get('model_type')!r} has no indexer to warm up; use a deepseek_v32 or "
                         f"glm_moe_dsa model")
    vocab = model.cfg.vocab_size
    if int(windows.train.max()) >= vocab or int(windows.val.max()) >= vocab:
        raise ValueError(f"token ids reach {int(max(windows.train.max(), windows.val.max()))} but the model's "
                         f"vocab_size is {vocab}: tokenize with the model's own tokenizer (--tokenizer PATH)")
    model.to(device)
    torch.manual_seed(seed)
    val = eval_subset(windows.val, tcfg.eval_windows)
    L, bs = windows.seq_len, tcfg.batch_size
    warm = warmup_indexer(model, BatchStream(windows.train, bs, stream_seed(seed, STREAM_WARMUP)), val, tcfg, device,
                          desc=f"L={L} imported model indexer warm-up")
    report = {**warm, "seq_len": L, "sparse_top_k": model.cfg.sparse_top_k, "model_type": model.hf_config["model_type"]}
    if sparse_steps:
        stage_cfg = dataclasses.replace(tcfg, steps=sparse_steps)
        result = train_lm(model, BatchStream(windows.train, bs, stream_seed(seed, STREAM_TRAIN)), val, stage_cfg, device,
                          desc=f"L={L} imported model sparse", stage=sparse_stage(stage_cfg))
        report["sparse"] = result["final"]
    return model.eval(), report
