"""Per-step scalars read back every N steps: the same logs, curves and weights as reading every step, the NaN guard
still names the first non-finite step (loss or gradient) however much later it reads back, and a training step
between read-backs runs no syncing op."""
import math

import pytest
import torch

from config import TrainConfig
from conftest import model_pair, tiny_model_config
from dsa_lab.training import train
from dsa_lab.training.data import BatchStream, build_windows
from dsa_lab.training.readback import CUDA_READBACK_EVERY, Readback, readback_interval
from dsa_lab.training.train import Execution, TrainingDiverged, run_stage
from sync_ops import SyncOps

TCFG = TrainConfig(batch_size=4, steps=8, warmup_steps=4, eval_every=4, eval_windows=4, profile_steps=2,
                   learning_rate=1e-2, warmup_lr=1e-2)
NAN_TCFG = TrainConfig(**{**TCFG.__dict__, "eval_every": 8})  # no evaluation (and its read-back) before step 7
CPU = torch.device("cpu")
TIMES = ("avg_time_per_step", "tokens_per_s", "model_flops_utilization", "profiled_forward_ms", "attention_time_share",
         "attention_ms", "indexer_time_share", "indexer_ms", "process_peak_rss_mb", "peak_memory_mb")


@pytest.fixture(scope="module")
def windows(corpus):
    return build_windows(corpus, 16)


def _config(corpus, **overrides):
    return tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, max_seq_len=16, sparse_top_k=4, **overrides)


def _sparse_run(corpus, windows, readback_every: int):
    """The sparse stage (LM loss, indexer KL, expert loads, profiled steps) of a fixed model -> (result, model)."""
    _, sparse = model_pair(_config(corpus), 0)
    result = run_stage(sparse, train.sparse_stage(TCFG), BatchStream(windows.train, 4, 1), windows.val[:4], TCFG,
                       torch.device("cpu"), "sparse", run=Execution(readback_every=readback_every))
    return result, sparse


def test_reading_back_every_3_steps_logs_the_same_numbers_as_every_step(corpus, windows):
    ref, ref_model = _sparse_run(corpus, windows, 1)
    got, model = _sparse_run(corpus, windows, 3)
    curves = {k: v for k, v in ref["curves"].items() if k != "time_per_step"}
    assert curves == {k: v for k, v in got["curves"].items() if k != "time_per_step"}  # floats: bit for bit
    assert got["step_indexer_kl"] == ref["step_indexer_kl"] and len(ref["step_indexer_kl"]) == 8
    assert {k: v for k, v in got["final"].items() if k not in TIMES} == \
        {k: v for k, v in ref["final"].items() if k not in TIMES}  # expert loads, loss variance, recall, ...
    assert all(math.isfinite(t) for t in got["curves"]["time_per_step"])
    assert 0 < got["final"]["indexer_time_share"] < 1 and math.isfinite(got["final"]["avg_time_per_step"])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ref_model.state_dict().items())


class NaNAt:
    """A forward hook making the output NaN at the `at`-th training forward (0-based); counts training forwards."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, module, args, output):
        if not module.training:
            return output
        self.calls += 1
        return output * float("nan") if self.calls - 1 == self.at else output


@pytest.mark.parametrize("every, forwards", [(1, 3), (5, 5)])
def test_a_nan_loss_at_step_2_is_named_as_step_2_when_read_back_later(corpus, windows, every, forwards):
    """Every step: the run stops at step 2 before its update. Every 5 steps: steps 3 and 4 run on (NaN weights), the
    read-back after step 4 still names step 2."""
    classic, _ = model_pair(_config(corpus), 0)
    hook = NaNAt(2)
    classic.norm.register_forward_hook(hook)
    with pytest.raises(TrainingDiverged, match=r"nan-test: loss became nan at step 2; lower the learning rate"):
        train.train_lm(classic, BatchStream(windows.train, 4, 0), windows.val[:4], NAN_TCFG, CPU, desc="nan-test",
                       run=Execution(readback_every=every))
    assert hook.calls == forwards


def test_a_non_finite_gradient_at_step_1_is_named_when_read_back_after_step_7(corpus, windows):
    classic, _ = model_pair(_config(corpus), 0)
    backward = {"calls": 0}

    def inf_at_step_1(grad):
        backward["calls"] += 1
        return grad * float("inf") if backward["calls"] == 2 else grad
    classic.norm.weight.register_hook(inf_at_step_1)
    with pytest.raises(TrainingDiverged, match=r"grad-test: non-finite gradient \(param group 0\) with a finite loss "
                                               r"[0-9.]+ at step 1; lower"):
        train.train_lm(classic, BatchStream(windows.train, 4, 0), windows.val[:4], NAN_TCFG, CPU, desc="grad-test",
                       run=Execution(readback_every=8))
    assert backward["calls"] == 8  # every step ran before the read-back


def test_an_error_a_diverged_step_causes_later_is_reported_as_that_step(corpus, windows):
    """Sparse stage: NaN logits at step 1 turn the main weights NaN; step 2's indexer then refuses NaN scores (a
    ValueError) before any read-back: the run reports step 1's divergence, caused by it."""
    _, sparse = model_pair(_config(corpus), 0)
    sparse.norm.register_forward_hook(NaNAt(1))
    with pytest.raises(TrainingDiverged, match="sparse: loss became nan at step 1") as info:
        run_stage(sparse, train.sparse_stage(NAN_TCFG), BatchStream(windows.train, 4, 1), windows.val[:4], NAN_TCFG,
                  CPU, "sparse", run=Execution(readback_every=5))
    assert isinstance(info.value.__cause__, ValueError) and "index scores contain NaN" in str(info.value.__cause__)


def _steps_sync_ops(corpus, windows, every: int, monkeypatch) -> list[str]:
    """The syncing ops of 4 training steps of a classic model (dense MoE dispatch, no aux loss: the loop's token
    lists and CPU one_hot's value checks sync by design), the optimizer's own step left out (AdamW keeps its step
    counter on the host)."""
    classic, _ = model_pair(_config(corpus, moe_dispatch="dense", balance_aux_weight=0.0), 0)
    stream, readback, ops = BatchStream(windows.train, 4, 0), Readback(every), SyncOps()
    real_step = torch.optim.AdamW.step

    def step_unrecorded(self, *args, **kwargs):
        ops.paused = True
        try:
            return real_step(self, *args, **kwargs)
        finally:
            ops.paused = False
    monkeypatch.setattr(torch.optim.AdamW, "step", step_unrecorded)
    stage = train.dense_stage(NAN_TCFG)
    opt, sched, log, _ = train._stage_start(classic.train(), stage, windows.val[:4], NAN_TCFG, CPU, None)
    with ops:
        for step in range(4):
            train._train_step(classic, classic, stage, stream.next(), opt, sched, NAN_TCFG, CPU, Execution(), log,
                              None, step, "sync-test", readback)
    assert len(readback.pending) == 4
    train._read_back(readback, log, train.SectionTimer(), "sync-test")
    assert len(log["step_loss"]) == 4 and all(math.isfinite(v) for v in log["step_loss"])
    return ops.found


def test_a_training_step_between_read_backs_runs_no_syncing_op(corpus, windows, monkeypatch):
    assert "aten::_local_scalar_dense" in _steps_sync_ops(corpus, windows, 1, monkeypatch)  # the NaN guard: seen
    assert _steps_sync_ops(corpus, windows, 4, monkeypatch) == []


class FakeEvent:
    """A recorded CUDA event at fake time `t` seconds; counts the waits on any event."""
    waits = 0

    def __init__(self, t: float):
        self.t = t

    def elapsed_time(self, end) -> float:
        return 1e3 * (end.t - self.t)

    def synchronize(self) -> None:
        FakeEvent.waits += 1


def test_a_read_back_returns_exact_numbers_and_event_spans_after_one_wait():
    readback, loads = Readback(4), [torch.rand(2, 4) for _ in range(3)]
    for step in range(3):
        readback.add(step, {"loss": torch.tensor(0.1 * step + 1 / 3, dtype=torch.bfloat16), "load": loads[step],
                            "norms": torch.tensor([1.0, float("nan")])},
                     {"step": (FakeEvent(step), FakeEvent(step + 0.25))})
    FakeEvent.waits = 0
    rows = readback.read()
    assert FakeEvent.waits == 1 and readback.pending == [] and [r["step"] for r in rows] == [0, 1, 2]
    for step, row in enumerate(rows):
        assert row["loss"] == torch.tensor(0.1 * step + 1 / 3, dtype=torch.bfloat16).item()
        assert row["load"].dtype == torch.float32 and torch.equal(row["load"], loads[step])
        assert row["norms"][0] == 1 and math.isnan(row["norms"][1]) and row["spans"]["step"] == 0.25
    assert readback.read() == [] and not readback.due(2) and readback.due(3)


def test_readback_every_is_checked_and_auto_means_every_step_on_cpu():
    assert readback_interval(0, CPU) == 1 and readback_interval(0, torch.device("cuda")) == CUDA_READBACK_EVERY
    assert readback_interval(7, torch.device("cuda")) == 7
    with pytest.raises(ValueError, match="readback_every=-1 must be an integer >= 0"):
        Execution(readback_every=-1).validate(CPU)


def test_a_model_without_moe_layers_reads_back_an_empty_load(corpus, windows):
    """Every layer a dense MLP (dense_mlp_layers = n_layers): no load to balance, an empty expert_load, as before."""
    classic, _ = model_pair(_config(corpus, dense_mlp_layers=2), 0)
    result = train.train_lm(classic, BatchStream(windows.train, 4, 0), windows.val[:4], NAN_TCFG, CPU, "no-moe",
                            run=Execution(readback_every=3))
    assert result["final"]["expert_load"] == [] and len(result["curves"]["train_loss"]) == 1
