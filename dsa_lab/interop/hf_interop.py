"""Our DSA models <-> transformers' DeepSeek-V3.2 (`deepseek_v32`), GLM-5 (`glm_moe_dsa`) and, without an
indexer, DeepSeek-V3 (`deepseek_v3`): the same maths, tensor for tensor.

    from_hf(model_or_path)   -> SparseAttentionMoELLM (DSA configs) or ClassicAttentionMoELLM (deepseek_v3)
    to_hf(model, path=None)  -> a transformers model (saved with save_pretrained when `path` is given)
    greedy_generate(model, input_ids, n) -> our own greedy loop (full forward per token, no cache)

Conventions checked against transformers (tests/test_hf_interop.py proves the logits equal):
- MLA: parameter names are shared (q_a_proj ... o_proj); main RoPE interleaved (rope_interleaved=True), softmax
  scale (qk_nope + qk_rope)^-1/2; q_a/kv_a RMSNorms eps 1e-6 in both; block norms eps = HF rms_norm_eps (norm_eps).
- Indexer: HF wq_b (on the query latent) = our q_proj with q_dim = q_lora_rank, wk = k_proj, k_norm LayerNorm with
  bias, eps 1e-6 (indexer_norm_eps), weights_proj; weights * H_I^-1/2 and scores * d_I^-1/2 (both sides); RoPE on
  the *leading* qk_rope_head_dim indexer dims, non-interleaved in DeepSeek-V3.2, interleaved in GLM-MoE-DSA
  (indexer_rope_interleaved). GLM "shared" indexer layers reuse the previous full layer's top-k; ours reuse its
  scores with the same k (the same set) via shared_indexer_group when the pattern is regular groups.
- Top-k ties: HF calls torch.topk (which tied key wins is unspecified); ours breaks ties toward the most recent
  key. Where the k-th and (k+1)-th index scores tie (ReLU zeros do), the two may select different keys.
- MoE: sigmoid router, e_score_correction_bias = our balance_bias buffer (selection only), n_group/topk_group,
  norm_topk_prob, routed_scaling_factor; HF's one shared MLP of width n*I = our n shared experts of width I;
  HF's dense MLP in the first first_k_dense_replace layers = our dense_mlp_layers (width dense_d_ff).
Not mapped (refused with one ValueError line): rope scaling (YaRN etc.), q_lora_rank=None, grouped KV heads,
activations other than SiLU, MLP biases, irregular dense/shared-indexer layer patterns; on export, our MHA
models and indexer variants transformers has no equivalent of.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from config import ModelConfig
from models import ClassicAttentionMoELLM, SparseAttentionMoELLM

DSA_TYPES = {"deepseek_v32": False, "glm_moe_dsa": True}  # model_type -> indexer RoPE interleaved
CLASSIC_TYPES = ("deepseek_v3",)
HF_INDEXER_NORM_EPS = 1e-6  # transformers' DSA indexers build nn.LayerNorm(head_dim, eps=1e-6)
DEFAULT_MAX_SEQ_LEN = 4096  # RoPE tables are precomputed per layer: import long-context models at this length
MLA_NAMES = ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")
BIASED = ("q_a_proj", "kv_a_proj_with_mqa", "o_proj")  # HF attention_bias
INDEXER_NAMES = (("wq_b", "q_proj"), ("wk", "k_proj"), ("k_norm", "k_norm"), ("weights_proj", "weights_proj"))


def _supported() -> str:
    return ", ".join([*DSA_TYPES, *CLASSIC_TYPES])


# ----------------------------------------------------------------------------- configs
def config_from_hf(hf_config, max_seq_len: int | None = None) -> ModelConfig:
    """A transformers config (deepseek_v32 / glm_moe_dsa / deepseek_v3) -> the ModelConfig that computes the same."""
    c, kind = hf_config, getattr(hf_config, "model_type", None)
    if kind not in DSA_TYPES and kind not in CLASSIC_TYPES:
        raise ValueError(f"model_type={kind!r} cannot be mapped; supported: {_supported()}")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope.get('rope_type')!r} (RoPE scaling) is not supported: our RoPE is the "
                         f"default one; use a checkpoint with rope_type='default'")
    if c.q_lora_rank is None:
        raise ValueError("q_lora_rank=None (no query latent) is not supported: our MLA and indexer read q_a_proj's latent")
    if c.num_key_value_heads != c.num_attention_heads:
        raise ValueError(f"num_key_value_heads={c.num_key_value_heads} != num_attention_heads="
                         f"{c.num_attention_heads}: MLA here decompresses one K/V per head")
    if c.hidden_act != "silu" or getattr(c, "mlp_bias", False):
        raise ValueError(f"hidden_act={c.hidden_act!r}, mlp_bias={getattr(c, 'mlp_bias', False)}: our experts are "
                         f"bias-free SwiGLU (silu)")
    n = c.num_hidden_layers
    types = list(getattr(c, "mlp_layer_types", None) or
                 ["dense"] * min(c.first_k_dense_replace or 0, n) + ["sparse"] * max(0, n - (c.first_k_dense_replace or 0)))
    n_dense = next((i for i, t in enumerate(types) if t != "dense"), n)
    if types != ["dense"] * n_dense + ["sparse"] * (n - n_dense):
        raise ValueError(f"mlp_layer_types={types} is not 'leading dense layers, then MoE'; only that pattern maps")
    fields = dict(
        vocab_size=c.vocab_size, d_model=c.hidden_size, n_heads=c.num_attention_heads, n_layers=n,
        d_ff=c.moe_intermediate_size, dense_d_ff=c.intermediate_size, dense_mlp_layers=n_dense,
        max_seq_len=min(c.max_position_embeddings, max_seq_len or DEFAULT_MAX_SEQ_LEN),
        num_experts=c.n_routed_experts, expert_top_k=c.num_experts_per_tok, num_shared_experts=c.n_shared_experts or 0,
        moe_n_group=c.n_group or 1, moe_topk_group=c.topk_group or 1, moe_norm_topk_prob=bool(c.norm_topk_prob),
        moe_routed_scaling=float(c.routed_scaling_factor), rope_base=float(rope.get("rope_theta", 10000.0)),
        norm_eps=float(c.rms_norm_eps), tie_embeddings=bool(c.tie_word_embeddings),
        attention_bias=bool(c.attention_bias), attention_type="mla", q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim, rope_interleaved=bool(getattr(c, "rope_interleave", True)))
    if kind in DSA_TYPES:
        fields.update(indexer_heads=c.index_n_heads, indexer_dim=c.index_head_dim, indexer_rope_dim=c.qk_rope_head_dim,
                      sparse_top_k=c.index_topk, indexer_rope_interleaved=DSA_TYPES[kind],
                      indexer_norm_eps=HF_INDEXER_NORM_EPS,
                      shared_indexer_group=_group_of(list(getattr(c, "indexer_types", None) or ["full"] * n)))
    else:  # no indexer: keep the indexer fields valid and unused (a classic model builds none)
        fields.update(indexer_rope_dim=min(c.qk_rope_head_dim, ModelConfig.indexer_dim))
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def _group_of(indexer_types: list[str]) -> int:
    """GLM's per-layer indexer_types -> shared_indexer_group (groups of g layers led by a 'full' one)."""
    n = len(indexer_types)
    for g in range(1, n + 1):
        if indexer_types == ["full" if i % g == 0 else "shared" for i in range(n)]:
            return g
    raise ValueError(f"indexer_types={indexer_types} is not regular groups ('full' then g-1 'shared', repeated); "
                     f"only that sharing pattern maps to shared_indexer_group")


def hf_config_from(cfg: ModelConfig, model_type: str, base: dict | None = None):
    """ModelConfig -> a transformers config of `model_type` (fields of `base`, the imported model's own config,
    kept where ours does not define them: token ids, max_position_embeddings, ...). Refuses what HF cannot hold."""
    from transformers import CONFIG_MAPPING
    check_exportable(cfg, model_type)
    n = cfg.n_layers
    fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=n, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, intermediate_size=cfg.dense_d_ff or cfg.d_ff, moe_intermediate_size=cfg.d_ff,
        first_k_dense_replace=cfg.dense_mlp_layers,
        n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.expert_top_k, n_shared_experts=cfg.num_shared_experts,
        n_group=cfg.moe_n_group, topk_group=cfg.moe_topk_group, norm_topk_prob=cfg.moe_norm_topk_prob,
        routed_scaling_factor=cfg.moe_routed_scaling, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attention_bias, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base})
    if model_type == "deepseek_v3":
        fields.update(rope_interleave=cfg.rope_interleaved)
    else:
        fields.update(index_topk=cfg.sparse_top_k, index_head_dim=cfg.indexer_dim, index_n_heads=cfg.indexer_heads)
        if model_type == "glm_moe_dsa":
            g = cfg.shared_indexer_group
            fields.update(indexer_types=["full" if i % g == 0 else "shared" for i in range(n)])
    if base:
        derived = ("mlp_layer_types", "layer_types", "indexer_types", "head_dim", "qk_head_dim", "model_type",
                   "transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype")
        fields = {**{k: v for k, v in base.items() if k not in derived}, **fields}
        fields.setdefault("max_position_embeddings", max(cfg.max_seq_len, base.get("max_position_embeddings", 0)))
    else:  # our models know no tokenizer: no special token ids
        fields.update(max_position_embeddings=cfg.max_seq_len, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return CONFIG_MAPPING[model_type](**fields)


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    """Raise one ValueError line for anything transformers' `model_type` cannot compute."""
    if model_type not in DSA_TYPES and model_type not in CLASSIC_TYPES:
        raise ValueError(f"model_type={model_type!r} is not an export target; choose one of {_supported()}")
    if cfg.attention_type != "mla":
        raise ValueError("to_hf exports MLA models only (attention_type='mla'); our MHA layout has no transformers twin")
    if model_type == "deepseek_v3":
        return
    problems = [f"{name}={getattr(cfg, name)!r} (needs {want!r})" for name, want in (
        ("selection_source", "indexer"), ("indexer_precision", "fp32"), ("selection_pattern", "topk"),
        ("k_strategy", "fixed"), ("multiscale_block", 0), ("rope_interleaved", True),
        ("indexer_rope_dim", cfg.qk_rope_head_dim), ("indexer_norm_eps", HF_INDEXER_NORM_EPS),
        ("indexer_rope_interleaved", DSA_TYPES[model_type])) if getattr(cfg, name) != want]
    if model_type == "deepseek_v32" and cfg.shared_indexer_group != 1:
        problems.append(f"shared_indexer_group={cfg.shared_indexer_group} (DeepSeek-V3.2 has no shared indexer "
                        f"layers; export as glm_moe_dsa)")
    if problems:
        raise ValueError(f"cannot export to {model_type}: " + "; ".join(problems))


def default_model_type(model) -> str:
    if not isinstance(model, SparseAttentionMoELLM):
        return "deepseek_v3"
    return "glm_moe_dsa" if model.cfg.indexer_rope_interleaved else "deepseek_v32"


# ----------------------------------------------------------------------------- tensors
def _renames(cfg: ModelConfig, sparse: bool) -> list[tuple[str, str]]:
    """(HF key, our key) for every tensor that maps one to one."""
    pairs = [("model.embed_tokens.weight", "token_emb.weight"), ("model.norm.weight", "norm.weight"),
             ("lm_head.weight", "lm_head.weight")]
    leaders = [i - i % cfg.shared_indexer_group for i in range(cfg.n_layers)]
    for i in range(cfg.n_layers):
        hf, us = f"model.layers.{i}.", f"blocks.{i}."
        pairs += [(hf + "input_layernorm.weight", us + "attn_norm.weight"),
                  (hf + "post_attention_layernorm.weight", us + "ffn_norm.weight")]
        for name in MLA_NAMES:
            pairs.append((f"{hf}self_attn.{name}.weight", f"{us}attn.{name}.weight"))
            if cfg.attention_bias and name in BIASED:
                pairs.append((f"{hf}self_attn.{name}.bias", f"{us}attn.{name}.bias"))
        if sparse and leaders[i] == i:
            for hf_name, our_name in INDEXER_NAMES:
                for p in ("weight", "bias") if hf_name == "k_norm" else ("weight",):
                    pairs.append((f"{hf}self_attn.indexer.{hf_name}.{p}", f"{us}attn.indexer.{our_name}.{p}"))
        if i >= cfg.dense_mlp_layers:
            pairs += [(hf + "mlp.gate.weight", us + "ffn.router.weight"),
                      (hf + "mlp.gate.e_score_correction_bias", us + "ffn.balance_bias")]
    return pairs


def state_from_hf(hf_state: dict, cfg: ModelConfig, sparse: bool) -> dict:
    """transformers state dict -> ours. Every HF tensor must be used (else ValueError naming the leftovers)."""
    used, out = set(), {}

    def take(key):
        if key not in hf_state:
            raise ValueError(f"the transformers model has no tensor {key!r}; is it a {_supported()} model?")
        used.add(key)
        return hf_state[key]

    if cfg.tie_embeddings and "lm_head.weight" not in hf_state:
        hf_state = {**hf_state, "lm_head.weight": hf_state["model.embed_tokens.weight"]}
    for hf_key, our_key in _renames(cfg, sparse):
        out[our_key] = take(hf_key)
    width = cfg.d_ff
    for i in range(cfg.n_layers):
        hf, us = f"model.layers.{i}.mlp.", f"blocks.{i}.ffn."
        if i < cfg.dense_mlp_layers:
            out[us + "gate_up.weight"] = torch.cat([take(hf + "gate_proj.weight"), take(hf + "up_proj.weight")])
            out[us + "down.weight"] = take(hf + "down_proj.weight")
            continue
        gate_up, down = take(hf + "experts.gate_up_proj"), take(hf + "experts.down_proj")  # (E, 2I, d), (E, d, I)
        for e in range(cfg.num_experts):
            out[f"{us}experts.{e}.gate_up.weight"], out[f"{us}experts.{e}.down.weight"] = gate_up[e], down[e]
        if cfg.num_shared_experts:  # one HF MLP of width n*I = n of ours of width I (split along the hidden units)
            gate, up, sdown = (take(f"{hf}shared_experts.{n}_proj.weight") for n in ("gate", "up", "down"))
            for j in range(cfg.num_shared_experts):
                rows = slice(j * width, (j + 1) * width)
                out[f"{us}shared_experts.{j}.gate_up.weight"] = torch.cat([gate[rows], up[rows]])
                out[f"{us}shared_experts.{j}.down.weight"] = sdown[:, rows]
    leftover = sorted(set(hf_state) - used - {"lm_head.weight"})
    if leftover:
        raise ValueError(f"{len(leftover)} transformers tensors have no place in our model, e.g. {leftover[:3]}")
    return out


def state_to_hf(state: dict, cfg: ModelConfig, sparse: bool) -> dict:
    """Our state dict -> transformers' (the inverse of state_from_hf)."""
    out = {hf_key: state[our_key] for hf_key, our_key in _renames(cfg, sparse)}
    width = cfg.d_ff
    for i in range(cfg.n_layers):
        hf, us = f"model.layers.{i}.mlp.", f"blocks.{i}.ffn."
        if i < cfg.dense_mlp_layers:
            out[hf + "gate_proj.weight"], out[hf + "up_proj.weight"] = state[us + "gate_up.weight"].chunk(2)
            out[hf + "down_proj.weight"] = state[us + "down.weight"]
            continue
        experts = range(cfg.num_experts)
        out[hf + "experts.gate_up_proj"] = torch.stack([state[f"{us}experts.{e}.gate_up.weight"] for e in experts])
        out[hf + "experts.down_proj"] = torch.stack([state[f"{us}experts.{e}.down.weight"] for e in experts])
        if cfg.num_shared_experts:
            shared = range(cfg.num_shared_experts)
            halves = [state[f"{us}shared_experts.{j}.gate_up.weight"].split(width) for j in shared]
            out[hf + "shared_experts.gate_proj.weight"] = torch.cat([g for g, _ in halves])
            out[hf + "shared_experts.up_proj.weight"] = torch.cat([u for _, u in halves])
            out[hf + "shared_experts.down_proj.weight"] = torch.cat(
                [state[f"{us}shared_experts.{j}.down.weight"] for j in shared], dim=1)
    return {k: v.detach().clone() for k, v in out.items()}


# ----------------------------------------------------------------------------- the two directions
def load_hf(model_or_path):
    """A transformers model, or a local folder / hub name loaded with AutoModelForCausalLM in fp32."""
    if isinstance(model_or_path, (str, Path)):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(str(model_or_path), dtype=torch.float32)
    return model_or_path


def from_hf(model_or_path, max_seq_len: int | None = None, **overrides):
    """transformers DeepSeek-V3.2 / GLM-MoE-DSA model (or folder / hub name) -> our SparseAttentionMoELLM with the
    same weights (DeepSeek-V3 -> ClassicAttentionMoELLM), fp32, eval mode, on the CPU.

    `max_seq_len` (default min(max_position_embeddings, 4096)) sizes our precomputed RoPE tables; `overrides` are
    extra ModelConfig fields that do not change the maths (attention_backend='gather', balance_bias_rate=...).
    The source config is kept in `model.hf_config` (a dict) so that to_hf restores its other fields."""
    hf_model = load_hf(model_or_path)
    cfg = dataclasses.replace(config_from_hf(hf_model.config, max_seq_len), **overrides)
    sparse = cfg_is_sparse(hf_model.config)
    model = (SparseAttentionMoELLM if sparse else ClassicAttentionMoELLM)(cfg)
    state = state_from_hf(dict(hf_model.state_dict()), cfg, sparse)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.hf_config = hf_model.config.to_dict()
    return model.eval()


def cfg_is_sparse(hf_config) -> bool:
    return hf_config.model_type in DSA_TYPES


def to_hf(model, path: str | Path | None = None, model_type: str | None = None):
    """Our MLA model -> a transformers model with the same weights (fp32, eval mode); `save_pretrained(path)` when a
    path is given. model_type: 'deepseek_v32' | 'glm_moe_dsa' | 'deepseek_v3' (default: the imported model's own,
    else by indexer RoPE: interleaved -> glm_moe_dsa, else deepseek_v32; the classic model -> deepseek_v3)."""
    from transformers import AutoModelForCausalLM
    base = getattr(model, "hf_config", None)
    model_type = model_type or (base or {}).get("model_type") or default_model_type(model)
    sparse = isinstance(model, SparseAttentionMoELLM)
    if sparse != (model_type in DSA_TYPES):
        raise ValueError(f"a {type(model).__name__} cannot become {model_type!r}: DSA models map to "
                         f"{', '.join(DSA_TYPES)}, the classic model to {', '.join(CLASSIC_TYPES)}")
    hf_config = hf_config_from(model.cfg, model_type, base)
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    hf_model.load_state_dict(state_to_hf(model.state_dict(), model.cfg, sparse), strict=True)
    hf_model.eval()
    if path is not None:
        hf_model.save_pretrained(str(path))
    return hf_model


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Our own greedy decoding: a full forward per new token (no KV cache), argmax of the last position.
    input_ids (B, L) -> (B, L + max_new_tokens)."""
    ids = input_ids
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids
