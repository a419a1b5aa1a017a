"""Adaptive sparsity: the controller's components are causal and match loop references, k stays in its bounds,
the models equal dense at k >= L and the ratio strategy at a fixed share, budget matching hits its target, the
shared warm-up does not depend on the selector, and the runner runs end to end, resumes and refuses bad input."""
import dataclasses
import json
import math

import pytest
import torch

from dsa_lab.experiments import adaptive_sparsity
import run_experiment
from models import AdaptiveMoELLM, FixedSparseMoELLM
from config import TrainConfig
from conftest import record_stages, tiny_model_config
from dsa_lab.training.data import BatchStream
from models import ClassicAttentionMoELLM, SparseAttentionMoELLM
from selection_checks import assert_selection_contract
from selection_checks import single_thread  # noqa: F401  (autouse fixture: one torch thread)
from sparse_attention import AttentionMode, future_mask, selection_mask
from adaptive_selection import (AdaptiveKCalculator, AdaptiveKConfig, AttentionEntropyEstimator,
                              ContentComplexityAnalyzer, DynamicSparsityController, mean_keys_of_share,
                              previous_occurrences, ratio_for_mean_keys)
from dsa_lab.training.train import run_stage, sparse_from_state, warmup_stage

L, T, V = 40, 17, 64
MLA = dict(attention_type="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
           v_head_dim=6)


def _ids(B=3, seed=0):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def _scores(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, L, L, generator=g) * torch.rand(B, L, 1, generator=g) * 4  # rows of varied sharpness
    return scores.masked_fill(future_mask(L, L, "cpu"), float("-inf"))


def _changed_after_t(ids, scores, hidden):
    """Copies whose positions after T are replaced (tokens, index-score rows and columns, hidden states)."""
    ids2, scores2, hidden2 = ids.clone(), scores.clone(), hidden.clone()
    ids2[:, T + 1:] = (ids2[:, T + 1:] + 1 + torch.arange(L - T - 1)) % V
    scores2[:, T + 1:] = torch.randn(scores.shape[0], L - T - 1, L) * 9
    scores2 = scores2.masked_fill(future_mask(L, L, "cpu"), float("-inf"))
    hidden2[:, T + 1:] = torch.randn(hidden.shape[0], L - T - 1, hidden.shape[-1]) * 5
    return ids2, scores2, hidden2


def test_previous_occurrences_and_hidden_variance_match_loops():
    ids = torch.randint(0, 7, (2, L))
    expected = torch.tensor([[int((ids[b, :t] == ids[b, t]).sum()) for t in range(L)] for b in range(2)])
    assert torch.equal(previous_occurrences(ids), expected)
    hidden = torch.randn(2, L, 8, dtype=torch.float64) * torch.linspace(0.1, 3, 8, dtype=torch.float64)
    got = ContentComplexityAnalyzer.hidden_variance(hidden)
    for t in (0, 1, 9, L - 1):
        prefix = hidden[:, : t + 1]
        var = prefix.var(1, unbiased=False).mean(-1) / prefix.pow(2).mean((1, 2))
        torch.testing.assert_close(got[:, t], var.float(), atol=1e-5, rtol=1e-4)
    assert (got[:, 0] == 0).all()


def test_unigram_surprise_and_diversity_by_hand():
    analyzer = ContentComplexityAnalyzer(V, AdaptiveKConfig(smoothing=0.5))
    ids = torch.tensor([[3, 3, 5, 3]])
    assert torch.allclose(analyzer.token_diversity(ids), torch.tensor([[1, 1 / 2, 2 / 3, 2 / 4]]))
    nats, most = analyzer.surprise_nats(ids)
    counts, seen = torch.tensor([0.0, 1, 0, 2]), torch.arange(4.0)
    torch.testing.assert_close(nats[0], -torch.log((counts + 0.5) / (seen + 0.5 * V)))
    torch.testing.assert_close(most, torch.log((seen + 0.5 * V) / 0.5))
    repeated, varied = torch.zeros(1, L, dtype=torch.long), torch.arange(L)[None] % V
    assert analyzer.perplexity(repeated)[0, -1] < analyzer.perplexity(varied)[0, -1] / 5
    logits = torch.randn(1, 4, V)
    nats, _ = analyzer.surprise_nats(ids, logits)
    assert nats[0, 0] == pytest.approx(math.log(V))
    assert nats[0, 2] == pytest.approx(-float(logits[0, 1].log_softmax(-1)[5]), rel=1e-5)
    with pytest.raises(ValueError, match="logits"):
        analyzer.surprise(ids, torch.randn(1, 4, V + 1))


def test_entropy_estimate_is_the_effective_share_of_the_prefix():
    """A row whose index scores spread evenly over m keys (the rest -inf-like) covers m / (t+1) of the prefix."""
    scores = torch.full((1, L, L), -1e4).masked_fill(future_mask(L, L, "cpu"), float("-inf"))
    t = torch.arange(L)
    m = (t + 1 + 3) // 4  # a quarter of each prefix, rounded up
    scores[0][torch.arange(L)[None, :] > (t - m)[:, None]] = 0.0  # the last m keys of row t
    scores = scores.masked_fill(future_mask(L, L, "cpu"), float("-inf"))
    share = AttentionEntropyEstimator()(scores)[0]
    torch.testing.assert_close(share, m / (t + 1.0), atol=1e-4, rtol=1e-4)
    smooth = AttentionEntropyEstimator(smooth=True)(scores)[0]
    torch.testing.assert_close(smooth, (m / (t + 1.0)).cumsum(0) / (t + 1), atol=1e-4, rtol=1e-4)


def test_every_component_is_causal():
    """Changing tokens, index scores and hidden states after position T changes nothing at positions <= T."""
    ids, scores, hidden = _ids(), _scores(), torch.randn(3, L, 16)
    ids2, scores2, hidden2 = _changed_after_t(ids, scores, hidden)
    analyzer = ContentComplexityAnalyzer(V)
    logits = torch.randn(3, L, V)
    logits2 = logits.clone()
    logits2[:, T:] = torch.randn(3, L - T, V)  # logits at T predict T+1: they may change too
    pairs = [(analyzer.token_features(ids), analyzer.token_features(ids2)),
             (analyzer.perplexity(ids, logits), analyzer.perplexity(ids2, logits2)),
             (analyzer.hidden_variance(hidden), analyzer.hidden_variance(hidden2)),
             (AttentionEntropyEstimator()(scores), AttentionEntropyEstimator()(scores2)),
             (AttentionEntropyEstimator(smooth=True)(scores), AttentionEntropyEstimator(smooth=True)(scores2))]
    controller = DynamicSparsityController(AdaptiveKConfig(k_min=2), analyzer)
    ks, selections = [], []
    for s, i, h in ((scores, ids, hidden), (scores2, ids2, hidden2)):
        tokens = analyzer.token_features(i)
        ks.append(controller.decide(s, tokens, h).k)
        selections.append(selection_mask(*controller(s, tokens=tokens, hidden=h), L))  # (B, L, L): row t = S_t
    pairs += [ks, selections]
    for before, after in pairs:
        assert torch.equal(before[:, : T + 1], after[:, : T + 1])
        assert not torch.equal(before[:, T + 1:], after[:, T + 1:])  # the test can fail


@pytest.mark.parametrize("config", [AdaptiveKConfig(), AdaptiveKConfig(k_min=1, k_max=5),
                                    AdaptiveKConfig(min_fraction=0.05, max_fraction=1.0, k_min=3, length_exponent=0.5)])
def test_k_stays_within_its_bounds_and_follows_demand(config):
    calc = AdaptiveKCalculator(config)
    t = torch.arange(L)
    prefix = (t + 1).float()
    for level in (0.0, 0.3, 1.0):
        c = torch.full((2, L), level)
        k = calc(c, c)
        upper = t + 1 if config.k_max is None else torch.clamp(t + 1, max=config.k_max)
        assert (k <= t + 1).all() and (k <= upper).all() and (k >= torch.clamp(t + 1, max=config.k_min)).all()
        share = config.min_fraction + (config.max_fraction - config.min_fraction) * level
        expected = torch.ceil(share * prefix ** config.length_exponent - 1e-6).clamp_min(config.k_min)
        expected = torch.minimum(expected if config.k_max is None else expected.clamp_max(config.k_max), prefix)
        assert torch.equal(k[0], expected.long())
    assert (calc(torch.ones(1, L), torch.ones(1, L)) >= calc(torch.zeros(1, L), torch.zeros(1, L))).all()


def test_controller_keeps_the_selection_contract_and_varies_k_with_the_content():
    """k_t valid slots per row; a flat-score, varied-token sequence gets more keys than a peaked, repetitive one."""
    analyzer = ContentComplexityAnalyzer(V)
    controller = DynamicSparsityController(AdaptiveKConfig(k_min=1), analyzer, layer=3)
    ids = torch.stack([torch.zeros(L, dtype=torch.long), torch.arange(L) % V])
    scores = torch.zeros(2, L, L)
    scores[0, torch.arange(L), torch.arange(L)] = 30.0  # peaked rows: all index mass on the current token
    scores = scores.masked_fill(future_mask(L, L, "cpu"), float("-inf"))
    hidden = torch.stack([torch.ones(L, 8), torch.randn(L, 8)])
    with pytest.raises(ValueError, match="token features"):
        controller(scores)
    tokens = analyzer.token_features(ids)
    with controller.recording() as log:
        idx, valid = controller(scores, tokens=tokens, hidden=hidden)
    k = controller.decide(scores, tokens, hidden).k
    assert_selection_contract(idx, valid)
    assert torch.equal(valid.sum(-1), k)
    assert (k[0, 5:] < k[1, 5:]).all() and k[0, -1] <= math.ceil(0.15 * L) < k[1, -1]
    assert log[0]["layer"] == 3 and len(log[0]["k_mean"]) == 2 and log[0]["k_mean"][0] < log[0]["k_mean"][1]
    assert controller.log is None  # the recording ends with its block


def test_each_adaptive_layer_passes_its_controller_the_token_features_and_its_own_input():
    """The model's selection of layer i is the controller's on (that layer's index scores, the token features of
    the ids, that layer's input): a layer handed another layer's hidden states, or no token features, selects
    otherwise."""
    torch.manual_seed(0)
    model = AdaptiveMoELLM(tiny_model_config(), AdaptiveKConfig(k_min=2))
    ids = torch.randint(0, 64, (2, 32))
    _, aux = model(ids, AttentionMode(sparse=True), return_aux=True)
    tokens = model.analyzer.token_features(ids)
    x = model.token_emb(ids)
    inputs = []
    for block in model.blocks:
        inputs.append(block.attn_norm(x).detach())
        x = block(x, AttentionMode(sparse=True), tokens=tokens)[0]
    for layer, attention in enumerate(model.attentions):
        scores = attention.indexer(inputs[layer])
        expected, _ = attention.selector(scores, tokens=tokens, hidden=inputs[layer])
        assert torch.equal(aux.layers[layer].selected_idx, expected)
        other, _ = attention.selector(scores, tokens=tokens, hidden=inputs[1 - layer])
        assert not torch.equal(other, expected)  # the hidden states matter here: the test can fail
    with pytest.raises(ValueError, match="token features"):
        model.attentions[0](inputs[0], AttentionMode(sparse=True))  # called without the model's token features


@pytest.mark.parametrize("layout", [{}, MLA])
def test_adaptive_at_k_min_L_and_full_share_equal_dense_and_defaults_do_not(layout):
    cfg = tiny_model_config(max_seq_len=L, attention_backend="gather", **layout)
    torch.manual_seed(0)
    classic = ClassicAttentionMoELLM(cfg).eval()
    ids = _ids(2)
    with torch.no_grad():
        dense = classic(ids)
        for build in (lambda c: AdaptiveMoELLM(c, AdaptiveKConfig(k_min=L)), lambda c: FixedSparseMoELLM(c, 1.0)):
            model = sparse_from_state(cfg, classic.state_dict(), 0, build).eval()
            torch.testing.assert_close(model(ids), dense, atol=1e-5, rtol=1e-5)
        for build in (lambda c: AdaptiveMoELLM(c, AdaptiveKConfig()), lambda c: FixedSparseMoELLM(c, 0.25)):
            model = sparse_from_state(cfg, classic.state_dict(), 0, build).eval()
            assert not torch.allclose(model(ids), dense, atol=1e-4)


def test_fixed_share_is_the_ratio_k_strategy_and_adaptive_differs_from_every_fixed_share():
    cfg = tiny_model_config(max_seq_len=L)
    torch.manual_seed(0)
    ratio = SparseAttentionMoELLM(dataclasses.replace(cfg, k_strategy="ratio_25")).eval()
    fixed = FixedSparseMoELLM(cfg, 0.25).eval()
    fixed.load_state_dict(ratio.state_dict())
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(fixed(ids), ratio(ids), atol=0, rtol=0)
        adaptive = AdaptiveMoELLM(cfg).eval()
        adaptive.load_state_dict(ratio.state_dict())
        _, aux = adaptive(ids, return_aux=True)
        k = (aux.layers[0].selected_idx >= 0).sum(-1)
    prefix = torch.arange(1, L + 1)
    for share in (0.25, 0.5, 0.75):
        assert not torch.equal(k, torch.ceil(share * prefix - 1e-6).long().expand_as(k))
    assert not torch.equal(k[0], k[1])  # per sequence


def test_budget_matching_arithmetic():
    for n, r in ((40, 0.3), (256, 0.25), (1024, 0.61)):
        by_loop = sum(min(max(math.ceil(r * (t + 1) - 1e-6), 1), t + 1) for t in range(n)) / n
        assert mean_keys_of_share(n, r) == pytest.approx(by_loop)
    for n in (40, 256, 1024):
        for target in (1.0, 3.7, n / 7, n / 3, (n + 1) / 2):
            share = ratio_for_mean_keys(n, target)
            assert 0 < share <= 1
            assert mean_keys_of_share(n, share) == pytest.approx(target, rel=0.01, abs=0.5 / n * 4)
    for bad in (0.5, (L + 1) / 2 + 1, float("nan")):
        with pytest.raises(ValueError, match="cannot be matched"):
            ratio_for_mean_keys(L, bad)
    cfg = tiny_model_config(max_seq_len=L)
    model = FixedSparseMoELLM(cfg, mean_keys=11.0).eval()
    with torch.no_grad():
        _, aux = model(_ids(2), return_aux=True)
    assert float((aux.layers[0].selected_idx >= 0).sum(-1).float().mean()) == pytest.approx(11.0, rel=0.02)
    with pytest.raises(ValueError, match="exactly one"):
        FixedSparseMoELLM(cfg)


def test_the_shared_warm_up_does_not_depend_on_the_selector():
    """The runner warms the indexers up once per (L, seed): with dense attention and the dense KL the selector
    only shapes recall figures, so two selectors end at identical indexer weights."""
    cfg = tiny_model_config(max_seq_len=24, n_layers=1)
    tcfg = TrainConfig(batch_size=2, warmup_steps=3, eval_windows=2, profile_steps=1)
    torch.manual_seed(0)
    branch = ClassicAttentionMoELLM(cfg).state_dict()
    windows = torch.randint(0, 64, (8, 25), generator=torch.Generator().manual_seed(3))
    states = []
    for build in (lambda c: FixedSparseMoELLM(c, 0.5), lambda c: AdaptiveMoELLM(c, AdaptiveKConfig(k_min=1))):
        model = sparse_from_state(cfg, branch, 0, build)
        run_stage(model, warmup_stage(tcfg), BatchStream(windows, 2, 7), windows[:2], tcfg, torch.device("cpu"), "w")
        states.append(model.state_dict())
    start = sparse_from_state(cfg, branch, 0, lambda c: FixedSparseMoELLM(c, 0.5)).state_dict()
    assert any(not torch.equal(states[0][k], start[k]) for k in start if ".indexer." in k)  # the warm-up trained it
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


TINY = dict(seq_lens=[32], seeds=[1, 2], steps=2, warmup_steps=2, dense_steps=2, batch_size=2, eval_every=1,
            eval_windows=2, d_model=32, n_heads=2, n_layers=1, d_ff=32, indexer_heads=2, indexer_dim=8,
            indexer_rope_dim=4, profile_steps=1, k_min=2)


def test_runner_end_to_end_resumes_and_refuses_a_changed_config(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(adaptive_sparsity, "load_corpus", lambda cfg: corpus)
    models = list(adaptive_sparsity.MODELS)
    summary = adaptive_sparsity.run_adaptive_sparsity("quick", models, dict(TINY), tmp_path, False)
    assert summary["experiment"] == "adaptive_sparsity" and summary["models"] == models
    entry = summary["results"]["32"]
    recall = ("indexer_recall", "random_recall", "local_recall")
    for name in models:
        paired = ("delta_val_loss_vs_dense", "delta_val_loss_vs_matched", "time_ratio_vs_dense", "time_ratio_vs_matched")
        for metric in adaptive_sparsity.METRICS + paired:  # the documented keys
            if name == "dense" and metric in recall:
                assert metric not in entry[name]
                continue
            stat = entry[name][metric]
            assert len(stat["per_seed"]) == 2, (name, metric)
            if metric == "step_peak_memory_mb":  # on CPU measured for the first seed only (the profiler is slow)
                assert stat["per_seed"][0] > 0 and stat["per_seed"][1] is None
            elif metric != "peak_memory_mb":  # that one is CUDA's allocator peak (NaN on CPU)
                assert stat["ci95"][0] is not None, (name, metric)
    assert entry["dense"]["delta_val_loss_vs_dense"]["mean"] == 0 and entry["matched"]["time_ratio_vs_matched"]["mean"] == 1
    a, m = entry["adaptive"], entry["matched"]
    assert len(a["k_curve"]["steps"]) == TINY["steps"] and len(a["k_vs_complexity"]) == 2 * TINY["eval_windows"]
    assert len(a["k_by_layer"]) == 1 and a["indexer_recall"]["mean"] is not None
    assert m["target_mean_keys"]["per_seed"] == a["budget_keys"]["per_seed"]
    assert m["k_mean"]["mean"] == pytest.approx(a["budget_keys"]["mean"], rel=0.05)  # the budget is matched
    assert entry["fixed25"]["k_mean"]["mean"] < entry["fixed75"]["k_mean"]["mean"] < entry["dense"]["k_mean"]["mean"]
    sig = summary["significance"]
    assert sig["n_tests"] == 2 and {t["vs"] for t in sig["tests"]} == {"best_fixed", "matched"}
    assert all(t["p_holm"] >= t["p"] for t in sig["tests"])
    assert entry["warmup"]["recall_after"]["mean"] is not None
    for name in ("summary.json", "adaptive_sparsity.png", "REPORT.md", "records/L32/seed1/branch.pt",
                 "records/L32/seed1/warmup.pt", "records/L32/seed2/matched.json"):
        assert (tmp_path / name).exists(), name
    report = (tmp_path / "REPORT.md").read_text()
    assert "## Findings" in report and "Hypothesis at this length" in report and "Holm" in report
    assert "| 32 | 2 | 2 | step_cap |" in report  # the shared warm-up of (L, seed): steps used, why it ended
    # resume: every record is read back, nothing trains (training would raise here)
    monkeypatch.setattr(adaptive_sparsity, "train_model_record",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = adaptive_sparsity.run_adaptive_sparsity("quick", models, dict(TINY), tmp_path, False)
    assert again["results"] == json.loads((tmp_path / "summary.json").read_text())["results"]
    with pytest.raises(ValueError, match="different config"):
        adaptive_sparsity.run_adaptive_sparsity("quick", models, {**TINY, "max_fraction": 0.5}, tmp_path, False)
    # another machine (device name in the key) is a different config too: its runs are never read back here
    from dsa_lab.experiments import skeleton as experiment
    monkeypatch.setattr(experiment, "run_fingerprint", lambda device, dtype="fp32": {"device": "cpu",
                                                                                    "device_name": "other", "torch": "x"})
    with pytest.raises(ValueError, match="different config"):
        adaptive_sparsity.run_adaptive_sparsity("quick", models, dict(TINY), tmp_path, False)




def test_every_model_starts_from_the_branch_point_and_sees_the_same_batches(tmp_path, corpus, monkeypatch):
    """Recorded inside the real runner: dense's stage 2 starts from the branch point, every sparse model's from
    the one shared warm-up (which moved only the indexers away from the branch point), and every model draws the
    same batches in the same order."""
    monkeypatch.setattr(adaptive_sparsity, "load_corpus", lambda cfg: corpus)
    stages = record_stages(monkeypatch, adaptive_sparsity)
    tiny = {**TINY, "seeds": [1], "steps": 3, "eval_every": 3}
    adaptive_sparsity.run_adaptive_sparsity("quick", list(adaptive_sparsity.MODELS), tiny, tmp_path, False)
    folder = tmp_path / "records" / "L32" / "seed1"
    branch, warm = (torch.load(folder / name, weights_only=True) for name in ("branch.pt", "warmup.pt"))
    assert [n for n in branch if not torch.equal(branch[n], warm[n])] == [], "the warm-up moved main-model state"
    (warmup,) = [r for r in stages if r["stage"] == "warmup"]  # one warm-up per (L, seed), shared
    assert any(not torch.equal(warm[n], t) for n, t in warmup["start"].items() if ".indexer." in n)  # it trained
    second = {r["desc"].split()[-1]: r for r in stages if r["desc"].startswith("L=32 seed=1 ")
              and "warm-up" not in r["desc"]}
    assert sorted(second) == sorted(adaptive_sparsity.MODELS)
    for name, record in second.items():
        start, what = (branch, "the branch point") if name == "dense" else (warm, "the shared warm-up")
        moved = [n for n in start if not torch.equal(record["start"][n], start[n])]
        assert not moved, f"{name} starts stage 2 away from {what}: {moved}"
        assert len(record["batches"]) == tiny["steps"]
        assert all(torch.equal(a, b) for a, b in zip(record["batches"], second["dense"]["batches"])), \
            f"{name} draws other batches than dense"


def test_each_seeds_matched_model_gets_its_own_seeds_adaptive_budget(tmp_path, corpus, monkeypatch):
    """Both tiny seeds measure the same adaptive mean (12.375 keys), so the adaptive budget is shifted by the seed
    here (11.375, 10.375): each seed's matched model must be given, record and run at its own seed's budget."""
    monkeypatch.setattr(adaptive_sparsity, "load_corpus", lambda cfg: corpus)
    real, given = adaptive_sparsity.train_model_record, {}

    def budget_by_seed(name, task, cfg, tcfg, branch, warm, seed, device, k_config, budget, *args, **kwargs):
        if name == "matched":
            given[seed] = budget
        record = real(name, task, cfg, tcfg, branch, warm, seed, device, k_config, budget, *args, **kwargs)
        if name == "adaptive":
            record["budget_keys"] -= seed
        return record

    monkeypatch.setattr(adaptive_sparsity, "train_model_record", budget_by_seed)
    summary = adaptive_sparsity.run_adaptive_sparsity("quick", ["adaptive", "matched"], dict(TINY), tmp_path, False)
    entry = summary["results"]["32"]
    own = entry["adaptive"]["budget_keys"]["per_seed"]
    assert own[0] != own[1], "the seeds' budgets must differ for this test to tell them apart"
    assert [given[s] for s in TINY["seeds"]] == own
    assert entry["matched"]["target_mean_keys"]["per_seed"] == own
    for k_mean, budget in zip(entry["matched"]["k_mean"]["per_seed"], own):  # each run at its own budget
        assert k_mean == pytest.approx(budget, rel=0.03)

def _holm_by_hand(pvalues: list[float]) -> list[float]:
    """Holm over the whole family, written out: the i-th smallest p (0-based) adjusted to
    min(1, max over j <= i of (m - j) * p_(j))."""
    m, order = len(pvalues), sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    for rank, i in enumerate(order):
        adjusted[i] = min(1.0, max((m - j) * pvalues[order[j]] for j in range(rank + 1)))
    return adjusted


def test_significance_is_holm_corrected_over_every_test_of_every_length():
    """Adaptive vs best fixed and vs matched at two lengths: 4 tests, each raw p the paired t-test of its per-seed
    differences, each p_holm the Holm correction of all 4 (one of them raised by the step-down's monotonicity)."""
    from dsa_lab.common.results_io import paired_t_pvalue
    seeds = [1, 2, 3]
    loss = {32: {"fixed25": [3.0, 3.1, 3.2], "fixed50": [2.9, 3.0, 3.05], "fixed75": [2.95, 3.0, 3.1],
                 "adaptive": [2.80, 2.93, 2.99], "matched": [2.85, 2.90, 3.06]},
            64: {"fixed25": [2.8, 2.9, 3.0], "fixed50": [2.7, 2.75, 2.9], "fixed75": [2.72, 2.8, 2.85],
                 "adaptive": [2.6, 2.649, 2.801], "matched": [2.65, 2.70, 2.78]}}
    models = ["fixed25", "fixed50", "fixed75", "adaptive", "matched"]
    records = {L: {n: {s: {"final": {"val_loss": v}} for s, v in zip(seeds, vals)} for n, vals in by.items()}
               for L, by in loss.items()}
    sig = adaptive_sparsity.significance_tests(records, seeds, models)
    tests = sig["tests"]
    assert [(t["L"], t["vs"], t["rival"]) for t in tests] == [(32, "best_fixed", "fixed50"), (32, "matched", "matched"),
                                                              (64, "best_fixed", "fixed50"), (64, "matched", "matched")]
    raw = [paired_t_pvalue([a - b for a, b in zip(loss[t["L"]]["adaptive"], loss[t["L"]][t["rival"]])]) for t in tests]
    assert [t["p"] for t in tests] == pytest.approx(raw, rel=1e-9)
    assert sig["n_tests"] == 4 and sig["correction"] == "holm"
    assert [t["p_holm"] for t in tests] == pytest.approx(_holm_by_hand(raw), rel=1e-9)
    assert raw[0] < 0.05 < tests[0]["p_holm"]  # significant uncorrected, not after the correction of 4 tests
    assert [t["verdict"] for t in tests] == ["n.s.", "n.s.", "better", "n.s."]

@pytest.mark.parametrize("argv, message", [
    (["--models", "dense", "fixed33"], "unknown model"),
    (["--models", "dense", "matched"], "add adaptive"),
    (["--top-k", "16"], "--top-k applies to --experiment sparse_vs_classic / indexer_optimization / long_context"),
    (["--preset", "huge"], "preset='huge' is unknown"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    code = run_experiment.main(["--experiment", "adaptive_sparsity", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_controller_settings_are_refused():
    for bad in (dict(min_fraction=0.8, max_fraction=0.5), dict(k_min=0), dict(k_min=8, k_max=4),
                dict(length_exponent=0), dict(complexity_weight=1.5), dict(diversity_weight=0, surprise_weight=0,
                                                                             variance_weight=0), dict(smoothing=0)):
        with pytest.raises(ValueError):
            AdaptiveKConfig(**bad).validate()
    with pytest.raises(ValueError, match="k_min"):
        adaptive_sparsity.experiment_settings("quick", {"k_min": -1})
    with pytest.raises(ValueError, match="cannot be combined with selection_pattern"):
        AdaptiveMoELLM(tiny_model_config(selection_pattern="strided_2"))
    with pytest.raises(ValueError, match="attention_backend='block'"):
        FixedSparseMoELLM(tiny_model_config(attention_backend="block"), 0.5)
    model = AdaptiveMoELLM(tiny_model_config())
    with pytest.raises(ValueError, match="NaN"):
        model.controllers[0](torch.full((1, 4, 4), float("nan")), tokens=torch.zeros(1, 4, 2), hidden=torch.zeros(1, 4, 8))
    assert isinstance(model(torch.zeros(1, 4, dtype=torch.long), AttentionMode(sparse=False)), torch.Tensor)
