"""Exact resume: a stage stopped after N steps and resumed from its checkpoint logs every loss bit for bit as an
uninterrupted run does (model, optimizer, schedule, stream position, every RNG, MoE balancing biases restored)."""
import dataclasses

import pytest
import torch

from dsa_lab.training import train
from conftest import tiny_model_config
from config import TrainConfig
from dsa_lab.training.data import BatchStream, build_windows
from dsa_lab.common.results_io import CorruptFile
from sparse_attention import AttentionMode
from selection_checks import single_thread  # noqa: F401  (autouse fixture: one torch thread)
from dsa_lab.training.train import Execution, checkpointed, run_stage, sparse_from_state, sparse_stage, warmup_stage

TCFG = TrainConfig(batch_size=4, steps=9, warmup_steps=4, eval_every=3, eval_windows=4, profile_steps=1,
                   learning_rate=1e-2, warmup_lr=1e-2)


class KillAt:
    """A batch stream that dies (like a killed process) when asked for batch number `at`."""

    def __init__(self, stream, at: int):
        self.stream, self.at, self.calls = stream, at, 0

    def next(self):
        if self.calls == self.at:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.stream.next()

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def _train(windows, cfg, run: Execution, kill_at: int | None = None):
    """Warm-up then sparse stage of one sparse model from a fixed init; -> (warm-up result, sparse result, model)."""
    torch.manual_seed(0)
    from models import ClassicAttentionMoELLM
    model = sparse_from_state(cfg, ClassicAttentionMoELLM(cfg).state_dict(), seed=0)
    val, stage, warm = windows.val[:4], sparse_stage(TCFG), None
    if cfg.selection_source == "indexer":
        warm = run_stage(model, warmup_stage(TCFG), BatchStream(windows.train, 4, 2), val, TCFG, torch.device("cpu"),
                         "warm-up", run=run.named("warmup"))
    else:  # an indexer-free control: no warm-up, no KL (as long_context trains it)
        stage = dataclasses.replace(stage, mode=AttentionMode(sparse=True), indexer_lr=None)
    stream = BatchStream(windows.train, 4, 1)
    stream = KillAt(stream, kill_at) if kill_at is not None else stream
    sparse = run_stage(model, stage, stream, val, TCFG, torch.device("cpu"), "sparse", run=run.named("sparse"))
    return warm, sparse, model


def _logged(result: dict | None) -> str:
    """Every logged loss and metric (not the timings) as text: repr of a float is exact, and NaN equals NaN."""
    if result is None:
        return "None"
    curves = {k: v for k, v in result["curves"].items() if k != "time_per_step"}
    return repr({"curves": curves, "kl": result["step_indexer_kl"], "before": result["before"]})


@pytest.mark.parametrize("selection_source, readback_every, kill_at", [("indexer", 0, 7), ("random", 0, 7),
                                                                     ("indexer", 3, 5)])
def test_a_killed_stage_resumes_to_the_bit(tmp_path, corpus, selection_source, readback_every, kill_at):
    """Killed after step 7 of 9 (checkpoints every 2 steps: the newest, step 6, is resumed), then resumed: every
    logged loss, the final weights and the MoE balancing biases equal an uninterrupted run's exactly. The random
    selection control draws from its own generator, which is restored too. Reading the per-step scalars back every
    3 steps changes none of it: killed after step 5, the run resumes from step 4's checkpoint, whose step 3 was
    read back by the checkpoint itself (neither an evaluation nor the interval fell there)."""
    windows = build_windows(corpus, 16)
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, max_seq_len=16, sparse_top_k=4,
                            selection_source=selection_source)
    ref_warm, ref_sparse, ref_model = _train(windows, cfg, Execution())

    run = checkpointed(Execution(checkpoint_every=2, readback_every=readback_every), tmp_path / "ckpt", "key",
                       overwrite=False)
    with pytest.raises(KeyboardInterrupt):
        _train(windows, cfg, run, kill_at=kill_at)
    left = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    warmup_done = ["warmup.done.pt"] if selection_source == "indexer" else []
    newest_two = [f"sparse.step{step:09d}.pt" for step in (kill_at - 3, kill_at - 1)]
    assert left == ["run.json", *newest_two, *warmup_done]

    with pytest.raises(ValueError, match="holds checkpoints of an interrupted run; pass --resume"):
        checkpointed(Execution(checkpoint_every=2), tmp_path / "ckpt", "key", overwrite=False)
    with pytest.raises(ValueError, match="made with a different config"):
        checkpointed(Execution(checkpoint_every=2, resume=True), tmp_path / "ckpt", "other", overwrite=False)
    resumed = checkpointed(Execution(checkpoint_every=2, resume=True, readback_every=readback_every),
                           tmp_path / "ckpt", "key", overwrite=False)
    warm, sparse, model = _train(windows, cfg, resumed)

    assert _logged(warm) == _logged(ref_warm)
    assert _logged(sparse) == _logged(ref_sparse)  # float ==: bit for bit
    assert sparse["curves"]["steps"] == [3, 6, 9] and len(sparse["curves"]["train_loss"]) == 3
    state, ref_state = model.state_dict(), ref_model.state_dict()
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    bias = [k for k in ref_state if k.endswith("balance_bias")]
    assert bias and any(ref_state[k].abs().sum() > 0 for k in bias)  # the biases moved, and were restored
    assert sparse["final"]["expert_load"] == ref_sparse["final"]["expert_load"]


def test_resume_without_the_step_checkpoints_restarts_the_stage_and_a_corrupt_one_is_named(tmp_path, corpus):
    windows = build_windows(corpus, 16)
    cfg = tiny_model_config(vocab_size=corpus.tokenizer.vocab_size, max_seq_len=16, sparse_top_k=4)
    run = checkpointed(Execution(checkpoint_every=3), tmp_path / "ckpt", "key", overwrite=False)
    with pytest.raises(KeyboardInterrupt):
        _train(windows, cfg, run, kill_at=4)
    newest = tmp_path / "ckpt" / "sparse.step000000003.pt"
    newest.write_bytes(newest.read_bytes()[:500])  # e.g. a disk that filled up under an older, non-atomic writer
    resumed = dataclasses.replace(run, resume=True)
    with pytest.raises(CorruptFile, match=r"sparse.step000000003.pt is truncated or corrupt .*delete it") as info:
        _train(windows, cfg, resumed)
    assert "\n" not in str(info.value)
    newest.unlink()  # the fix: the stage restarts from its beginning (the warm-up stays finished)
    ref_warm, ref_sparse, _ = _train(windows, cfg, Execution())
    warm, sparse, _ = _train(windows, cfg, resumed)
    assert _logged(sparse) == _logged(ref_sparse) and _logged(warm) == _logged(ref_warm)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["run.json", "sparse.done.pt", "warmup.done.pt"]
    train.discard_checkpoints(resumed)
    assert not (tmp_path / "ckpt").exists()


def test_overwrite_discards_an_interrupted_runs_checkpoints(tmp_path):
    folder = tmp_path / "ckpt"
    checkpointed(Execution(checkpoint_every=1), folder, "key", overwrite=False)
    (folder / "sparse.step000000001.pt").write_bytes(b"x")
    run = checkpointed(Execution(checkpoint_every=1), folder, "key", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["run.json"] and run.folder == folder and run.key == "key"


def _killing_stream(after_calls: int):
    """A data.BatchStream whose process 'dies' (KeyboardInterrupt, as Ctrl-C or a kill would) at its
    `after_calls`-th batch, counted over every stream of the process."""
    from dsa_lab.training.data import BatchStream as Real
    calls = [0]

    class Killing(Real):
        def next(self):
            if calls[0] == after_calls:
                raise KeyboardInterrupt("killed")
            calls[0] += 1
            return super().next()
    Killing.calls = calls
    return Killing


def _losses(record: dict) -> str:
    """Every logged loss/metric of a run record, timings left out (repr: exact, NaN == NaN)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()
                    if "time" not in k and not k.endswith("_ms") and "memory" not in k and "rss" not in k
                    and "tokens_per_s" not in k
                    and k not in ("wall_time_s", "environment", "profiled_forward_ms")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return repr(strip(record))


def test_sparse_vs_classic_killed_in_the_sparse_stage_resumes_to_the_same_record(tmp_path, corpus, monkeypatch,
                                                                                   capsys):
    """run_experiment.py --checkpoint-every 2, killed at step 3 of the sparse stage (pre-training, classic and
    warm-up finished), then --resume: the run record equals an uninterrupted run's in every logged number."""
    import json

    import run_experiment
    from test_run_experiment import TINY
    argv = ["--preset", "quick", "--seq-lens", "16", "--steps", "4", "--warmup-steps", "3", "--dense-steps", "5",
            "--seeds", "1", "--device", "cpu"]
    monkeypatch.setattr(run_experiment, "CONFIG", {**TINY, "cache_dir": str(tmp_path / "cache")})
    assert run_experiment.main(argv + ["--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "killed"
    monkeypatch.setattr(train, "BatchStream", _killing_stream(5 + 4 + 3 + 3))
    assert run_experiment.main(argv + ["--out", str(out), "--checkpoint-every", "2"]) == 130
    folder = out / "seq_16" / "resume" / "seed_1"
    assert sorted(p.name for p in folder.iterdir()) == ["classic.done.pt", "pretrain.done.pt", "run.json",
                                                        "sparse.step000000002.pt", "warmup.done.pt"]
    monkeypatch.setattr(train, "BatchStream", BatchStream)
    capsys.readouterr()
    assert run_experiment.main(argv + ["--out", str(out), "--checkpoint-every", "2"]) == 2  # no silent restart
    err = capsys.readouterr().err.strip()
    assert str(folder) in err and "--resume" in err and "\n" not in err
    counting = _killing_stream(-1)
    monkeypatch.setattr(train, "BatchStream", counting)
    assert run_experiment.main(argv + ["--out", str(out), "--checkpoint-every", "2", "--resume"]) == 0
    assert counting.calls == [2]  # finished stages replayed from disk; the sparse stage went on from step 2
    assert not (out / "seq_16" / "resume").exists()  # a finished run keeps no resume checkpoints
    ref = json.loads((tmp_path / "ref" / "seq_16" / "runs" / "seed_1.json").read_text())
    got = json.loads((out / "seq_16" / "runs" / "seed_1.json").read_text())
    assert _losses(got["results"]) == _losses(ref["results"])
    assert got["results"]["sparse"]["curves"]["train_loss"] == ref["results"]["sparse"]["curves"]["train_loss"]


def test_long_context_killed_inside_a_model_resumes_to_the_same_record(tmp_path, corpus, monkeypatch):
    import json

    from dsa_lab.experiments import long_context, tasks  # the lm task draws its batches from tasks.BatchStream
    from test_long_context import TINY
    monkeypatch.setattr(long_context, "load_corpus", lambda cfg: corpus)
    settings = {**TINY, "seq_lens": [32], "seeds": [1]}
    long_context.run_long_context("quick", ["lm"], ["dense", "dsa"], dict(settings), tmp_path / "ref", False)
    out = tmp_path / "killed"
    monkeypatch.setattr(tasks, "BatchStream", _killing_stream(3 + 4 + 3 + 3))  # branch, dense, warm-up, dsa
    with pytest.raises(KeyboardInterrupt):
        long_context.run_long_context("quick", ["lm"], ["dense", "dsa"], dict(settings), out, False,
                                      run=Execution(checkpoint_every=2))
    folder = out / "records" / "lm" / "L32" / "seed1"
    assert (folder / "dense.json").exists() and not (folder / "dsa.json").exists()
    assert sorted(p.name for p in (folder / "resume" / "dsa").iterdir()) == ["run.json", "train.step000000002.pt",
                                                                             "warmup.done.pt"]
    counting = _killing_stream(-1)
    monkeypatch.setattr(tasks, "BatchStream", counting)
    long_context.run_long_context("quick", ["lm"], ["dense", "dsa"], dict(settings), out, False,
                                  run=Execution(checkpoint_every=2, resume=True))
    for name in ("dense", "dsa"):
        ref = json.loads((tmp_path / "ref" / "records" / "lm" / "L32" / "seed1" / f"{name}.json").read_text())
        got = json.loads((folder / f"{name}.json").read_text())
        assert _losses(got) == _losses(ref), name
    assert not (folder / "resume" / "dsa").exists() and counting.calls == [2]  # dsa went on from step 2 of 4


def test_adaptive_sparsity_killed_inside_a_model_resumes_to_the_same_record(tmp_path, corpus, monkeypatch):
    """Killed at step 3 of the adaptive model's sparse stage, then resumed: every record equals an uninterrupted
    run's in every logged number, and only the remaining step's batch is drawn."""
    import json

    from dsa_lab.experiments import adaptive_sparsity, tasks  # the lm task draws its batches from tasks.BatchStream
    from test_adaptive_sparsity import TINY
    monkeypatch.setattr(adaptive_sparsity, "load_corpus", lambda cfg: corpus)
    settings, models = {**TINY, "seeds": [1], "steps": 4}, ["dense", "adaptive"]
    adaptive_sparsity.run_adaptive_sparsity("quick", models, dict(settings), tmp_path / "ref", False)
    out = tmp_path / "killed"
    monkeypatch.setattr(tasks, "BatchStream", _killing_stream(2 + 2 + 4 + 3))  # branch, warm-up, dense, adaptive
    with pytest.raises(KeyboardInterrupt):
        adaptive_sparsity.run_adaptive_sparsity("quick", models, dict(settings), out, False,
                                                run=Execution(checkpoint_every=2))
    folder = out / "records" / "L32" / "seed1"
    assert (folder / "dense.json").exists() and not (folder / "adaptive.json").exists()
    assert sorted(p.name for p in (folder / "resume" / "adaptive").iterdir()) == ["run.json", "train.step000000002.pt"]
    counting = _killing_stream(-1)
    monkeypatch.setattr(tasks, "BatchStream", counting)
    adaptive_sparsity.run_adaptive_sparsity("quick", models, dict(settings), out, False,
                                            run=Execution(checkpoint_every=2, resume=True))
    for name in models:
        ref = json.loads((tmp_path / "ref" / "records" / "L32" / "seed1" / f"{name}.json").read_text())
        got = json.loads((folder / f"{name}.json").read_text())
        assert _losses(got) == _losses(ref), name
    assert not (folder / "resume").exists() and counting.calls == [2]  # adaptive went on from step 2 of 4
