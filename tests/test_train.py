"""Training on real text: loss falls, the indexer learns, NaN stops the run, checkpoints round-trip."""
import math

import pytest
import torch

from config import TrainConfig
from conftest import tiny_model_config
from data import BatchStream, build_windows, eval_subset
from train import (TrainingDiverged, build_model_pair, evaluate, load_checkpoint, lr_multiplier, run_seed,
                   save_checkpoint, train_lm, warmup_indexer)

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


def test_warmup_trains_only_the_indexer_and_both_models_see_the_same_batches(corpus):
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, sparse_top_k=4, max_seq_len=16)
    windows = build_windows(corpus, 16)
    classic, sparse = build_model_pair(cfg, 0, "cpu")
    main_before = {n: p.clone() for n, p in sparse.named_parameters() if ".indexer." not in n}
    idx_before = [p.clone() for p in sparse.indexer_parameters()]
    tcfg = TrainConfig(**{**TINY_TRAIN, "warmup_steps": 3, "eval_windows": 4})
    warmup_indexer(sparse, BatchStream(windows.train, 4, 0), windows.val[:4], tcfg, torch.device("cpu"))
    for n, p in sparse.named_parameters():
        if ".indexer." not in n:
            assert torch.equal(p, main_before[n]), n
    assert all(b.ffn.load_counts.sum() == 0 for b in sparse.blocks)  # warm-up routing does not leak into stage 2
    assert all(p.requires_grad for p in sparse.parameters())  # nothing stays frozen after the warm-up
    assert all(not torch.equal(a, b) for a, b in zip(idx_before, sparse.indexer_parameters()))
    a, b = BatchStream(windows.train, 4, 11), BatchStream(windows.train, 4, 11)
    assert all(torch.equal(a.next()[0], b.next()[0]) for _ in range(5))


def test_a_nan_loss_stops_the_run_naming_the_step(corpus):
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, max_seq_len=16)
    classic, _ = build_model_pair(cfg, 0, "cpu")
    with torch.no_grad():
        classic.norm.weight.fill_(float("nan"))
    windows = build_windows(corpus, 16)
    with pytest.raises(TrainingDiverged, match="at step 0"):
        train_lm(classic, BatchStream(windows.train, 4, 0), windows.val[:4], TrainConfig(**TINY_TRAIN),
                 torch.device("cpu"), desc="nan-test")


def test_backends_that_cannot_train_on_cpu_are_refused_up_front():
    from train import check_backend_device
    check_backend_device("gather", torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot train on CPU"):
        check_backend_device("flex", torch.device("cpu"))


def test_checkpoint_round_trip(tmp_path, corpus):
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, max_seq_len=16)
    _, sparse = build_model_pair(cfg, 0, "cpu")
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
    assert torch.equal(eval_subset(windows.val, 8), eval_subset(windows.val, 8))
    classic, _ = build_model_pair(tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, max_seq_len=16), 0, "cpu")
    m = evaluate(classic, eval_subset(windows.val, 8), 4, torch.device("cpu"))
    assert abs(m["val_perplexity"] - math.exp(m["val_loss"])) < 1e-6 * m["val_perplexity"]
    assert lr_multiplier(0, 100, 0.1, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(10, 100, 0.1, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(99, 100, 0.1, 0.1) == pytest.approx(0.1, abs=0.01)


def test_gradients_are_clipped_per_param_group():
    """A huge indexer gradient must not shrink the main model's update (and vice versa)."""
    from train import _update
    main, indexer = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [main]}, {"params": [indexer]}], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss = (main * torch.tensor([0.1, 0.0, 0.0])).sum() + (indexer * torch.tensor([1000.0, 0.0, 0.0])).sum()
    _update(loss, opt, sched, grad_clip=1.0, desc="clip-test", step=0)
    assert main.detach()[0].item() == pytest.approx(-0.1)  # below the clip: untouched by the other group's norm
    assert indexer.detach()[0].item() == pytest.approx(-1.0)  # clipped to norm 1 on its own
