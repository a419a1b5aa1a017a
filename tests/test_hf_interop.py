"""Our models <-> transformers' DeepSeek-V3.2 / GLM-MoE-DSA (/ DeepSeek-V3): equal logits, exact round trip, export +
generate, and an imported model's indexers warmed up here. Offline: tiny random HF models built from configs."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, DeepseekV3Config, DeepseekV32Config,  # noqa: E402
                          GlmMoeDsaConfig)

from dsa_lab.interop.hf_interop import from_hf, greedy_generate, to_hf  # noqa: E402
from models import ClassicAttentionMoELLM, SparseAttentionMoELLM  # noqa: E402
from sparse_attention import AttentionMode  # noqa: E402

CONFIGS = {"deepseek_v32": DeepseekV32Config, "glm_moe_dsa": GlmMoeDsaConfig, "deepseek_v3": DeepseekV3Config}
L = 32


def tiny_hf(kind: str, seed: int = 0, **overrides):
    """hidden 64, 2 layers (the first with a dense MLP), 4 experts top-2 + 1 shared, kv_lora 32, q_lora 48, indexer
    2 x 16; random e_score_correction_bias so the balancing bias is exercised."""
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
                  qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1, max_position_embeddings=64,
                  routed_scaling_factor=2.5, rms_norm_eps=1e-5)
    if kind != "deepseek_v3":
        fields.update(index_topk=64, index_head_dim=16, index_n_heads=2)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](**fields), dtype=torch.float32).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.05)
    return model


def few_score_ties(hf):
    """Index scores tie at 0 wherever every head's ReLU is off, and tied top-k is broken differently here and in
    HF. Set the indexers' k_norm to weight 0.1, bias 1 on the non-RoPE dims: most heads' ReLUs stay on."""
    with torch.no_grad():
        for module in hf.modules():
            if type(module).__name__.endswith("Indexer"):
                module.k_norm.weight.fill_(0.1)
                module.k_norm.bias[8:].fill_(1.0)  # the leading qk_rope_head_dim=8 dims get RoPE
    return hf


def rel_err(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("kind", ["deepseek_v32", "glm_moe_dsa", "deepseek_v3"])
def test_logits_equal_with_k_at_least_L(kind):
    """Also group-limited routing (2 groups, keep 1) and MLA biases, which default to off."""
    hf = tiny_hf(kind, n_group=2, topk_group=1, attention_bias=True)
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    ours = from_hf(hf)
    assert isinstance(ours, SparseAttentionMoELLM if kind != "deepseek_v3" else ClassicAttentionMoELLM)
    ids = torch.randint(0, 128, (2, L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = rel_err(ours(ids), hf(ids).logits)
    what = f"k={ours.cfg.sparse_top_k} >= L={L}" if kind != "deepseek_v3" else "no indexer (classic MLA)"
    print(f"\n{kind}: {what}: max rel err {err:.2e}")
    assert err <= 1e-5


def indexer_topk(hf, ids):
    """HF's own top-k indices per full indexer layer (B, L, k), captured from its indexers' outputs."""
    got, hooks = {}, []
    for name, module in hf.named_modules():
        if name.endswith("self_attn.indexer"):
            layer = int(name.split(".")[2])
            hooks.append(module.register_forward_hook(lambda m, a, out, layer=layer: got.__setitem__(layer, out.long())))
    with torch.no_grad():
        logits = hf(ids).logits
    for h in hooks:
        h.remove()
    return logits, got


def comparable_rows(aux_layers, hf_topk: dict, k: int):
    """Rows whose logits must agree, and a check that the two selections agree wherever they must.

    A row t of layer l is *ambiguous* when t+1 > k and its k-th and (k+1)-th index scores tie: HF's torch.topk
    and our most-recent-first tie-break may then keep different keys. Row t of a later layer depends on every row
    s <= t of the layers before, so one ambiguity excludes all later rows from the layers above it."""
    B, Lq = aux_layers[0].selected_idx.shape[:2]
    t = torch.arange(Lq)
    upstream = torch.zeros(B, Lq, dtype=torch.bool)  # some earlier-layer row s <= t was ambiguous
    last_hf = None
    for layer, aux in enumerate(aux_layers):
        scores = aux.index_scores
        ranked = scores.sort(-1, descending=True).values
        ambiguous = (t + 1 > k) & (ranked[..., k - 1] == ranked[..., min(k, Lq - 1)])
        hf_idx = last_hf = hf_topk.get(layer, last_hf)  # a GLM 'shared' layer reuses the last full one's top-k
        ours_set = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, aux.selected_idx.clamp(min=0), True)
        hf_set = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, hf_idx, True)
        causal = torch.isfinite(scores)
        must_agree = ~upstream & ~ambiguous
        assert ((ours_set & causal) == (hf_set & causal)).all(-1)[must_agree].all(), f"layer {layer}: selections differ"
        if layer == len(aux_layers) - 1:
            return ~upstream & ~ambiguous
        upstream = (upstream | ambiguous).cummax(-1).values


@pytest.mark.parametrize("kind,extra", [("deepseek_v32", {}), ("glm_moe_dsa", {}),
                                        ("glm_moe_dsa", {"indexer_types": ["full", "shared"]})],
                         ids=["deepseek_v32", "glm_moe_dsa", "glm_moe_dsa_shared"])
def test_logits_equal_with_k_below_L_on_unambiguous_rows(kind, extra):
    """k=8 < L=32. The test model's indexer k_norm gets a bias on its non-RoPE dims (weight 0.1, bias 1) so most
    heads' ReLUs are on and index scores rarely tie at 0; rows that still tie are found and excluded (above)."""
    hf = few_score_ties(tiny_hf(kind, index_topk=8, index_n_heads=8, **extra))
    ours = from_hf(hf)
    assert ours.cfg.shared_indexer_group == (2 if extra else 1)
    ids = torch.randint(0, 128, (2, L), generator=torch.Generator().manual_seed(2))
    ref, hf_topk = indexer_topk(hf, ids)
    with torch.no_grad():
        logits, aux = ours(ids, AttentionMode(), return_aux=True)
    rows = comparable_rows(aux.layers, hf_topk, k=8)
    sparse_rows = rows[:, 8:]  # rows where selection drops keys
    err = rel_err(logits[rows], ref[rows])
    print(f"\n{kind}{' shared' if extra else ''}: k=8 < L={L}: {int(sparse_rows.sum())}/{sparse_rows.numel()} "
          f"sparse rows unambiguous, max rel err there {err:.2e}")
    assert sparse_rows.float().mean() >= 0.5
    assert err <= 1e-5


def test_indexer_rope_convention_is_a_tested_field():
    """Flip the indexer RoPE layout (the only DeepSeek-V3.2 / GLM-5 difference): HF's selections are no longer ours."""
    hf = tiny_hf("glm_moe_dsa", index_topk=8, index_n_heads=8)
    ids = torch.randint(0, 128, (2, L), generator=torch.Generator().manual_seed(3))
    _, hf_topk = indexer_topk(hf, ids)
    right, wrong = from_hf(hf), from_hf(hf, indexer_rope_interleaved=False)
    with torch.no_grad():
        sel = {name: m(ids, AttentionMode(), return_aux=True)[1].layers[0].selected_idx.sort(-1).values
               for name, m in (("right", right), ("wrong", wrong))}
    hf_sel = hf_topk[0].sort(-1).values
    assert (sel["right"][:, 8:] == hf_sel[:, 8:]).all(-1).float().mean() > (sel["wrong"][:, 8:] == hf_sel[:, 8:]).all(-1).float().mean()


@pytest.mark.parametrize("kind", ["deepseek_v32", "glm_moe_dsa", "deepseek_v3"])
def test_round_trip_is_exact(kind):
    hf = tiny_hf(kind, attention_bias=True, tie_word_embeddings=(kind == "glm_moe_dsa"), n_group=2, topk_group=1)
    back = to_hf(from_hf(hf))
    a, b = hf.state_dict(), back.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[key], b[key]) for key in a), [key for key in a if not torch.equal(a[key], b[key])]
    for field in ("model_type", "n_group", "topk_group", "attention_bias", "tie_word_embeddings", "routed_scaling_factor",
                  "rms_norm_eps", "first_k_dense_replace", "max_position_embeddings", "index_topk"):
        assert getattr(back.config, field, None) == getattr(hf.config, field, None), field


def test_trained_model_exports_loads_and_generates_the_same_greedy_tokens(tmp_path):
    ours = from_hf(few_score_ties(tiny_hf("deepseek_v32", index_topk=8, index_n_heads=8))).train()
    opt = torch.optim.AdamW(ours.parameters(), lr=3e-3)
    data = torch.randint(0, 128, (8, L + 1), generator=torch.Generator().manual_seed(4))
    for _ in range(3):  # a few LM + sparse-KL steps, balancing bias updated as in train.run_stage
        logits, aux = ours(data[:, :-1], AttentionMode(indexer_loss="sparse"), return_aux=True)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten()) + aux.indexer_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours.update_balance_bias()
    ours.eval()
    assert ours.blocks[1].ffn.balance_bias.abs().sum() > 0
    to_hf(ours, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = data[:2, :10]
    new = 14  # 24 tokens > k=8: generation runs sparse
    theirs = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                               min_new_tokens=new)
    mine = greedy_generate(ours, prompt, new)
    print(f"\nexported + reloaded: greedy tokens {theirs[0, 10:].tolist()} (ours equal: {torch.equal(theirs, mine)})")
    assert torch.equal(theirs, mine)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                         "original_max_position_embeddings": 16}), "rope_type"),
    (lambda c: c.update(indexer_types=["shared", "full"]), "indexer_types"),
])
def test_unmappable_configs_are_refused_in_one_line(change, message):
    fields = tiny_hf("glm_moe_dsa").config.to_dict()
    change(fields)
    for key in ("model_type", "transformers_version", "architectures", "head_dim", "qk_head_dim", "layer_types"):
        fields.pop(key, None)
    with pytest.raises(ValueError, match=message) as info:
        from_hf(AutoModelForCausalLM.from_config(GlmMoeDsaConfig(**fields)))
    assert "\n" not in str(info.value)


def test_unexportable_models_are_refused_in_one_line():
    from conftest import tiny_model_config
    with pytest.raises(ValueError, match="MLA") as info:
        to_hf(SparseAttentionMoELLM(tiny_model_config()))
    assert "\n" not in str(info.value)
    ours = from_hf(tiny_hf("deepseek_v32"))
    ours.cfg.indexer_precision = "int8"
    with pytest.raises(ValueError, match="indexer_precision"):
        to_hf(ours)


def test_imported_model_indexer_warmup_beats_random_and_its_start(corpus, tmp_path):
    """Tiny random DeepSeek-V3.2 (init std 0.2, so its attention is not uniform) saved to a folder -> warm-up of its
    indexers here on the embedded corpus (L=32, k=8, 40 steps) -> export -> reload in transformers."""
    from config import TrainConfig
    from dsa_lab.training.data import build_windows
    from dsa_lab.experiments.hf_warmup import warmup_hf_indexers
    hf = tiny_hf("deepseek_v32", seed=1, vocab_size=corpus.tokenizer.vocab_size, index_topk=8, initializer_range=0.2)
    hf.save_pretrained(tmp_path / "source")
    tcfg = TrainConfig(batch_size=8, warmup_steps=40, warmup_lr=3e-2, eval_windows=16)
    model, report = warmup_hf_indexers(tmp_path / "source", build_windows(corpus, L), tcfg, torch.device("cpu"))
    print(f"\nwarm-up of an imported model's indexers: recall {report['recall_before']:.3f} -> "
          f"{report['recall_after']:.3f} (random {report['random_recall']:.3f}, local {report['local_recall']:.3f}); "
          f"KL {report['indexer_kl'][0]:.3f} -> {report['indexer_kl'][-1]:.3f}")
    assert report["recall_after"] > report["random_recall"] + 0.01
    assert report["recall_after"] > report["recall_before"] + 0.01
    to_hf(model, tmp_path / "warmed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "warmed", dtype=torch.float32).eval()
    exported = to_hf(model).state_dict()
    assert all(torch.equal(t, exported[k]) for k, t in reloaded.state_dict().items())
    ids = build_windows(corpus, L).val[:2, :L]
    ref, hf_topk = indexer_topk(reloaded, ids)
    with torch.no_grad():
        logits, aux = model(ids, AttentionMode(), return_aux=True)
    rows = comparable_rows(aux.layers, hf_topk, k=8)  # 2 indexer heads: score ties at 0 are common here
    print(f"reloaded: {int(rows.sum())}/{rows.numel()} rows unambiguous, max rel err {rel_err(logits[rows], ref[rows]):.2e}")
    assert rel_err(logits[rows], ref[rows]) <= 1e-5


def test_cli_init_from_hf_warms_up_reports_and_exports(corpus, tmp_path, monkeypatch, capsys):
    """run_experiment.py --init-from-hf DIR --export-hf OUT: warm-up + sparse steps on our data, a JSON report,
    a folder transformers loads; --export-hf alone is a one-line error."""
    import json

    import run_experiment
    monkeypatch.setattr("dsa_lab.training.data.load_corpus", lambda cfg: corpus)
    hf = tiny_hf("deepseek_v32", seed=1, vocab_size=corpus.tokenizer.vocab_size, index_topk=8)
    hf.save_pretrained(tmp_path / "source")
    argv = ["--init-from-hf", str(tmp_path / "source"), "--tokenizer", "bpe", "--preset", "quick", "--seq-lens", "32",
            "--top-k", "8", "--warmup-steps", "3", "--steps", "2", "--out", str(tmp_path / "out"),
            "--export-hf", str(tmp_path / "exported")]
    assert run_experiment.main(argv) == 0
    report = json.loads((tmp_path / "out" / "hf_warmup.json").read_text())
    assert report["sparse_top_k"] == 8 and len(report["indexer_kl"]) == 3 and "sparse" in report
    assert "indexer recall" in capsys.readouterr().out
    AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert run_experiment.main(["--export-hf", str(tmp_path / "x")]) == 2
    assert "needs --init-from-hf" in capsys.readouterr().err
