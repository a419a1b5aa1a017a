"""The retrieval levers on the lab's own models (issue 30): ModelConfig's structure_window / structure_sinks /
warmup_target give a DSA layer the retrofit's structured selection and lever losses (dsa_lab/interop/levers.py), and
the long-context study trains them as its `dsa_levers` model."""
import dataclasses

import pytest
import torch

from config import ModelConfig, fingerprint_fields
from dsa_lab.experiments import long_context
from dsa_lab.interop import levers
from models import SparseAttentionMoELLM, build_objective
from sparse_attention import (AttentionMode, LightningIndexer, check_selection, future_mask, index_scores,
                              indexer_kl_dense, indexer_kl_sparse, selection_mask)
from selection_checks import single_thread  # noqa: F401  (autouse fixture: one torch thread)
from tests.test_long_context import TINY

K, SINKS, WINDOW, L = 12, 2, 5, 40
TOY = dict(vocab_size=64, d_model=32, n_heads=2, n_layers=2, d_ff=64, num_experts=1, expert_top_k=1,
           num_shared_experts=0, indexer_heads=2, indexer_dim=16, indexer_rope_dim=8, sparse_top_k=K, max_seq_len=L)


def toy_layer(**levers_):
    """The first DSA layer of a toy sparse model with the given lever fields, indexer weights moved off their init."""
    torch.manual_seed(0)
    model = SparseAttentionMoELLM(ModelConfig(**TOY, **levers_))
    layer = model.blocks[0].attn
    with torch.no_grad():
        for p in layer.indexer.parameters():
            p.add_(torch.randn_like(p))
    return layer


def test_structured_selector_on_full_scores_is_the_chunked_structured_selection():
    """The selector (full scores, the reference path) and levers.structured_selection (chunked, kept keys excluded in
    the fused pass) pick the same slots in the same order from one indexer: the twin the retrofit already tests
    against its reference."""
    torch.manual_seed(1)
    indexer = LightningIndexer(32, 2, 16, 8, L)
    x = torch.randn(2, L, 32)
    got = levers.StructuredTopKSelector(K, SINKS, WINDOW)(index_scores(*indexer.project(x)))
    want = levers.structured_selection(indexer, x, K, SINKS, WINDOW)
    assert torch.equal(got[0], want.selected_idx) and torch.equal(got[1], want.valid)
    check_selection(*got, L)


def test_a_structured_layer_keeps_sinks_and_window_and_never_a_future_key():
    layer = toy_layer(structure_window=WINDOW, structure_sinks=SINKS)
    x = torch.randn(2, L, 32)
    _, aux = layer(x, AttentionMode(sparse=True))
    valid = aux.selected_idx >= 0
    check_selection(aux.selected_idx, valid, L)
    mask = selection_mask(aux.selected_idx, valid, L)  # (B, L, L)
    kept = levers.kept_keys(torch.arange(L), L, SINKS, WINDOW) & ~future_mask(L, L, "cpu")
    assert (mask | ~kept).all() and not (mask & future_mask(L, L, "cpu")).any()
    assert mask[:, K:].sum(-1).eq(K).all()


@pytest.mark.parametrize("fields", [dict(warmup_target="head_max"),
                                    dict(structure_window=WINDOW, structure_sinks=SINKS, warmup_target="head_max"),
                                    dict(structure_window=WINDOW, structure_sinks=SINKS),
                                    dict(structure_window=WINDOW, structure_sinks=SINKS, warmup_row_weight=0.5),
                                    dict(warmup_rank_weight=0.1),
                                    dict(structure_window=WINDOW, structure_sinks=SINKS, warmup_row_weight=1.0,
                                         warmup_rank_weight=0.3)])
def test_the_layers_warm_up_loss_is_the_levers_loss_on_its_own_attention(fields):
    """The dense-mode indexer loss equals levers.warmup_loss on levers.head_target of the layer's own attention (not
    the paper's KL, which it differs from here); at the defaults there is no objective and the paper's KL stays."""
    layer = toy_layer(**fields)
    x = torch.randn(2, L, 32)
    _, aux = layer(x, AttentionMode(sparse=False, indexer_loss="dense"))
    _, probs = layer.attend_dense_probs(layer.project(x))  # (B, H, L, L)
    scores = layer.indexer(x)
    loss = levers.WarmupLoss(SINKS if "structure_sinks" in fields else 4, fields.get("structure_window", 0),
                             row_weight=fields.get("warmup_row_weight", 0.0),
                             rank_weight=fields.get("warmup_rank_weight", 0.0))
    want = levers.warmup_loss(levers.head_target(probs, fields.get("warmup_target", "sum"), 1), scores, None, loss)
    torch.testing.assert_close(aux.indexer_loss, want)
    assert abs(aux.indexer_loss.item() - indexer_kl_dense(probs, scores).item()) > 1e-4
    assert build_objective(ModelConfig(**TOY)) is None


def test_the_structured_layers_stage2_kl_covers_the_indexers_slots_only():
    """Sparse mode: the KL over the selected slots outside the always-kept keys (an independent mask from kept_keys),
    with gradients into the indexer."""
    layer = toy_layer(structure_window=WINDOW, structure_sinks=SINKS)
    x = torch.randn(2, L, 32)
    _, aux = layer(x, AttentionMode(sparse=True, indexer_loss="sparse"))
    aux.indexer_loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in layer.indexer.parameters())
    idx = aux.selected_idx
    kept = levers.kept_keys(torch.arange(L), L, SINKS, WINDOW)[None].expand(2, L, L).gather(-1, idx.clamp(min=0))
    slots = (idx >= 0) & ~kept
    assert slots[:, K:].sum(-1).eq(K - SINKS - WINDOW).all()
    heads = layer.project(x)
    _, probs = layer.attend_dense_probs(heads)  # (B, H, L, L): the selected slots' probabilities renormalised
    sel = probs.gather(-1, idx.clamp(min=0)[:, None].expand(-1, probs.shape[1], -1, -1)) * (idx >= 0)[:, None]
    sel = sel / sel.sum(-1, keepdim=True)
    scores = layer.indexer(x).gather(-1, idx.clamp(min=0))
    want = indexer_kl_sparse(sel, scores.masked_fill(~slots, float("-inf")), slots)
    torch.testing.assert_close(aux.indexer_loss, want, rtol=1e-4, atol=1e-6)


def test_lever_fields_are_validated_and_left_out_of_fingerprints_at_their_defaults():
    base = ModelConfig(**TOY)
    assert not {"structure_window", "structure_sinks", "warmup_target", "warmup_row_weight",
                "warmup_rank_weight"} & set(fingerprint_fields(base))
    assert fingerprint_fields(dataclasses.replace(base, warmup_target="head_max"))["warmup_target"] == "head_max"
    for bad, match in ((dict(structure_window=K), "no slot"), (dict(warmup_target="mean"), "warmup_target"),
                       (dict(structure_window=4, selection_source="oracle"), "plain indexer"),
                       (dict(structure_window=4, attention_backend="block"), "plain indexer"),
                       (dict(structure_window=-1), ">= 0"), (dict(warmup_row_weight=1.5), "warmup_row_weight"),
                       (dict(warmup_rank_weight=-0.1), "warmup_rank_weight")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(base, **bad).validate()


def test_long_context_trains_dsa_levers_and_pairs_it_with_dsa_and_the_oracle(tmp_path):
    """MQAR end to end with dsa_levers (structure + head_max): its warm-up ran, it is compared with dense, the oracle
    and paper DSA (paired, in the Holm family), its runs are fingerprinted by the levers, and a lever the models cannot
    take is refused before any work."""
    tiny = {**TINY, "seq_lens": [48], "top_k": 24, "levers": ["structure", "head_max"]}
    models = ["dense", "dsa", "oracle", "dsa_levers"]
    summary = long_context.run_long_context("quick", ["mqar"], models, tiny, tmp_path, False)
    entry = summary["results"]["mqar"]["48"]
    lev, dsa = (entry[m]["accuracy"]["per_seed"] for m in ("dsa_levers", "dsa"))
    assert entry["dsa_levers"]["delta_accuracy_vs_dsa"]["per_seed"] == pytest.approx([a - b for a, b in zip(lev, dsa)])
    assert "delta_accuracy_vs_oracle" in entry["dsa_levers"] and entry["dsa_levers"]["warmup_recall_after"]
    pairs = {(t["model"], t["vs"]) for t in summary["significance"]["mqar"]["tests"]}
    assert pairs == {("dsa", "dense"), ("oracle", "dense"), ("dsa_levers", "dense"), ("dsa", "oracle"),
                     ("dsa_levers", "oracle"), ("dsa_levers", "dsa")}
    report = (tmp_path / "REPORT.md").read_text()
    assert "| mqar | 48 | dsa_levers | accuracy |" in report and "`dsa_levers` = dsa with the retrieval levers" in report
    assert summary["levers"] == {"structure_window": 16, "warmup_target": "head_max"}
    settings = long_context.task_settings("quick", "mqar", tiny)
    cfg = long_context.model_config(settings.model, "dsa_levers", settings.levers)
    assert (cfg.structure_window, cfg.warmup_target) == (16, "head_max")
    with pytest.raises(ValueError, match="different config"):  # other levers: other runs
        long_context.run_long_context("quick", ["mqar"], models, {**tiny, "levers": ["structure"]}, tmp_path, False)
    with pytest.raises(ValueError, match="no slot"):
        long_context.run_long_context("quick", ["mqar"], models, {**tiny, "top_k": 8}, tmp_path / "k8", False)
    wide = long_context.task_settings("quick", "mqar", {**tiny, "levers": ["heads16"]})  # capacity: dsa_levers only
    assert long_context.model_config(wide.model, "dsa_levers", wide.levers).indexer_heads == 16
    eight = long_context.task_settings("quick", "mqar", {**tiny, "levers": ["heads8"]})
    assert long_context.model_config(eight.model, "dsa_levers", eight.levers).indexer_heads == 8
    dims = long_context.task_settings("quick", "mqar", {**tiny, "levers": ["heads16", "dim64"]})
    cfg = long_context.model_config(dims.model, "dsa_levers", dims.levers)
    assert (cfg.indexer_heads, cfg.indexer_dim, cfg.indexer_rope_dim) == (16, 64, TINY["indexer_rope_dim"])
    assert long_context.model_config(wide.model, "dsa", wide.levers).indexer_heads == TINY["indexer_heads"]
    default = {n: long_context.task_settings("quick", n, {k: v for k, v in tiny.items() if k != "levers"}).levers
               for n in ("lm", "mqar")}  # without --levers: each task's own winner
    assert default == {"lm": {"structure_window": 16, "warmup_target": "head_max"},
                       "mqar": {"indexer_heads": 16, "indexer_dim": 64}}
    with pytest.raises(ValueError, match="not a lever"):
        long_context.task_settings("quick", "mqar", {**tiny, "levers": ["prev_key"]})
