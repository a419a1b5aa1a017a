"""The retrofit's retrieval levers (dsa_lab/interop/levers.py, issue 30) on a tiny random Llama (2 layers, 4 query /
2 KV heads): each does what it says, causality holds, k >= L equals dense, the paper's recipe is unchanged."""
import json
from pathlib import Path

import pytest
import torch

from dsa_lab.experiments import retrofit as rx
from dsa_lab.interop import levers, retrofit
from dsa_lab.kernels.chunked import select_last_rows
from sparse_attention import (check_selection, future_mask, index_scores, indexer_kl_dense, indexer_kl_sparse,
                              select_top_k, selection_mask)
from tests.test_retrofit import tiny_base, tiny_folder, tiny_retrofit  # noqa: F401 (tiny_folder: a fixture)

SINKS, WINDOW, K, L = 2, 5, 12, 40


def randomised(model):
    """The model with indexer weights far from their initial ones (so top-k is not all ties)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.indexer_parameters():
            p.add_(torch.randn_like(p))
    return model


def test_structure_keeps_sinks_and_window_in_every_row_and_the_indexer_picks_the_rest():
    """Every row t >= K holds 0..sinks-1 and t-window+1..t, and its other K - sinks - window keys are the top of the
    index scores over the keys outside those (the reference: full scores, kept keys masked, select_top_k); short rows
    hold their whole prefix; the selection meets the contract. Caught: an off-by-one window (t - window), the indexer's
    top-k taken over all keys (kept keys picked twice)."""
    model = randomised(tiny_retrofit())
    x = torch.randn(2, L, 64)
    indexer = model.indexers[0]
    sel = levers.structured_selection(indexer, x, K, SINKS, WINDOW)
    assert sel.selected_idx.shape == (2, L, K)
    check_selection(sel.selected_idx, sel.valid, L)
    mask = selection_mask(sel.selected_idx, sel.valid, L)  # (B, L, L)
    t = torch.arange(L)
    kept = levers.kept_keys(t, L, SINKS, WINDOW)
    assert kept[20].nonzero().flatten().tolist() == [0, 1, 16, 17, 18, 19, 20]
    scores = index_scores(*indexer.project(x)).masked_fill(kept, float("-inf"))
    ref_idx, ref_valid = select_top_k(scores, K - SINKS - WINDOW)
    ref = selection_mask(ref_idx, ref_valid, L) | (kept & ~future_mask(L, L, "cpu"))
    assert torch.equal(mask[:, K:], ref[:, K:])
    assert torch.equal(mask[:, :K], ~future_mask(L, L, "cpu")[:K].expand(2, K, L))  # t+1 <= K: whole prefix
    assert mask[:, K:].sum(-1).eq(K).all()


@pytest.mark.parametrize("sinks,window,ties", [(SINKS, WINDOW, False), (0, WINDOW, False), (SINKS, WINDOW, True),
                                               (SINKS, K - SINKS - 1, False)])
def test_structured_row_is_the_full_forwards_row(sinks, window, ties):
    """levers.structured_row (a cached decode step: one row's scores over T keys) picks, at every T from 1 to L,
    the set structured_selection picks at row T-1 — of the first T positions and of all L (short rows: the whole
    prefix) — with every slot valid and distinct; also without sinks, with every score tied (the indexer's q zeroed:
    ties go to the most recent keys) and with one indexer slot. Caught (planted in structured_row / structured_slots):
    the window dropped, the window one position late, ties toward the oldest keys, no L <= top_k branch (short rows
    then hold -1 slots)."""
    model = randomised(tiny_retrofit())
    indexer = model.indexers[0]
    if ties:
        with torch.no_grad():
            indexer.q_proj.weight.zero_()
    x = torch.randn(2, L, 64)
    q, k, w = indexer.project(x)
    full = levers.structured_selection(indexer, x, K, sinks, window)
    for T in range(1, L + 1):
        row = levers.structured_row(q[:, T - 1:T], k[:, :T], w[:, T - 1:T], K, sinks, window)
        assert row.shape == (2, min(K, T)) and row.min() >= 0 and row.max() < T, T
        twin = levers.structured_slots(2, T, K, sinks, window, lambda n: select_last_rows(  # the rule itself, in order
            q[:, T - 1:T], k[:, :T], w[:, T - 1:T], n, kept=(sinks, window)), x.device, rows=torch.tensor([T - 1]))
        assert torch.equal(row, twin[0][:, 0]), T
        got = [sorted(r.tolist()) for r in row]
        assert all(len(set(r)) == len(r) for r in got), T
        for sel in (full, levers.structured_selection(indexer, x[:, :T], K, sinks, window)):
            idx = sel.selected_idx[:, T - 1].masked_fill(~sel.valid[:, T - 1], -1)
            assert got == [sorted(p for p in r.tolist() if p >= 0) for r in idx], T
    if ties:  # all tied: the indexer's slots are the most recent keys outside the window
        n = K - sinks - window
        assert got[0] == list(range(sinks)) + list(range(L - window - n, L))


@pytest.mark.parametrize("backend", list(retrofit.BACKENDS))
def test_structured_plan_is_causal_and_equals_dense_when_k_covers_L(backend):
    """Changing tokens after t changes no logit at <= t under the structured DSA plan (k < t+1 and k > L); k >= L gives
    the original model's logits; at k < L the plan differs from plain DSA at the same k."""
    model = randomised(tiny_retrofit("llama", init=0.2))
    ids = torch.randint(0, 64, (2, L))
    changed = ids.clone()
    changed[:, 30:] = torch.randint(0, 64, changed[:, 30:].shape)
    with torch.no_grad():
        for k in (K, 64):
            plan = retrofit.Plan("dsa", top_k=k, backend=backend, sinks=SINKS, window=WINDOW)
            a, b = model(ids, plan)[0], model(changed, plan)[0]
            torch.testing.assert_close(a[:, :30], b[:, :30], atol=1e-6, rtol=0)
        dense = model(ids, retrofit.Plan())[0]
        full = model(ids, retrofit.Plan("dsa", top_k=L, backend=backend, sinks=SINKS, window=WINDOW))[0]
        torch.testing.assert_close(full, dense, atol=1e-5, rtol=1e-5)
        plain = model(ids, retrofit.Plan("dsa", top_k=K, backend=backend))[0]
        structured = model(ids, retrofit.Plan("dsa", top_k=K, backend=backend, sinks=SINKS, window=WINDOW))[0]
    assert (plain - structured).abs().max() > 1e-4
    with pytest.raises(ValueError, match="sinks \\+ window < top_k"):
        retrofit.Plan("dsa", top_k=7, sinks=SINKS, window=WINDOW)


def test_structured_kl_fits_the_target_outside_the_kept_keys_and_ignores_them():
    """The structure's warm-up loss equals the KL of the target restricted to the keys outside the kept set
    (renormalised) against the index scores' softmax over the same keys, mean over rows that have such keys; the
    kept keys' scores get no gradient and changing them changes nothing. Caught: the target not renormalised, the
    rows without outside keys counted as zeros."""
    torch.manual_seed(0)
    B, R = 2, L
    p = torch.softmax(torch.randn(B, R, L).masked_fill(future_mask(R, L, "cpu"), float("-inf")), -1)
    scores = torch.randn(B, R, L).masked_fill(future_mask(R, L, "cpu"), float("-inf")).requires_grad_()
    loss = levers.WarmupLoss(sinks=SINKS, window=WINDOW)
    got = levers.warmup_loss(p, scores, None, loss)
    got.backward()
    kept = levers.kept_keys(torch.arange(L), L, SINKS, WINDOW)
    outside = ~kept & ~future_mask(L, L, "cpu")
    rows = [(b, t) for b in range(B) for t in range(L) if outside[t].any()]
    want = 0.0
    for b, t in rows:
        pt = p[b, t][outside[t]] / p[b, t][outside[t]].sum()
        log_q = scores[b, t][outside[t]].log_softmax(-1)
        want += (pt * (pt.log() - log_q)).sum().item() / len(rows)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert scores.grad[:, kept].abs().max() == 0
    bumped = scores.detach().clone()
    bumped[:, kept] += 5.0
    p2 = p.clone()
    p2[:, kept] *= 3.0  # more mass on the kept keys (unnormalised: only the outside part matters)
    assert levers.warmup_loss(p2, bumped, None, loss).item() == pytest.approx(got.item(), rel=1e-5)


def test_the_paper_loss_and_target_are_unchanged():
    """At the defaults the warm-up loss is exactly indexer_kl_dense and the target the head sum; row_weight 0 and a
    row-weighted loss with every row's far mass equal give the same number."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 4, L, L).masked_fill(future_mask(L, L, "cpu"), float("-inf")), -1)
    p = levers.head_target(probs, "sum", 2)
    torch.testing.assert_close(p, probs.sum(1) / probs.sum(1).sum(-1, keepdim=True))
    scores = torch.randn(2, L, L).masked_fill(future_mask(L, L, "cpu"), float("-inf"))
    torch.testing.assert_close(levers.warmup_loss(p, scores, None, levers.WarmupLoss()), indexer_kl_dense(probs, scores))


def test_group_max_and_head_max_targets():
    """group_max: per KV group (adjacent heads) the max over its heads, summed over groups, L1-normalised; head_max:
    the max over all heads. A key one head of a group attends to keeps that head's weight, not its share of the sum.
    Caught: the max taken over strided heads (h, h + groups) instead of adjacent ones."""
    probs = torch.zeros(1, 4, 1, 4)
    for head, key in enumerate([0, 0, 1, 2]):  # group 0 (heads 0, 1) both on key 0; group 1 (heads 2, 3) on 1 and 2
        probs[0, head, 0, key] = 1.0
    assert levers.head_target(probs, "group_max", 2)[0, 0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    assert levers.head_target(probs, "head_max", 2)[0, 0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    assert levers.head_target(probs, "sum", 2)[0, 0].tolist() == [0.5, 0.25, 0.25, 0]
    assert levers.head_target(probs, "group_max", 4)[0, 0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    assert levers.head_target(probs, "group_max", 1)[0, 0].tolist() == [0.5, 0.25, 0.25, 0]  # MHA: the sum


@pytest.mark.parametrize("target", ["group_max", "head_max"])
def test_row_targets_equal_the_full_targets_for_every_target(target):
    """The sampled-rows path and the full (L, L) path of the dense forward give the same target at those rows."""
    model = tiny_retrofit("llama", init=0.2)
    ids, rows = torch.randint(0, 64, (2, L)), torch.tensor([39, 0, 17, 5])
    full = retrofit.warmup_targets(model, ids, target=target)
    sampled = retrofit.warmup_targets(model, ids, rows, target=target)
    for layer in full.targets:
        torch.testing.assert_close(sampled.targets[layer], full.targets[layer][:, rows])
    plain = retrofit.warmup_targets(model, ids)
    assert (plain.targets[1] - full.targets[1]).abs().max() > 1e-3


def test_row_weight_favours_rows_with_far_mass():
    """row_weight a: rows weighted (1 - a) + a m_t / mean(m), m_t the target mass beyond the sinks and the last
    far_window keys. Two rows with equal KL keep it; a row with no far mass counts (1 - a) as much. Caught: the
    weights not normalised (the loss scaled by mean(m))."""
    L2 = 12
    scores = torch.zeros(1, 2, L2)
    p = torch.zeros(1, 2, L2)
    p[0, 0, 11] = 1.0  # row 0: all mass local
    p[0, 1, [5, 11]] = 0.5  # row 1: half its mass far
    rows = torch.tensor([11, 11])
    loss = levers.WarmupLoss(sinks=1, row_weight=0.5, far_window=3)
    kl = torch.tensor([12.0, 6.0]).log()  # uniform index softmax over 12 keys: KL = log 12 and log 6
    m = torch.tensor([0.0, 0.5])
    w = 0.5 + 0.5 * m / m.mean()
    got = levers.warmup_loss(p, scores, rows, loss)
    assert got.item() == pytest.approx(((w * kl).sum() / w.sum()).item(), rel=1e-5)
    # the far row (KL log 6) weighs 1.5, the local one (log 12) 0.5: below the unweighted mean
    assert got.item() < levers.warmup_loss(p, scores, rows, levers.WarmupLoss()).item()


def test_membership_term_is_the_cross_entropy_to_the_targets_top_keys():
    """rank_weight r adds r times the mean over rows of -mean_{i in top} log softmax(I)[i] over the target's `rank_top`
    largest keys; it pulls those keys' scores up."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(1, 3, 10), -1)
    scores = torch.randn(1, 3, 10, requires_grad=True)
    plain = levers.warmup_loss(p, scores, torch.tensor([9, 9, 9]), levers.WarmupLoss(row_weight=1e-9))
    got = levers.warmup_loss(p, scores, torch.tensor([9, 9, 9]), levers.WarmupLoss(row_weight=1e-9, rank_weight=0.5,
                                                                                  rank_top=2))
    top = p.topk(2, -1).indices
    ce = -scores.log_softmax(-1).gather(-1, top).mean(-1).mean()
    assert got.item() == pytest.approx(plain.item() + 0.5 * ce.item(), rel=1e-4)


def test_structured_stage2_kl_covers_the_indexers_slots_only():
    """Stage 2 with structure: the sparse KL over the selected slots outside the kept keys (target renormalised
    there), finite gradients into the indexer (rows t < sinks + window have no such slot), none from the kept slots."""
    model = randomised(tiny_retrofit("llama", init=0.2))
    ids = torch.randint(0, 64, (2, L))
    plan = retrofit.Plan("dsa", top_k=K, backend="gather", sinks=SINKS, window=WINDOW, indexer_loss=True,
                         keep_selection=True)
    _, aux = model(ids, plan)
    kl = torch.stack(aux.indexer_losses).mean()
    kl.backward()
    grads = [p.grad for p in model.indexer_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
    # the masking against an independent reference: slots whose key is in kept_keys(t) are left out
    x = retrofit.warmup_targets(model, ids).inputs[0]
    selection = levers.structured_selection(model.indexers[0], x, K, SINKS, WINDOW)
    probs = torch.rand(2, 4, L, K)  # any per-head probabilities at the slots
    got = retrofit._Call(plan, model.indexers).sparse_kl(selection, probs)
    idx = selection.selected_idx
    kept = levers.kept_keys(torch.arange(L), L, SINKS, WINDOW)[None].expand(2, L, L).gather(-1, idx.clamp(min=0))
    slots = selection.valid & ~kept
    scores = index_scores(*model.indexers[0].project(x)).gather(-1, idx.clamp(min=0))
    want = indexer_kl_sparse(probs, scores.masked_fill(~slots, float("-inf")), slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert slots[:, K:].sum(-1).eq(K - SINKS - WINDOW).all() and not slots[:, :SINKS + WINDOW].any()


def test_prev_key_indexer_reads_the_previous_token_and_starts_as_the_plain_one():
    """W_p = 0 after reset: keys equal the plain indexer's with the same weights; with W_p != 0 the key of s changes
    when x_{s-1} changes and not when x_{s+1} does (causal); decoding from start > 0 is refused. Caught: the shift the
    wrong way (x_{s+1}: causality broken)."""
    torch.manual_seed(0)
    plain = levers.LightningIndexer(64, 2, 16, 8, 512)
    prev = levers.PrevKeyIndexer(64, 2, 16, 8, 512)
    prev.load_state_dict({**plain.state_dict(), "prev_proj": torch.randn(16, 64)})
    prev.apply(lambda m: m.reset_parameters() if isinstance(m, levers.PrevKeyIndexer) else None)
    x = torch.randn(1, 10, 64)
    torch.testing.assert_close(prev.project(x)[1], plain.project(x)[1])
    with torch.no_grad():
        prev.prev_proj.normal_()
    y = x.clone()
    y[:, 4] += 1.0
    k_x, k_y = prev.project(x)[1], prev.project(y)[1]
    assert (k_x[:, 5] - k_y[:, 5]).abs().max() > 1e-3 and (k_x[:, 4] - k_y[:, 4]).abs().max() > 1e-3
    torch.testing.assert_close(k_x[:, :4], k_y[:, :4])  # keys before position 4 never read it
    with pytest.raises(ValueError, match="start=0"):
        prev.project(x, start=3)


def test_prev_key_retrofit_is_causal_and_exports(tmp_path):
    """A retrofit with prev_key indexers: DSA logits causal; k >= L equals dense; its warm-up trains W_p."""
    model = randomised(retrofit.RetrofitLM(tiny_base("llama", init=0.2), heads=2, dim=16, rope_dim=8,
                                           max_seq_len=512, prev_key=True))
    assert isinstance(model.indexers[0], levers.PrevKeyIndexer) and model.indexer_spec["prev_key"]
    ids = torch.randint(0, 64, (2, L))
    changed = ids.clone()
    changed[:, 30:] = torch.randint(0, 64, changed[:, 30:].shape)
    with torch.no_grad():
        plan = retrofit.Plan("dsa", top_k=K, backend="gather")
        torch.testing.assert_close(model(ids, plan)[0][:, :30], model(changed, plan)[0][:, :30], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(ids, retrofit.Plan("dsa", top_k=L))[0], model(ids, retrofit.Plan())[0],
                                   atol=1e-5, rtol=1e-5)
    aux = retrofit.warmup_targets(model, ids)
    retrofit.warmup_kl(model, aux, backward=True)
    assert model.indexers[1].prev_proj.grad.abs().max() > 0


@pytest.mark.parametrize("names", [["structure"], ["group_max"], ["far_rows"], ["prev_key"], ["rank"],
                                   ["recurrence"], ["structure", "group_max", "far_rows"]])
def test_each_lever_warm_up_runs_and_lowers_its_loss(names):
    """The warm-up (stage 1) with each lever on the tiny model: its loss falls, the base stays frozen."""
    torch.manual_seed(0)
    s = {**rx.COMMON, **rx.PRESETS["levers"], "warmup_steps": 20, "warmup_eval_every": 10, "batch_size": 4,
         "warmup_lr": 1e-2}  # the paper's recipe, then the levers named
    for name in names:
        s.update(rx.LEVERS[name])
    s["structure_window"] = min(s["structure_window"], 6)
    model = retrofit.RetrofitLM(tiny_base("llama", init=0.2), heads=2, dim=16, rope_dim=8, max_seq_len=512,
                                prev_key=s["prev_key"])
    train, kl_windows = torch.randint(0, 64, (32, 49)), torch.randint(0, 64, (2, 49))
    record = rx.warm_up(model, train, kl_windows, s, torch.device("cpu"), log=lambda *_: None)
    assert record["held_out_kl"][-1] < record["held_out_kl"][0]
    assert not any(p.requires_grad for p in model.base.parameters())


def test_lever_settings_and_fingerprints():
    """--levers NAME ... sets the named keys; an unknown name is one ValueError line; the paper's recipe keeps the
    fingerprint keys it had before the levers existed, a lever changes them; structure needs k > sinks + window.
    quick / cpu / default adopt ADOPTED_LEVERS, `--levers paper` turns them off (the 4-head indexer too), `heads4` the
    capacity alone; the levers preset stays the paper's."""
    s = rx.settings_for("levers", {"levers": ["structure", "wide"]})
    assert s["structure_window"] == 16 and (s["indexer_heads"], s["indexer_dim"]) == (32, 128)
    assert [rx.settings_for("levers", {"levers": [n]})["indexer_heads"] for n in ("heads8", "heads16")] == [8, 16]
    for preset in ("quick", "cpu", "default"):
        adopted = rx.settings_for(preset, {})
        assert {n: adopted[n] for n in rx.ADOPTED_LEVERS} == rx.ADOPTED_LEVERS
        assert {n: rx.settings_for(preset, {"levers": ["paper"]})[n] for n in rx.LEVER_DEFAULTS} == rx.LEVER_DEFAULTS
    assert rx.ADOPTED_LEVERS and all(rx.PRESETS["levers"].get(n, v) == v for n, v in rx.LEVER_DEFAULTS.items())
    paper = rx.settings_for("quick", {"levers": ["paper"]})
    assert (paper["indexer_heads"], paper["indexer_dim"]) == (4, 64)  # the adopted capacity undone too
    small = rx.settings_for("cpu", {"levers": ["heads4"]})  # the recipe adopted before the capacity lever
    assert (small["structure_window"], small["warmup_target"], small["indexer_heads"]) == (16, "head_max", 4)
    assert rx.fingerprinted(paper) == {n: v for n, v in paper.items() if n not in (
        "seq_lens", "top_ks", "levers", "eval_modes", *rx.LEVER_DEFAULTS)}
    assert rx.fingerprinted(s, rx.WARMUP_KEYS)["structure_window"] == 16
    assert "structure_window" not in rx.fingerprinted(paper, rx.WARMUP_KEYS)
    with pytest.raises(ValueError, match="--levers 'nope' is unknown"):
        rx.settings_for("quick", {"levers": ["nope"]})
    with pytest.raises(ValueError, match="use a --top-k above"):
        rx.settings_for("quick", {"levers": ["structure"], "top_k": 16})


def test_cli_levers_preset_runs_structure_and_prev_key_end_to_end(tiny_folder, tmp_path, monkeypatch):
    """`--preset levers --levers structure prev_key` on the tiny model with a 1-step stage 2: the structured DSA plan
    drives evaluation, copy probe, passkey, stage 2 and timing; only dense / dsa / oracle (and the stage-2 pair) are
    evaluated; the warm-up's record names the lever loss; the export rebuilds prev_key indexers and records the
    structure (sinks, structure_window)."""
    import run_experiment
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(rx.PRESETS, "levers", {**rx.PRESETS["levers"], "eval_windows": 2, "probe_windows": 2,
                                               "warmup_steps": 2, "warmup_eval_every": 2, "passkey_trials": 1,
                                               "passkey_depths": [0.5], "probe_distances": [1.0], "warmup_rows": 16})
    args = ["--experiment", "retrofit", "--preset", "levers", "--model", str(tiny_folder), "--seq-lens", "192",
            "--top-k", "32", "--steps", "1", "--levers", "structure", "prev_key", "--out", str(tmp_path / "out"),
            "--export", str(tmp_path / "export")]
    assert run_experiment.main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    r = summary["results"]["192"]["32"]
    assert set(r["loss"]) == {"dense", "dsa", "oracle", "dsa_ft", "dense_ft"}
    assert summary["settings"]["structure_window"] == 16 and summary["settings"]["prev_key"]
    assert "lever loss" in summary["results"]["192"]["warmup"]["kl_unit"]
    assert isinstance(retrofit.load_retrofit(tmp_path / "export").indexers[0], levers.PrevKeyIndexer)
    meta = retrofit.read_export_meta(tmp_path / "export")  # sample.py --retrofit rebuilds the structured plan
    assert (meta["sinks"], meta["structure_window"]) == (4, 16)
    lever_table_reads_the_run(tmp_path / "out", tmp_path)


def lever_table_reads_the_run(run: Path, tmp_path: Path) -> None:
    """The lever table on a real run's summary, given twice (a lever compared with itself): every paired difference
    is 0 and untestable, the table and figure are written; a run of other windows, or a folder without a summary, is
    refused in one line with exit status 2 and nothing is written."""
    from dsa_lab.experiments import lever_table
    out = tmp_path / "levers"
    assert lever_table.main([str(run), str(run), "--out", str(out)]) == 0
    table = lever_table.compare(lever_table.load_runs([run, run]))
    (budget,) = table.values()
    same = budget["rows"][1]
    assert same["vs_reference"]["mean"] == 0 and same["p_holm"]["passkey"] == 1.0
    assert all(d["mean"] == 0 for d in same["copy_vs_reference"].values())
    assert "| structure+prev_key |" in (out / "levers.md").read_text() and (out / "levers.png").stat().st_size > 0
    summary = json.loads((run / "summary.json").read_text())
    L, k = budget["rows"][0]["budget"].split("/")
    far = max(summary["results"][L][k]["probe"]["by_distance"], key=int)  # per layer: the token after the occurrence
    assert same["copy_hit"] == summary["results"][L][k]["probe"]["by_distance"][far]["dsa"]["value_hit_by_layer"]
    dense_by_depth = summary["results"][L][k]["passkey"]["dense"]["by_depth"]
    assert "| dense | " + " | ".join(f"{d['correct']}/{d['n']}" for d in dense_by_depth) + " |" in (
        out / "levers.md").read_text()
    assert lever_table.retrieving_layers({"oracle_copy_hit": [0.1, 0.5, 0.49, 0.9]}) == [1, 3]
    other = tmp_path / "other"
    other.mkdir()
    loss = summary["results"][L][k]["loss"]["dsa"]
    loss["per_seed"] = [v + 0.1 for v in loss["per_seed"]]  # the lever's DSA 0.1 nats worse on every window
    (other / "summary.json").write_text(json.dumps(summary))
    shifted = lever_table.compare(lever_table.load_runs([run, other]))[f"{L}/{k}"]["rows"][1]
    assert shifted["vs_reference"]["mean"] == pytest.approx(0.1)
    summary["settings"]["seed"] += 1
    (other / "summary.json").write_text(json.dumps(summary))
    refused = tmp_path / "refused"
    assert lever_table.main([str(run), str(other), "--out", str(refused)]) == 2
    assert lever_table.main([str(run), str(tmp_path), "--out", str(refused)]) == 2 and not refused.exists()


def test_every_dsa_plan_of_the_experiment_carries_the_structure():
    """Evaluation (and its stage-2 entry), probe entries, stage 2 and timing build DSA plans through dsa_plan: with
    --levers structure each keeps the sinks and the window. Caught: eval_entries building a plain DSA plan."""
    s = rx.settings_for("levers", {"levers": ["structure"]})
    model = tiny_retrofit()
    entries = rx.eval_entries(model, 64, s, tuned=(model, model))
    dsa = [plan for name, _, plan in entries if name in ("dsa", "dsa_ft")]
    assert len(dsa) == 2 and all((p.window, p.sinks) == (16, 4) for p in dsa)
    assert [name for name, _, _ in entries] == ["dsa", "oracle", "dsa_ft", "dense_ft"]
    assert rx.dsa_plan(s, 64, "gather", indexer_loss=True).window == 16


def test_recurrences_copy_earlier_text_at_random_distances_into_the_chosen_windows():
    """Each placement copies m in [min_span, max_span] tokens from at least min_gap before its destination, one per
    segment, front to back; the rest of the window is untouched; share picks about that share of windows; the same
    generator seed gives the same windows. Caught: a source overlapping its destination (gap ignored)."""
    rec = levers.Recurrence(share=0.5, spans=4, min_span=16, max_span=64, min_gap=32)
    windows = torch.arange(1025).repeat(200, 1)  # every token names its position
    out, placed = levers.splice_recurrences(windows, rec, torch.Generator().manual_seed(0))
    chosen = {b for b, *_ in placed}
    assert 70 < len(chosen) < 130 and all(len([p for p in placed if p[0] == b]) == 4 for b in chosen)
    expected = windows.clone()
    for b, src, dest, m in placed:
        assert rec.min_span <= m <= rec.max_span and src + m + rec.min_gap <= dest
        assert (dest // 256) * 256 <= dest and dest + m <= (dest // 256 + 1) * 256  # inside its segment
        expected[b, dest:dest + m] = expected[b, src:src + m]
        assert torch.equal(out[b, dest:dest + m], out[b, src:src + m])  # no later write changed it
    assert torch.equal(out, expected)
    assert len({dest - src for _, src, dest, _ in placed}) > len(placed) // 2  # distances vary
    again, _ = levers.splice_recurrences(windows, rec, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and torch.equal(windows, torch.arange(1025).repeat(200, 1))
    with pytest.raises(ValueError, match="recur_share"):
        levers.Recurrence(share=1.5)


def test_the_data_lever_changes_only_the_training_batches_it_is_asked_to():
    """TrainingBatches: off (today's recipe) it yields exactly BatchStream's batches; on, the inputs and targets of a
    batch stay one token apart, some windows hold recurrences, and two streams with one seed yield the same batches
    (stage 2's sparse model and dense twin). Caught: targets left unspliced."""
    from dsa_lab.training.data import STREAM_WARMUP, BatchStream, stream_seed
    train = torch.randint(0, 5000, (16, 513))
    s = {**rx.settings_for("levers", {}), "batch_size": 4}
    plain, reference = rx.TrainingBatches(train, s, STREAM_WARMUP), BatchStream(train, 4, stream_seed(42, STREAM_WARMUP))
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(plain.next(), reference.next()))
    s = {**rx.settings_for("levers", {"levers": ["recurrence"]}), "batch_size": 4}
    one, two = rx.TrainingBatches(train, s, STREAM_WARMUP), rx.TrainingBatches(train, s, STREAM_WARMUP)
    reference, changed = BatchStream(train, 4, stream_seed(42, STREAM_WARMUP)), 0
    for _ in range(5):
        (inputs, targets), (again, _), (original, _) = one.next(), two.next(), reference.next()
        assert torch.equal(inputs[:, 1:], targets[:, :-1]) and torch.equal(inputs, again)
        changed += int((inputs != original).any(-1).sum())
    assert 0 < changed < 20
    assert rx.fingerprinted(s, rx.WARMUP_KEYS)["recur_share"] == 0.5
    with pytest.raises(ValueError, match="recur_share"):
        rx.check_settings({**s, "recur_share": 2.0})


def test_fisher_exact_test_matches_the_tea_tasting_value():
    """Fisher's lady tasting tea: 3/4 vs 1/4, two-sided p = 34/70; equal proportions give 1."""
    from dsa_lab.experiments import lever_table
    assert lever_table.fisher_p(3, 4, 1, 4) == pytest.approx(34 / 70)
    assert lever_table.fisher_p(5, 10, 5, 10) == pytest.approx(1.0)


def test_lever_table_names_each_run_by_its_levers_or_its_preset():
    """A run names its levers; without any, the levers preset is the paper's recipe and quick its adopted levers."""
    from dsa_lab.experiments import lever_table
    assert lever_table.run_name({"preset": "levers", "settings": rx.settings_for("levers", {})}) == "paper's recipe"
    assert lever_table.run_name({"preset": "quick", "settings": rx.settings_for("quick", {})}) == \
        "quick (adopted levers)"
    assert lever_table.run_name({"preset": "quick", "settings": rx.settings_for(
        "quick", {"levers": ["paper"]})}) == "paper"
    assert lever_table.run_name({"preset": "levers", "settings": rx.settings_for(
        "levers", {"levers": ["structure", "recurrence"]})}) == "structure+recurrence"
