"""dsa_lab/inference/decode.py / sample.py: cached decoding (KV cache, MLA latent cache, DSA's indexer-key cache + top-k) gives the
logits of a full recomputation token by token, selects the positions the training forward selects at that row,
generates the same tokens as the uncached reference (across a context-window slide), and sample.py runs end to
end from a checkpoint and refuses bad input with one line and exit 2."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_model_config
from dsa_lab.inference.decode import check_decodable, decode_step, generate, prefill
from models import ClassicAttentionMoELLM, SparseAttentionMoELLM
from sparse_attention import AttentionMode

MLA = dict(attention_type="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
PROMPT, NEW, TOP_K = 24, 20, 8  # the prompt alone is 3x k: every decoded row drops keys


def build(cls, dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=97, sparse_top_k=TOP_K, **overrides)
    return cls(cfg).to(dtype).eval()


def check_against_recomputation(model, atol=1e-10, batch=2, per_prefix=True):
    """Prefill PROMPT tokens, decode NEW more; each step's logits vs a full forward of ids[:, :t+1], and for the
    sparse model every layer's selected positions vs that forward's selected_idx at row t. per_prefix=False: one
    full forward over all the tokens serves every row (the same by causality, which tests elsewhere guard)."""
    ids = torch.randint(0, model.cfg.vocab_size, (batch, PROMPT + NEW), generator=torch.Generator().manual_seed(1))
    logits, state = prefill(model, ids[:, :PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids[:, :PROMPT]), rtol=0, atol=atol)
        whole = None if per_prefix else model(ids, return_aux=True)
        for t in range(PROMPT, PROMPT + NEW):
            cached = decode_step(model, state, ids[:, t:t + 1])[:, 0]
            full, aux = model(ids[:, :t + 1], return_aux=True) if per_prefix else whole
            torch.testing.assert_close(cached, full[:, t], rtol=0, atol=atol)
            if state.sparse:
                for layer, selected in zip(aux.layers, state.selected_idx):
                    K = selected.shape[-1]
                    assert K == TOP_K < t + 1  # selection really drops keys at this row
                    assert torch.equal(selected, layer.selected_idx[:, t, :K])
                    assert (layer.selected_idx[:, t, K:] == -1).all()
    return state


@pytest.mark.parametrize("cls", [ClassicAttentionMoELLM, SparseAttentionMoELLM], ids=["classic", "sparse"])
@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_cached_decoding_equals_full_recomputation_fp64(cls, attention):
    model = build(cls, **(MLA if attention == "mla" else {}))
    state = check_against_recomputation(model)
    assert state.sparse == (cls is SparseAttentionMoELLM) and state.length == PROMPT + NEW


@pytest.mark.parametrize("overrides", [dict(attention_backend="gather"), dict(attention_backend="gather", **MLA),
                                       dict(n_layers=3, shared_indexer_group=2),
                                       dict(n_layers=3, shared_indexer_group=2, **MLA)],
                         ids=["gather-mha", "gather-mla", "shared-indexer-mha", "shared-indexer-mla"])
def test_sparse_decoding_matches_other_backends_and_shared_indexers(overrides):
    """The prefill runs the model's backend (whatever backend it was trained with); layers sharing their group
    leader's indexer select from the leader's row of scores."""
    check_against_recomputation(build(SparseAttentionMoELLM, **overrides), per_prefix=False)


def test_cached_decoding_fp32_is_tight():
    for attention in ({}, MLA):
        check_against_recomputation(build(SparseAttentionMoELLM, dtype=torch.float32, **attention), atol=2e-5, batch=1,
                                    per_prefix=False)


def test_tied_index_scores_select_the_most_recent_keys():
    """Indexer queries all zero: every score ties at 0, so the tie rule alone decides (most recent first)."""
    model = build(SparseAttentionMoELLM)
    for attn in model.attentions:
        torch.nn.init.zeros_(attn.indexer.q_proj.weight)
    state = check_against_recomputation(model, batch=1, per_prefix=False)
    last = state.length - 1
    for selected in state.selected_idx:
        assert selected[0].tolist() == list(range(last, last - TOP_K, -1))


def test_sparse_decode_differs_from_dense_decode():
    """Guard against a vacuous comparison: at these sizes top-k changes the logits."""
    model = build(SparseAttentionMoELLM)
    ids = torch.randint(0, 97, (1, PROMPT + 1), generator=torch.Generator().manual_seed(2))
    out = [decode_step(model, prefill(model, ids[:, :PROMPT], sparse=sparse)[1], ids[:, PROMPT:]) for sparse in (True, False)]
    assert (out[0] - out[1]).abs().max() > 1e-4
    with torch.no_grad():
        torch.testing.assert_close(out[1][:, 0], model(ids, AttentionMode(sparse=False))[:, -1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_cached_equals_uncached_across_a_window_slide(temperature):
    model = build(SparseAttentionMoELLM, max_seq_len=32)
    prompt = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    runs = [generate(model, prompt, 30, temperature=temperature, top_k=10, generator=torch.Generator().manual_seed(4),
                     use_cache=use_cache) for use_cache in (True, False)]
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 30
    assert runs[0][1]["prefills"] == 2 and runs[0][1]["decode_steps"] == 28  # 20 + 30 > 32: one slide
    assert runs[1][1]["prefills"] == 0 and runs[1][1]["decode_steps"] == 30


def test_unsupported_selection_is_refused():
    for overrides in (dict(selection_pattern="strided_2"), dict(selection_source="local"),
                      dict(indexer_precision="int8")):
        with pytest.raises(ValueError, match="decode"):
            check_decodable(build(SparseAttentionMoELLM, **overrides), sparse=True)
    check_decodable(build(SparseAttentionMoELLM, selection_pattern="strided_2"), sparse=False)  # dense decoding is fine


# ----------------------------------------------------------------------------- sample.py
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny sparse checkpoint in train.save_checkpoint's format with a BPE trained on real text."""
    from dsa_lab.training.data import shakespeare_documents, train_bpe
    from dsa_lab.training.train import save_checkpoint
    tokenizer = train_bpe([text for _, text in shakespeare_documents()[:2]], vocab_size=300)
    torch.manual_seed(0)
    model = SparseAttentionMoELLM(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=32))
    path = tmp_path_factory.mktemp("ckpt") / "sparse_seed0.pt"
    save_checkpoint(model, path, {"seed": 0, "seq_len": 32, "tokenizer": tokenizer.spec()})
    return path


def test_sample_greedy_end_to_end(checkpoint, capsys):
    import sample
    outputs = []
    for extra in ([], ["--no-cache"]):
        assert sample.main(["--checkpoint", str(checkpoint), "--prompt", "To be, or not to be",
                            "--max-new-tokens", "40", "--temperature", "0"] + extra) == 0
        outputs.append(capsys.readouterr().out)
    text = [o.rsplit("\n---", 1)[0] for o in outputs]
    assert text[0] == text[1] and text[0].startswith("To be, or not to be") and len(text[0]) > len("To be, or not to be")
    assert "tokens/s" in outputs[0] and "DSA decode" in outputs[0] and "full recomputation" in outputs[1]


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "missing.pt", "--prompt", "x"], "does not exist"),
    (["--prompt", "", "--max-new-tokens", "3"], "prompt is empty"),
    (["--prompt", "word " * 100], "max_seq_len"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
])
def test_sample_bad_input_is_one_line_exit_2(checkpoint, capsys, args, message):
    import sample
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(checkpoint)] + args
    assert sample.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and message in err


def test_sample_cli_exit_status(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(tmp_path / "none.pt"), "--prompt", "x"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and not result.stdout


def test_benchmark_decode_mode_writes_rows(tmp_path, capsys):
    import json

    import benchmark
    assert benchmark.main(["--decode", "--decode-preset", "quick", "--seq-lens", "48", "--top-k", "8",
                           "--decode-steps", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "benchmark_decode.json").read_text())["rows"]
    assert [(r["attention_type"], r["decode"]) for r in rows] == [("mha", "dense"), ("mha", "sparse"),
                                                                   ("mla", "dense"), ("mla", "sparse")]
    for r in rows:
        assert r["cached_prefix"] == 48 and r["decode_tokens_per_s"] == pytest.approx(1e3 / r["decode_ms_per_step"])
    assert "tokens/s" in capsys.readouterr().out
