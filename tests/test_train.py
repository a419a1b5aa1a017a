"""Training on real text: loss falls, the indexer learns, NaN stops the run, checkpoints round-trip."""
import math

import pytest
import torch

from config import TrainConfig
from conftest import model_pair, record_stages, tiny_model_config
from dsa_lab.training.data import BatchStream, build_windows, eval_subset
from dsa_lab.training.train import (TrainingDiverged, evaluate, load_checkpoint, lr_multiplier, run_seed, save_checkpoint, train_lm,
                   warmup_indexer)

TINY_TRAIN = dict(batch_size=8, dense_steps=150, warmup_steps=40, steps=20, learning_rate=1e-2, warmup_lr=1e-2,
                  eval_every=10, eval_windows=16, profile_steps=2)


@pytest.fixture(scope="module")
def run(corpus):
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, sparse_top_k=8, max_seq_len=32)
    windows = build_windows(corpus, 32)
    return run_seed(cfg, windows, TrainConfig(**TINY_TRAIN), seed=0, device=torch.device("cpu"))


def test_loss_falls_on_real_text(run):
    pre = run["pretrain"]["curves"]["val_loss"]
    assert pre[-1] < math.log(4096) - 1.0  # far below a uniform guess
    for model in ("classic", "sparse"):
        c = run[model]["curves"]
        assert c["val_loss"][-1] < pre[0] and c["steps"] == [10, 20]
        assert all(math.isfinite(v) for v in c["train_loss"] + c["time_per_step"])


def test_indexer_recall_after_warmup_beats_random_and_its_own_start(run):
    w = run["sparse"]["warmup"]
    assert w["recall_after"] > w["random_recall"] + 0.15  # measured 0.78 vs 0.45
    assert w["recall_after"] > w["local_recall"] + 0.05  # better than keeping the last k tokens
    assert w["recall_after"] > w["recall_before"] + 0.05
    assert w["indexer_kl"][-1] < w["indexer_kl"][0]
    f = run["sparse"]["final"]
    assert 0 < f["random_recall"] < f["indexer_recall"] <= 1
    assert 0 < f["indexer_time_share"] < 1 and 0 < f["attention_time_share"] < 1


def test_warmup_trains_only_the_indexer_and_leaves_nothing_frozen(corpus):
    """The warm-up moves the indexers and nothing else of the model (no weight, no MoE balance bias), and leaves
    every parameter trainable. (That both models of a run see the same batches is
    test_run_seed_branches_classic_and_sparse_from_identical_weights_on_the_same_batches.)"""
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, sparse_top_k=4, max_seq_len=16)
    windows = build_windows(corpus, 16)
    classic, sparse = model_pair(cfg, 0, "cpu")
    idx_before = [p.clone() for p in sparse.indexer_parameters()]
    main_before = {n: t.clone() for n, t in sparse.state_dict().items() if ".indexer." not in n}
    tcfg = TrainConfig(**{**TINY_TRAIN, "warmup_steps": 3, "eval_windows": 4})
    from dsa_lab.training.train import _param_groups, warmup_stage
    groups = _param_groups(sparse, warmup_stage(tcfg))  # what the warm-up optimizer can move: the indexers only
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in sparse.indexer_parameters()}
    warmup_indexer(sparse, BatchStream(windows.train, 4, 0), windows.val[:4], tcfg, torch.device("cpu"))
    assert all(b.ffn.load_counts.sum() == 0 for b in sparse.blocks)  # warm-up routing does not leak into stage 2
    assert all(p.requires_grad for p in sparse.parameters())  # nothing stays frozen after the warm-up
    assert all(not torch.equal(a, b) for a, b in zip(idx_before, sparse.indexer_parameters()))
    after = sparse.state_dict()
    moved = [n for n, t in main_before.items() if not torch.equal(t, after[n])]
    assert not moved, f"the warm-up changed main-model state: {moved}"


def test_run_seed_branches_classic_and_sparse_from_identical_weights_on_the_same_batches(corpus, monkeypatch):
    """Honesty rule 5, recorded from run_seed itself: the classic continuation and the sparse stage 2 start
    from the same shared weights and see the same batches in the same order."""
    stages = record_stages(monkeypatch)
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, sparse_top_k=4, max_seq_len=16)
    tcfg = TrainConfig(**{**TINY_TRAIN, "dense_steps": 2, "warmup_steps": 2, "steps": 3, "eval_every": 3,
                          "eval_windows": 4})
    run_seed(cfg, build_windows(corpus, 16), tcfg, seed=0, device=torch.device("cpu"))

    def shared(record):  # the weights and buffers both models have (not the indexers)
        return {n: t for n, t in record["start"].items() if ".indexer." not in n}, record["batches"]
    (classic_w, classic_b), = [shared(r) for r in stages if r["stage"] == "dense" and "classic" in r["desc"]]
    (warm_w, _), = [shared(r) for r in stages if r["stage"] == "warmup"]
    (sparse_w, sparse_b), = [shared(r) for r in stages if r["stage"] == "sparse"]
    assert len(classic_b) == len(sparse_b) == 3
    assert all(torch.equal(a, b) for a, b in zip(classic_b, sparse_b))
    assert classic_w.keys() == warm_w.keys()
    assert all(torch.equal(classic_w[n], warm_w[n]) for n in classic_w)  # the branch point: identical weights
    # ... and the warm-up froze them, so stage 2 starts from them too
    assert all(torch.equal(classic_w[n], sparse_w[n]) for n in classic_w if "balance_bias" not in n)


def test_a_nan_loss_stops_the_run_naming_the_step(corpus):
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, max_seq_len=16)
    classic, _ = model_pair(cfg, 0, "cpu")
    with torch.no_grad():
        classic.norm.weight.fill_(float("nan"))
    windows = build_windows(corpus, 16)
    with pytest.raises(TrainingDiverged, match="at step 0"):
        train_lm(classic, BatchStream(windows.train, 4, 0), windows.val[:4], TrainConfig(**TINY_TRAIN),
                 torch.device("cpu"), desc="nan-test")


def test_backends_that_cannot_train_on_cpu_are_refused_up_front():
    from dsa_lab.training.train import check_backend_device
    check_backend_device("gather", torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot train on CPU"):
        check_backend_device("flex", torch.device("cpu"))


def test_checkpoint_round_trip(tmp_path, corpus):
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, max_seq_len=16)
    _, sparse = model_pair(cfg, 0, "cpu")
    save_checkpoint(sparse, tmp_path / "s.pt", {"tokenizer": corpus.tokenizer.spec()})
    loaded, payload = load_checkpoint(tmp_path / "s.pt")
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), sparse.eval()(ids))
    assert payload["model_type"] == "sparse"
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable dsa-lab checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_evaluation_uses_a_fixed_subset_and_lr_schedule_shape(corpus):
    windows = build_windows(corpus, 16)
    classic, _ = model_pair(tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, max_seq_len=16), 0, "cpu")
    val = eval_subset(windows.val, 8)
    m = evaluate(classic, val, 4, torch.device("cpu"))
    with torch.no_grad():  # the loss against a direct computation over every target token
        logits = classic.eval()(val[:, :-1])
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), val[:, 1:].flatten()).item()
    assert m["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert lr_multiplier(0, 100, 0.1, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(10, 100, 0.1, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(99, 100, 0.1, 0.1) == pytest.approx(0.1, abs=0.01)


def test_a_non_finite_gradient_with_a_finite_loss_stops_the_run():
    from dsa_lab.training.train import _update
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss = p.sqrt().sum()  # 0.0, finite; d sqrt(p) / dp at 0 = inf
    assert torch.isfinite(loss)
    with pytest.raises(TrainingDiverged, match="non-finite gradient.*at step 7"):
        _update(loss, opt, sched, grad_clip=1.0, desc="grad-test", step=7)
    assert torch.equal(p.detach(), torch.zeros(3))  # no step was taken


def test_time_shares_and_step_time_use_the_right_spans(corpus, monkeypatch):
    """On a fake clock: each timed section (profiled steps only) lasts 1e6 s, each optimizer update (backward
    + step) 1e9 s. Shares divide the sections by the *forward* time of the same profiled steps (so they are
    not ~1e-3), and the profiled steps are kept out of avg_time_per_step (exactly the update's 1e9 s)."""
    import types

    import sparse_attention
    from dsa_lab.training import train
    clock = [0.0]

    def perf_counter():
        return clock[0]

    def advance(seconds, fn):
        def run(*args):
            clock[0] += seconds
            return fn(*args)
        return run

    class SlowTimer(sparse_attention.SectionTimer):
        def time(self, name, fn, *args):
            return super().time(name, advance(1e6, fn), *args)

    fake_time = types.SimpleNamespace(perf_counter=perf_counter)
    monkeypatch.setattr(train, "time", fake_time)
    monkeypatch.setattr(sparse_attention, "time", fake_time)
    monkeypatch.setattr(train, "SectionTimer", SlowTimer)
    monkeypatch.setattr(train, "_update", advance(1e9, train._update))
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, sparse_top_k=4, max_seq_len=16)
    _, sparse = model_pair(cfg, 0, "cpu")
    windows = build_windows(corpus, 16)
    tcfg = TrainConfig(**{**TINY_TRAIN, "steps": 6, "eval_every": 6, "profile_steps": 2, "eval_windows": 4})
    f = train.run_stage(sparse, train.sparse_stage(tcfg), BatchStream(windows.train, 4, 0), windows.val[:4], tcfg,
                        torch.device("cpu"), "timing")["final"]
    assert f["avg_time_per_step"] == 1e9  # unprofiled steps only: their update, no section time
    assert 0.2 < f["attention_time_share"] < 1 and 0.2 < f["indexer_time_share"] < 1
    assert f["attention_time_share"] + f["indexer_time_share"] == pytest.approx(1.0)  # the forward is its sections
    assert f["attention_time_share"] == pytest.approx(f["attention_ms"] / f["profiled_forward_ms"])


def test_checkpoints_load_weights_only(tmp_path, corpus):
    """A checkpoint is read with weights_only=True: a pickled object (which could run code) is refused."""
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, max_seq_len=16)
    _, sparse = model_pair(cfg, 0, "cpu")
    save_checkpoint(sparse, tmp_path / "s.pt", {"tokenizer": corpus.tokenizer.spec(), "seed": 0})
    payload = torch.load(tmp_path / "s.pt", weights_only=False)
    payload["evil"] = Exception("an arbitrary pickled object")
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a readable dsa-lab checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    load_checkpoint(tmp_path / "s.pt")  # plain data loads


def test_recall_sums_match_a_hand_loop():
    """selection_recall's indexer, local (last k_t) and random sums against an explicit loop over rows."""
    from sparse_attention import causal_attention_probs, selection_recall
    torch.manual_seed(0)
    B, H, L, D, k = 2, 3, 12, 8, 4
    q, kk = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    scores = torch.randn(B, L, L)
    idx = scores.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf")).topk(k, -1).indices
    valid = idx <= torch.arange(L)[:, None]
    idx = idx.masked_fill(~valid, -1)
    stats = selection_recall(q, kk, idx, valid)
    p = causal_attention_probs(q, kk).sum(1)  # (B, L, L) summed over heads
    rows = recall = local = random = 0.0
    for b in range(B):
        for t in range(L):
            kt = int(valid[b, t].sum())
            if kt >= t + 1:
                continue
            row = p[b, t, : t + 1] / p[b, t, : t + 1].sum()
            rows += 1
            recall += sum(float(row[int(s)]) for s, v in zip(idx[b, t], valid[b, t]) if v)
            local += float(row[t + 1 - kt: t + 1].sum())
            random += kt / (t + 1)
    assert stats["rows"] == rows
    assert stats["recall_sum"] == pytest.approx(recall, rel=1e-5)
    assert stats["local_recall_sum"] == pytest.approx(local, rel=1e-5)
    assert stats["random_recall_sum"] == pytest.approx(random, rel=1e-6)


def test_gradients_are_clipped_per_param_group():
    """A huge indexer gradient must not shrink the main model's update (and vice versa)."""
    from dsa_lab.training.train import _update
    main, indexer = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [main]}, {"params": [indexer]}], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss = (main * torch.tensor([0.1, 0.0, 0.0])).sum() + (indexer * torch.tensor([1000.0, 0.0, 0.0])).sum()
    _update(loss, opt, sched, grad_clip=1.0, desc="clip-test", step=0)
    assert main.detach()[0].item() == pytest.approx(-0.1)  # below the clip: untouched by the other group's norm
    assert indexer.detach()[0].item() == pytest.approx(-1.0)  # clipped to norm 1 on its own


def test_peak_memory_counts_training_steps_not_evaluation(corpus, monkeypatch):
    """A fake CUDA allocator peak: every step reaches 1 MiB, every evaluation 1000 MiB (dense recall, whole
    eval batches). The stage's peak_memory_mb is the steps' 1 MiB: evaluation between steps is not counted."""
    from dsa_lab.training import train
    peak = [0]

    class FakeCudaPeak(train.StepPeak):
        def __init__(self, device, peak_bytes=0):
            super().__init__(device, peak_bytes)
            self.cuda = True  # measure as on CUDA, with the fake allocator below

    def fake_evaluate(*args, **kwargs):
        peak[0] = 1000 * 2**20
        return real_evaluate(*args, **kwargs)

    real_evaluate = train.evaluate
    monkeypatch.setattr(train, "StepPeak", FakeCudaPeak)
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peak.__setitem__(0, 0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: max(peak[0], 2**20))
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, sparse_top_k=4, max_seq_len=16)
    _, sparse = model_pair(cfg, 0, "cpu")
    windows = build_windows(corpus, 16)
    tcfg = TrainConfig(**{**TINY_TRAIN, "steps": 4, "eval_every": 1, "eval_windows": 4})
    f = train.run_stage(sparse, train.sparse_stage(tcfg), BatchStream(windows.train, 4, 0), windows.val[:4], tcfg,
                        torch.device("cpu"), "peak")["final"]
    assert f["peak_memory_mb"] == 1.0
