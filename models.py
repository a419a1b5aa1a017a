"""Language models: RMSNorm, GLM4-style MoE feed-forward, blocks, the classic and the sparse MoE LLM.

Both LLMs use the same parameter names for every shared part, so
`sparse.load_state_dict(classic.state_dict(), strict=False)` copies everything but the indexers.
The sparse model's indexer, selector and backend come from the config through one registry (below).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_selection import (AdaptiveKConfig, AdaptiveKSelector, ContentComplexityAnalyzer, DynamicSparsityController,
                                build_k_selector, ratio_for_mean_keys)
from config import ModelConfig
from efficient_patterns import LocalSelector, OracleSelector, RandomSelector, build_pattern
from dsa_lab.kernels.backends import BlockBackend, FlexBackend, GatherBackend, TritonBackend
from optimized_indexers import MultiScaleIndexer, OptimizedLightningIndexer, RegionRestrictedSelector
from dsa_lab.common.rope import RotaryEmbedding
from dsa_lab.interop import levers
from sparse_attention import (DENSE, AttentionAux, AttentionMode, CausalSelfAttention, DeepSeekSparseAttention,
                              LightningIndexer, MaskedBackend, SparseAttentionLayer, TopKTokenSelector,
                              causal_attention_probs)


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


DENSE_DISPATCH_MAX_FACTOR = 4  # moe_dispatch='auto' runs dense on CUDA while num_experts <= this x expert_top_k


def expert_counts(chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """chosen (N, k) expert ids -> (E,) int64 tokens per expert (torch.bincount's result, without its host sync on
    CUDA, where it reads the largest id to size its output)."""
    flat = chosen.flatten()
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


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
        self.n_group, self.topk_group = cfg.moe_n_group, cfg.moe_topk_group
        self.norm_topk_prob, self.routed_scaling = cfg.moe_norm_topk_prob, cfg.moe_routed_scaling
        self.dispatch = cfg.moe_dispatch
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.d_ff) for _ in range(cfg.num_experts))
        self.shared_experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.d_ff) for _ in range(cfg.num_shared_experts))
        self.register_buffer("balance_bias", torch.zeros(cfg.num_experts))
        self.register_buffer("load_counts", torch.zeros(cfg.num_experts), persistent=False)

    def forward(self, x: torch.Tensor):
        """x (B, L, d) -> out (B, L, d), sequence-level balance loss (scalar; 0 when off or in eval)."""
        B, L, d = x.shape
        flat = x.reshape(-1, d)  # (N, d)
        scores = torch.sigmoid(self.router(flat))  # (N, E)
        chosen = self._limit_groups(scores + self.balance_bias).topk(self.top_k, dim=-1).indices  # (N, k), selection only
        gates = scores.gather(-1, chosen)
        if self.norm_topk_prob:
            gates = gates / gates.sum(-1, keepdim=True)
        if self.routed_scaling != 1.0:
            gates = gates * self.routed_scaling
        out = self._dispatch(flat, chosen, gates)
        for expert in self.shared_experts:
            out = out + expert(flat)
        counts = expert_counts(chosen, self.num_experts).to(scores.dtype)  # (E,)
        if self.training:
            self.load_counts += counts.detach()
        return out.view(B, L, d), self._sequence_aux_loss(scores.view(B, L, -1), chosen.view(B, L, -1))

    def dense_dispatch(self, device: torch.device) -> bool:
        """Whether a forward on `device` runs every expert over every token (config `moe_dispatch`; 'auto': on CUDA
        while it costs at most DENSE_DISPATCH_MAX_FACTOR times the routed experts' FLOPs)."""
        if self.dispatch == "auto":
            return device.type == "cuda" and self.num_experts <= DENSE_DISPATCH_MAX_FACTOR * self.top_k
        return self.dispatch == "dense"

    def _dispatch(self, flat: torch.Tensor, chosen: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """flat (N, d), chosen and gates (N, k) -> the routed experts' gated sum (N, d)."""
        if self.dense_dispatch(flat.device):
            return self._dense_experts(flat, chosen, gates)
        return self._looped_experts(flat, chosen, gates)

    def _looped_experts(self, flat: torch.Tensor, chosen: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The reference: each expert over the tokens that chose it (their list: one host sync per expert on CUDA)."""
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if torch.compiler.is_compiling() or token.numel():  # compiled: no data-dependent branch
                out = out.index_add(0, token, (expert(flat[token]) * gates[token, slot, None]).to(out.dtype))  # autocast
        return out

    def _dense_experts(self, flat: torch.Tensor, chosen: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Every expert over all N tokens times its gate, 0 where not routed: fixed shapes, no host sync; the same sum
        as the loop, in the same expert order (an unrouted term adds 0), while the experts' outputs are finite. An
        expert no token chose gets a zero gradient here (the loop leaves it None, so AdamW skips it that step)."""
        weights = torch.zeros(flat.shape[0], self.num_experts, dtype=gates.dtype, device=flat.device)
        weights = weights.scatter(1, chosen, gates)  # (N, E): the gate where routed, else 0
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + (expert(flat) * weights[:, e, None]).to(out.dtype)  # autocast
        return out

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 group-limited routing: (N, E) selection scores -> -inf outside each token's best
        `topk_group` of `n_group` expert groups (a group scores the sum of its two best experts)."""
        if self.n_group == 1:
            return choice
        N, E = choice.shape
        grouped = choice.view(N, self.n_group, E // self.n_group)
        best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices  # (N, topk_group)
        keep = torch.zeros(N, self.n_group, dtype=torch.bool, device=choice.device).scatter_(1, best_groups, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)

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
        """Apply the loss-free balancing update from the loads seen since the last call; return the load share (E,).
        No host sync: loads are whole counts, and with none seen the share is 0 and the bias moves by sign(0) = 0."""
        share = self.load_counts / self.load_counts.sum().clamp_min(1)
        self.balance_bias += self.bias_rate * torch.sign(self.load_counts.mean() - self.load_counts)
        self.load_counts.zero_()
        return share


class DenseFeedForward(SwiGLU):
    """A dense SwiGLU MLP in a block's MoE slot (DeepSeek-V3's first `first_k_dense_replace` layers): the same
    (out, balance_loss) contract as MoEFeedForward, with no router, so no load to balance."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, cfg.dense_d_ff or cfg.d_ff)
        self.register_buffer("load_counts", torch.zeros(0), persistent=False)

    def forward(self, x: torch.Tensor):
        return super().forward(x), torch.zeros((), device=x.device)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attn: nn.Module, dense_mlp: bool = False):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), attn
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = DenseFeedForward(cfg) if dense_mlp else MoEFeedForward(cfg)

    def forward(self, x: torch.Tensor, mode: AttentionMode, shared_scores=None, shared_coarse=None, **selector_inputs):
        """x (B, L, d_model) -> x, AttentionAux, MoE balance loss. shared_*: the group leader's index scores;
        selector_inputs: what the layer's selector reads beside the scores (the adaptive model's token features)."""
        attn_out, aux = self.attn(self.attn_norm(x), mode, shared_scores, shared_coarse, **selector_inputs)
        x = x + attn_out
        ffn_out, balance_loss = self.ffn(self.ffn_norm(x))
        return x + ffn_out, aux, balance_loss


# ----------------------------------------------------------------------------- multi-head latent attention
class MultiHeadLatentAttention(CausalSelfAttention):
    """DeepSeek-V2/V3 multi-head latent attention (MLA), dense (the classic MLA model's attention).

    q = q_b_proj(RMSNorm(q_a_proj(x))) per head [nope ; rope]; one KV latent c = RMSNorm(kv_a(x)[:r]) and one
    decoupled RoPE key k_R = RoPE(kv_a(x)[r:]) shared by all heads; kv_b_proj(c) -> per-head [k_nope ; v].
    MHA mode (dense here): decompress k, v per head. MQA mode (attend_selected, DSA): W_UK absorbed into the
    queries, attention over the shared rows [c ; k_R], W_UV applied after — the same maths with one KV row per
    token for every head, which is what makes token-level top-k cheap. Parameter names follow transformers'
    DeepseekV3/V32 attention.
    """

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        H, self.nope, self.rope_dim, self.v_dim = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.n_heads, self.kv_rank = H, cfg.kv_lora_rank
        self.scale = (self.nope + self.rope_dim) ** -0.5
        self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=cfg.attention_bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (self.nope + self.rope_dim), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.d_model, cfg.kv_lora_rank + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, cfg.d_model, bias=cfg.attention_bias)
        self.rope = RotaryEmbedding(self.rope_dim, cfg.max_seq_len, cfg.rope_base, cfg.rope_interleaved)

    def project(self, x: torch.Tensor, start: int = 0):
        """x (B, L, d_model) -> q_latent (B, L, q_rank), q_nope (B, L, H, nope), q_pe (B, L, H, rope),
        c (B, L, kv_rank), k_pe (B, L, rope) — RoPE applied to q_pe and k_pe at positions start..start+L-1."""
        B, L, _ = x.shape
        q_latent = self.q_a_layernorm(self.q_a_proj(x))
        q_nope, q_pe = self.q_b_proj(q_latent).view(B, L, self.n_heads, -1).split([self.nope, self.rope_dim], -1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], -1)
        return (q_latent, q_nope, self.rope(q_pe, seq_dim=1, start=start), self.kv_a_layernorm(c),
                self.rope(k_pe, seq_dim=1, start=start))

    def decompress(self, heads):
        """MHA mode: -> q, k (B, H, L, nope + rope), v (B, H, L, v_dim)."""
        _, q_nope, q_pe, c, k_pe = heads
        B, L, H, _ = q_nope.shape
        k_nope, v = self.kv_b_proj(c).view(B, L, H, -1).split([self.nope, self.v_dim], -1)
        q = torch.cat([q_nope, q_pe], -1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, L, H, self.rope_dim)], -1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def merge(self, out: torch.Tensor) -> torch.Tensor:  # (B, H, L, v_dim) -> (B, L, d_model)
        B, H, L, D = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, L, H * D))

    def attend_dense(self, heads) -> torch.Tensor:
        q, k, v = self.decompress(heads)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale))

    def attend_dense_probs(self, heads):
        q, k, v = self.decompress(heads)
        probs = causal_attention_probs(q, k)  # scale (nope + rope)^-1/2 = q's last dim
        return self.merge(probs @ v), probs

    def absorbed(self, heads):
        """MQA mode: -> q (B, L, H, kv_rank + rope) with W_UK absorbed, shared rows kv (B, L, kv_rank + rope)."""
        _, q_nope, q_pe, c, k_pe = heads
        w_uk = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)[:, :self.nope]
        q = torch.cat([torch.einsum("blhn,hnc->blhc", q_nope, w_uk), q_pe], -1)
        return q, torch.cat([c, k_pe], -1).to(q.dtype)  # one dtype for the MQA kernels (bf16 under autocast)

    def attend_selected(self, heads, backend, selection, return_probs: bool):
        q, kv = self.absorbed(heads)
        out_latent, probs = backend.attend_latent(q, kv, selection=selection, v_dim=self.kv_rank, scale=self.scale,
                                                  return_probs=return_probs)  # (B, L, H, kv_rank)
        return self.merge_latent(out_latent), probs

    def merge_latent(self, out_latent: torch.Tensor) -> torch.Tensor:
        """MQA mode's output: out_latent (B, L, H, kv_rank) -> W_UV per head, then o_proj -> (B, L, d_model)."""
        w_uv = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)[:, self.nope:]
        return self.merge(torch.einsum("blhc,hvc->bhlv", out_latent, w_uv))  # via (B, H, L, v_dim)

    def recall_inputs(self, heads):
        q, k, _ = self.decompress(heads)
        return q, k

    def indexer_input(self, x: torch.Tensor, heads) -> torch.Tensor:
        """The indexer reads x (keys, weights) and the query latent (queries), as DeepSeek-V3.2's Indexer."""
        return torch.cat([x, heads[0]], -1).detach()


class SparseLatentAttention(SparseAttentionLayer, MultiHeadLatentAttention):
    """DSA on MLA in MQA mode, as DeepSeek-V3.2 runs it: the indexer's queries read the query latent, one
    selected set per query shared by all heads, attention over the selected shared latent rows."""

    def __init__(self, cfg: ModelConfig, indexer: nn.Module | None = None, selector: nn.Module | None = None,
                 backend: MaskedBackend | None = None, shares_indexer: bool = False):
        super().__init__(cfg)
        self.init_sparse(cfg, indexer, selector, backend, shares_indexer, indexer_q_dim=cfg.q_lora_rank)


# ----------------------------------------------------------------------------- indexer / selector / backend registry
BACKENDS = {"masked": MaskedBackend, "gather": GatherBackend, "triton": TritonBackend, "block": BlockBackend,
            "flex": FlexBackend}


def build_backend(cfg: ModelConfig) -> MaskedBackend:
    backend = BACKENDS[cfg.attention_backend]
    return backend(cfg.sparse_block_size) if issubclass(backend, BlockBackend) else backend()


def build_indexer(cfg: ModelConfig) -> nn.Module:
    """A layer's indexer from ModelConfig (the plain LightningIndexer for the default fields)."""
    sizes = (cfg.d_model, cfg.indexer_heads, cfg.indexer_dim)
    common = dict(precision=cfg.indexer_precision, rope_dim=cfg.indexer_rope_dim,
                  max_seq_len=cfg.max_seq_len, rope_base=cfg.rope_base)
    mla = cfg.attention_type == "mla"
    if cfg.multiscale_block:
        indexer = MultiScaleIndexer(*sizes, block_size=cfg.multiscale_block, **common)
    elif cfg.indexer_precision != "fp32" or (cfg.shared_indexer_group > 1 and not mla):  # a shared leader must
        indexer = OptimizedLightningIndexer(*sizes, **common)  # return its scores (the plain one may go chunked)
    else:
        indexer = LightningIndexer(*sizes, cfg.indexer_rope_dim, cfg.max_seq_len, cfg.rope_base,
                                   q_dim=cfg.q_lora_rank if mla else 0, rope_interleaved=cfg.indexer_rope_interleaved)
        if cfg.shared_indexer_group > 1:  # MLA sharing: queries still read the query latent; keep the full scores
            indexer.fast_selectable = False
    indexer.k_norm.eps = cfg.indexer_norm_eps
    return indexer


def build_selector(cfg: ModelConfig, indexer: nn.Module) -> nn.Module:
    """A layer's selector from ModelConfig: k strategy, else pattern, else plain top-k; restricted to
    the regions of the indexer's coarse scores when it is a MultiScaleIndexer (their count derived from k and L)."""
    if cfg.k_strategy != "fixed":
        selector = build_k_selector(cfg.k_strategy, cfg.sparse_top_k)
    elif cfg.selection_pattern != "topk":
        selector = build_pattern(cfg.selection_pattern, cfg.sparse_top_k)
    elif cfg.structure_window:  # the structure lever: first sinks + last window kept, the indexer picks the rest
        selector = levers.StructuredTopKSelector(cfg.sparse_top_k, cfg.structure_sinks, cfg.structure_window)
    else:
        selector = TopKTokenSelector(cfg.sparse_top_k)
    if isinstance(indexer, MultiScaleIndexer):
        selector = RegionRestrictedSelector(selector, indexer.block_size)
    return selector


def indexer_leaders(n_layers: int, group: int) -> list[int]:
    """Layer i reuses the index scores of layer leaders[i] (itself when it owns an indexer). Groups of
    `group` consecutive layers share the first one's indexer; a last group of one layer keeps its own."""
    return [i - i % group for i in range(n_layers)]


def build_sparse_attention(cfg: ModelConfig, leader: DeepSeekSparseAttention | None = None):
    """A layer's DSA module; `leader` is its group leader's module when it shares that indexer."""
    layer = SparseLatentAttention if cfg.attention_type == "mla" else DeepSeekSparseAttention
    if cfg.selection_source != "indexer":  # indexer-free controls: no indexer parameters at all
        selector = {"local": LocalSelector, "random": RandomSelector, "oracle": OracleSelector}[cfg.selection_source](
            cfg.sparse_top_k)
        return layer(cfg, selector=selector, backend=build_backend(cfg), shares_indexer=True)
    if leader is not None:
        selector = build_selector(cfg, leader.indexer)
        module = layer(cfg, selector=selector, backend=build_backend(cfg), shares_indexer=True)
    else:
        indexer = build_indexer(cfg)
        module = layer(cfg, indexer, build_selector(cfg, indexer), build_backend(cfg))
    module.objective = build_objective(cfg)
    return module


def build_objective(cfg: ModelConfig) -> levers.IndexerObjective | None:
    """The indexer's losses under the config's levers (None: the paper's KLs)."""
    loss = levers.WarmupLoss(cfg.structure_sinks, cfg.structure_window, row_weight=cfg.warmup_row_weight,
                             rank_weight=cfg.warmup_rank_weight)
    if loss.is_paper and cfg.warmup_target == "sum":
        return None
    group = cfg.n_heads if cfg.attention_type == "mla" else 1  # MLA's sparse model: one shared KV row (MQA)
    return levers.IndexerObjective(cfg.warmup_target, group, loss)


# ----------------------------------------------------------------------------- language models
@dataclass
class ModelAux:
    """What a forward computed beside the logits."""
    layers: list[AttentionAux]  # one per layer
    balance_loss: torch.Tensor  # MoE sequence-level balance loss, summed over layers

    @property
    def indexer_loss(self) -> torch.Tensor:
        """Sum over layers of the indexer KL (raises when the forward's mode asked for none)."""
        losses = [a.indexer_loss for a in self.layers if a.indexer_loss is not None]
        if not losses:
            raise RuntimeError("no indexer loss was computed: forward with AttentionMode(indexer_loss=...)")
        return sum(losses)

    @property
    def stats(self) -> list[dict]:
        return [a.stats for a in self.layers if a.stats is not None]


class _MoELLM(nn.Module):
    default_mode = DENSE  # what a plain model(input_ids) computes

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        attentions: list[nn.Module] = []
        for layer in range(cfg.n_layers):
            attentions.append(self.build_attention(cfg, layer, attentions))
        self.blocks = nn.ModuleList(Block(cfg, attn, dense_mlp=i < cfg.dense_mlp_layers)
                                    for i, attn in enumerate(attentions))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_emb.weight

    @property
    def leaders(self) -> list[int]:
        """Layer i reuses the index scores of layer leaders[i] (itself when it owns an indexer)."""
        return indexer_leaders(self.cfg.n_layers, self.cfg.shared_indexer_group)

    def build_attention(self, cfg: ModelConfig, layer: int, earlier: list[nn.Module]) -> nn.Module:
        return MultiHeadLatentAttention(cfg) if cfg.attention_type == "mla" else CausalSelfAttention(cfg)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, mode: AttentionMode | None = None, return_aux: bool = False):
        """input_ids (B, L) long -> logits (B, L, vocab), or (logits, ModelAux) with return_aux.

        `mode` says what attention computes (default: the model's own — dense for the classic model,
        sparse for the sparse one)."""
        if input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"input length {input_ids.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        mode = self.default_mode if mode is None else mode
        inputs = self.selector_inputs(input_ids, mode)
        x = self.token_emb(input_ids)
        layers, balance = [], []
        for i, block in enumerate(self.blocks):
            shared = layers[self.leaders[i]] if self.leaders[i] != i else AttentionAux()  # a follower: its leader's
            x, aux, balance_loss = block(x, mode, shared.index_scores, shared.coarse_scores, **inputs)
            layers.append(aux)
            balance.append(balance_loss)
        logits = self.lm_head(self.norm(x))
        return (logits, ModelAux(layers, sum(balance))) if return_aux else logits

    def selector_inputs(self, input_ids: torch.Tensor, mode: AttentionMode) -> dict:
        """What every layer's selector reads beside the index scores, computed once per forward (none here)."""
        return {}

    @property
    def attentions(self) -> list:
        return [block.attn for block in self.blocks]

    def indexer_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if ".indexer." in n]

    def main_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if ".indexer." not in n]

    def set_training_progress(self, fraction: float) -> None:
        """Training progress in [0, 1] for progressive k schedules (a no-op without one)."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"training progress fraction={fraction} must be in [0, 1]")
        for module in self.modules():
            if hasattr(module, "set_progress"):
                module.set_progress(fraction)

    def update_balance_bias(self) -> torch.Tensor:
        """Loss-free balancing step for every MoE layer -> (MoE layers, experts) load shares, on the model's device
        (no host sync; dense-MLP layers have no router and are left out; no MoE layer: shape (0,))."""
        shares = [block.ffn.update_balance_bias() for block in self.blocks if isinstance(block.ffn, MoEFeedForward)]
        return torch.stack(shares) if shares else torch.zeros(0, device=self.norm.weight.device)


class ClassicAttentionMoELLM(_MoELLM):
    """Dense causal attention + MoE (the baseline)."""


class SparseAttentionMoELLM(_MoELLM):
    """DeepSeek Sparse Attention + MoE. What a forward computes (sparse or dense attention, which indexer
    loss, recall statistics) is its `mode` argument; the results come back in ModelAux."""
    default_mode = AttentionMode()

    def build_attention(self, cfg: ModelConfig, layer: int, earlier: list[nn.Module]) -> nn.Module:
        leader = indexer_leaders(cfg.n_layers, cfg.shared_indexer_group)[layer]
        return build_sparse_attention(cfg, earlier[leader] if leader != layer else None)


# ----------------------------------------------------------------------------- adaptive and fixed-share models (the adaptive-sparsity experiment)
# The adaptive-sparsity models (seed "Experiment 3"), MHA or MLA (ModelConfig.attention_type):
TOKEN_LEVEL_BACKENDS = ("masked", "gather", "triton")


def check_plain_dsa(cfg: ModelConfig, model: str) -> None:
    """These models replace the selector of plain token-level DSA: refuse the options that replace it too."""
    others = {"selection_pattern": "topk", "k_strategy": "fixed", "shared_indexer_group": 1, "multiscale_block": 0,
              "selection_source": "indexer"}
    clash = [f"{name}={getattr(cfg, name)!r}" for name, default in others.items() if getattr(cfg, name) != default]
    if cfg.attention_backend not in TOKEN_LEVEL_BACKENDS:
        clash.append(f"attention_backend={cfg.attention_backend!r}")
    if clash:
        raise ValueError(f"{model} sets k per query itself and cannot be combined with {', '.join(clash)}; use the "
                         f"defaults of those keys and attention_backend one of {', '.join(TOKEN_LEVEL_BACKENDS)}")


def _layer_class(cfg: ModelConfig, mha, mla):
    return mla if cfg.attention_type == "mla" else mha


class _PassesContent:
    """A DSA layer whose selector is a DynamicSparsityController: it passes the controller the sequence's token
    features (from the model) and its own input (the hidden states the controller measures) on every call."""

    def forward(self, x: torch.Tensor, mode: AttentionMode = AttentionMode(), shared_scores=None, shared_coarse=None,
                tokens: torch.Tensor | None = None):
        """x (B, L, d_model), tokens (B, L, 2) -> out (B, L, d_model), AttentionAux."""
        return super().forward(x, mode, shared_scores, shared_coarse, tokens=tokens, hidden=x.detach())


class AdaptiveSparseAttention(_PassesContent, DeepSeekSparseAttention):
    """MHA DSA with the controller's k_t."""


class AdaptiveSparseLatentAttention(_PassesContent, SparseLatentAttention):
    """MLA DSA (MQA mode) with the controller's k_t."""


class AdaptiveMoELLM(SparseAttentionMoELLM):
    """DSA + MoE with k_t per query, sequence and layer from the controller (see adaptive_selection.py)."""

    def __init__(self, cfg: ModelConfig, k_config: AdaptiveKConfig = AdaptiveKConfig()):
        k_config.validate()
        self.k_config = k_config
        self.analyzer = ContentComplexityAnalyzer(cfg.vocab_size, k_config)
        super().__init__(cfg)

    def build_attention(self, cfg: ModelConfig, layer: int, earlier: list) -> torch.nn.Module:
        check_plain_dsa(cfg, "AdaptiveMoELLM")
        controller = DynamicSparsityController(self.k_config, self.analyzer, layer)
        cls = _layer_class(cfg, AdaptiveSparseAttention, AdaptiveSparseLatentAttention)
        return cls(cfg, build_indexer(cfg), controller, build_backend(cfg))

    @property
    def controllers(self) -> list[DynamicSparsityController]:
        return [attention.selector for attention in self.attentions]

    def selector_inputs(self, input_ids: torch.Tensor, mode: AttentionMode) -> dict:
        """The token features of input_ids (B, L) -> (B, L, 2), computed once and passed to every layer's
        controller (none when the forward selects nothing)."""
        return {"tokens": self.analyzer.token_features(input_ids)} if mode.needs_indexer else {}

    @contextlib.contextmanager
    def recording_k(self):
        """Yields {layer: [one record per forward]} (DynamicSparsityController.recording) while open."""
        with contextlib.ExitStack() as stack:
            yield {c.layer: stack.enter_context(c.recording()) for c in self.controllers}


class FixedSparseMoELLM(SparseAttentionMoELLM):
    """DSA + MoE keeping k_t = ceil(fraction (t+1)) keys for query t. Give `fraction` (0, 1], or `mean_keys`:
    then the fraction is the prefix share whose mean keys per query at length `budget_len` (default
    cfg.max_seq_len) is closest to mean_keys (adaptive_selection.ratio_for_mean_keys)."""

    def __init__(self, cfg: ModelConfig, fraction: float | None = None, mean_keys: float | None = None,
                 budget_len: int | None = None):
        if (fraction is None) == (mean_keys is None):
            raise ValueError("FixedSparseMoELLM needs exactly one of fraction (a share of the prefix) or mean_keys "
                             "(a budget of keys per query)")
        if mean_keys is not None:
            fraction = ratio_for_mean_keys(budget_len or cfg.max_seq_len, mean_keys)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction} must be in (0, 1] (a share of the causal prefix)")
        self.fraction, self.mean_keys = float(fraction), mean_keys
        super().__init__(cfg)

    def build_attention(self, cfg: ModelConfig, layer: int, earlier: list) -> torch.nn.Module:
        check_plain_dsa(cfg, "FixedSparseMoELLM")
        selector = AdaptiveKSelector(cfg.sparse_top_k, "ratio", ratio=self.fraction)
        cls = _layer_class(cfg, DeepSeekSparseAttention, SparseLatentAttention)
        return cls(cfg, build_indexer(cfg), selector, build_backend(cfg))
