"""Language models: RMSNorm, GLM4-style MoE feed-forward, blocks, the classic and the sparse MoE LLM.

Both LLMs use the same parameter names for every shared part, so
`sparse.load_state_dict(classic.state_dict(), strict=False)` copies everything but the indexers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from config import ModelConfig
from optimized_indexers import share_indexers
from sparse_attention import CausalSelfAttention, DeepSeekSparseAttention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """One expert: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoEFeedForward(nn.Module):
    """GLM4 / DeepSeek-V3 style MoE: always-on shared expert(s) + top-k of routed experts.

    Sigmoid router scores; a per-expert bias is added for *selection only* and updated after each
    optimizer step (loss-free balancing: bias += rate * sign(mean_load - load_i)); gate weights are
    the chosen scores normalised over the k. An optional tiny sequence-level aux loss.
    No capacity limit, no dropped tokens: a token's output never depends on other tokens (causality).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.num_experts = cfg.expert_top_k, cfg.num_experts
        self.bias_rate, self.aux_weight = cfg.balance_bias_rate, cfg.balance_aux_weight
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.d_ff) for _ in range(cfg.num_experts))
        self.shared_experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.d_ff) for _ in range(cfg.num_shared_experts))
        self.register_buffer("balance_bias", torch.zeros(cfg.num_experts))
        self.register_buffer("load_counts", torch.zeros(cfg.num_experts), persistent=False)
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        flat = x.reshape(-1, d)  # (N, d)
        scores = torch.sigmoid(self.router(flat))  # (N, E)
        chosen = (scores + self.balance_bias).topk(self.top_k, dim=-1).indices  # (N, k), selection only
        gates = scores.gather(-1, chosen)
        gates = gates / gates.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out = out.index_add(0, token, expert(flat[token]) * gates[token, slot, None])
        for expert in self.shared_experts:
            out = out + expert(flat)
        counts = torch.bincount(chosen.flatten(), minlength=self.num_experts).to(scores.dtype)  # (E,)
        if self.training:
            self.load_counts += counts.detach()
        self.aux_loss = self._sequence_aux_loss(scores.view(B, L, -1), chosen.view(B, L, -1))
        return out.view(B, L, d)

    def _sequence_aux_loss(self, scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss: weight * sum_i f_i P_i, averaged over sequences."""
        if self.aux_weight == 0 or not self.training:
            return torch.zeros((), device=scores.device)
        B, L, E = scores.shape
        f = F.one_hot(chosen, E).sum(2).float().mean(1) * (E / self.top_k)  # (B, E)
        P = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
        return self.aux_weight * (f * P).sum(-1).mean()

    @torch.no_grad()
    def update_balance_bias(self) -> torch.Tensor:
        """Apply the loss-free balancing update from the loads seen since the last call; return the load share."""
        total = self.load_counts.sum()
        share = self.load_counts / total if total > 0 else self.load_counts.clone()
        if total > 0:
            self.balance_bias += self.bias_rate * torch.sign(self.load_counts.mean() - self.load_counts)
        self.load_counts.zero_()
        return share


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attn: nn.Module):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model), attn
        self.ffn_norm, self.ffn = RMSNorm(cfg.d_model), MoEFeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class _MoELLM(nn.Module):
    attention_cls: type[nn.Module] = CausalSelfAttention

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, self.attention_cls(cfg)) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) long -> logits (B, L, vocab)."""
        if input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"input length {input_ids.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.token_emb(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    @property
    def attentions(self) -> list:
        return [block.attn for block in self.blocks]

    def set_timer(self, timer) -> None:
        """Time attention (and indexer) sections with a SectionTimer; None switches timing off."""
        for attn in self.attentions:
            attn.timer = timer

    def aux_loss(self) -> torch.Tensor:
        """MoE balance loss of the last forward, summed over layers."""
        return sum(block.ffn.aux_loss for block in self.blocks)

    def update_balance_bias(self) -> list[list[float]]:
        """Loss-free balancing step for every MoE layer; returns per-layer expert load shares."""
        return [block.ffn.update_balance_bias().tolist() for block in self.blocks]


class ClassicAttentionMoELLM(_MoELLM):
    """Dense causal attention + MoE (the baseline)."""
    attention_cls = CausalSelfAttention


class SparseAttentionMoELLM(_MoELLM):
    """DeepSeek Sparse Attention + MoE. Sparse on/off, indexer loss mode and stats are switched per model."""
    attention_cls = DeepSeekSparseAttention

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # cfg.shared_indexer_group > 1: followers reuse their group leader's index scores
        self.shared_index_scores = share_indexers(self.attentions, cfg.shared_indexer_group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) long -> logits (B, L, vocab)."""
        for shared in self.shared_index_scores:  # never reuse scores from another forward
            shared.clear()
        try:
            return super().forward(input_ids)
        finally:
            for shared in self.shared_index_scores:
                shared.clear()

    def set_training_progress(self, fraction: float) -> None:
        """Training progress in [0, 1] for progressive k schedules (call every sparse-stage step)."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"training progress fraction={fraction} must be in [0, 1]")
        for module in self.modules():
            if hasattr(module, "set_progress"):
                module.set_progress(fraction)

    def set_sparse(self, enabled: bool) -> None:
        for attn in self.attentions:
            attn.sparse_enabled = enabled

    def set_indexer_loss(self, mode: str | None) -> None:
        if mode not in (None, "dense", "sparse"):
            raise ValueError(f"indexer loss mode {mode!r} is unknown; use None, 'dense' or 'sparse'")
        for attn in self.attentions:
            attn.indexer_loss_mode = mode

    def set_collect_stats(self, enabled: bool) -> None:
        for attn in self.attentions:
            attn.collect_stats = enabled
            attn.last_stats = None

    def indexer_loss(self) -> torch.Tensor:
        """Sum over layers of the indexer KL from the last forward."""
        losses = [a.last_indexer_loss for a in self.attentions if a.last_indexer_loss is not None]
        if not losses:
            raise RuntimeError("no indexer loss was computed: call set_indexer_loss('dense'|'sparse') first")
        return sum(losses)

    def indexer_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if ".indexer." in n]

    def main_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if ".indexer." not in n]

    def freeze_main(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) everything but the indexers."""
        for p in self.main_parameters():
            p.requires_grad_(not frozen)
