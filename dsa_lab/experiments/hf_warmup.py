"""Train a transformers DSA model's indexers here (their own code is inference-only: `@torch.no_grad()`, no KL).

    model, report = warmup_hf_indexers("path/or/hub-name", windows, tcfg, device)
    to_hf(model, "out_dir")      # back to transformers

Import with hf_interop.from_hf, dense warm-up of the indexers with the paper's KL (main model frozen,
train.warmup_stage), an optional sparse stage (train.sparse_stage, `sparse_steps` > 0), and indexer recall before /
after against a random and a local selection of the same size.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dsa_lab.common.results_io import atomic_write_json
from config import TrainConfig
from dsa_lab.training.data import STREAM_TRAIN, STREAM_WARMUP, BatchStream, Windows, eval_subset, stream_seed
from dsa_lab.interop.hf_interop import from_hf
from models import SparseAttentionMoELLM
from dsa_lab.training.train import sparse_stage, train_lm, warmup_indexer


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


def run_init_from_hf(args, overrides: dict) -> dict:
    """Import an HF DSA model, warm up its indexers on our data (optionally a sparse stage), report, export."""
    from config import build_configs
    from dsa_lab.training.data import build_windows, load_corpus
    from dsa_lab.interop.hf_interop import to_hf
    from dsa_lab.training.train import pick_device
    overrides.setdefault("tokenizer", args.init_from_hf)  # its own vocabulary
    _, train_cfg, data_cfg, exp_cfg = build_configs(overrides, preset=args.preset)
    device = pick_device(train_cfg.device)
    corpus = load_corpus(data_cfg)
    L = max(exp_cfg.seq_lens)
    model_overrides = {k: overrides[k] for k in ("attention_backend",) if k in overrides}
    if exp_cfg.top_k is not None:
        model_overrides["sparse_top_k"] = exp_cfg.top_k
    model, report = warmup_hf_indexers(args.init_from_hf, build_windows(corpus, L), train_cfg, device,
                                                 seed=exp_cfg.seeds[0], sparse_steps=train_cfg.steps,
                                                 **model_overrides)
    out = Path(exp_cfg.out)
    atomic_write_json(out / "hf_warmup.json", report)
    print(f"{report['model_type']} L={L} k={report['sparse_top_k']}: indexer recall {report['recall_before']:.3f} "
          f"before warm-up -> {report['recall_after']:.3f} after (random {report['random_recall']:.3f}, last-k "
          f"{report['local_recall']:.3f}); wrote {out / 'hf_warmup.json'}")
    if args.export_hf:
        to_hf(model, args.export_hf)
        print(f"exported to {args.export_hf} (AutoModelForCausalLM.from_pretrained loads it)")
    return report
