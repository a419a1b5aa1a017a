"""torchrun DDP: 2 gloo processes, each training on its half of every global batch, log the same losses (and end
with the same weights) as 1 process on the whole batch — DSA warm-up KL, sparse stage (LM + KL + MoE balancing),
and a task whose ignored targets (-100) fall unevenly across the ranks' halves."""

import pytest
import torch
import torch.multiprocessing as mp

from dsa_lab.common import distributed
from conftest import tiny_model_config
from config import TrainConfig
from dsa_lab.training.data import BatchStream
from dsa_lab.training.train import dense_stage, run_stage, sparse_from_state, sparse_stage, warmup_stage

TCFG = TrainConfig(batch_size=4, steps=6, warmup_steps=3, eval_every=3, eval_windows=4, profile_steps=1,
                   learning_rate=1e-2, warmup_lr=1e-2)
CFG = tiny_model_config(vocab_size=64, max_seq_len=16, sparse_top_k=4)


class MaskedStream:
    """Seeded (inputs, targets) batches with -100 (not scored) targets, far more of them in the second half of
    each batch (rank 1's slice) than in the first: the per-rank means differ from the global mean."""

    def __init__(self, seed: int):
        self.step, self.seed = 0, seed

    def next(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.step)
        self.step += 1
        inputs = torch.randint(0, CFG.vocab_size, (TCFG.batch_size, 16), generator=g)
        targets = torch.randint(0, CFG.vocab_size, (TCFG.batch_size, 16), generator=g)
        keep = torch.rand(TCFG.batch_size, 16, generator=g) < torch.tensor([0.9, 0.9, 0.2, 0.1])[:, None]
        return inputs, targets.masked_fill(~keep, -100)


def train_all() -> dict:
    """Warm-up + sparse stage of a DSA model on text-like windows, and a dense stage on the masked task."""
    from models import ClassicAttentionMoELLM
    windows = torch.randint(0, CFG.vocab_size, (40, 17), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    classic = ClassicAttentionMoELLM(CFG)
    sparse = sparse_from_state(CFG, classic.state_dict(), seed=0)
    cpu = torch.device("cpu")
    rows = set()  # batch rows a training forward sees (this rank's slice)
    for model in (classic, sparse):
        model.register_forward_pre_hook(lambda m, args: rows.add(args[0].shape[0]) if m.training else None)
    warm = run_stage(sparse, warmup_stage(TCFG), BatchStream(windows, 4, 2), windows[:4], TCFG, cpu, "warm-up")
    stage2 = run_stage(sparse, sparse_stage(TCFG), BatchStream(windows, 4, 1), windows[:4], TCFG, cpu, "sparse")
    held = MaskedStream(99).next()
    masked = run_stage(classic, dense_stage(TCFG), MaskedStream(1), held, TCFG, cpu, "masked")
    return {"warm_kl": warm["step_indexer_kl"], "kl": stage2["step_indexer_kl"],
            "train_loss": stage2["curves"]["train_loss"], "val_loss": stage2["curves"]["val_loss"],
            "masked_train_loss": masked["curves"]["train_loss"], "masked_val_loss": masked["curves"]["val_loss"],
            "expert_load": stage2["final"]["expert_load"], "rows": sorted(rows),
            "sparse_state": sparse.state_dict(), "classic_state": classic.state_dict()}


def _worker(rank: int, world: int, init_file: str, out: str):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = train_all()
        torch.save(result, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_log_the_same_losses_as_one(tmp_path):
    torch.set_num_threads(1)
    single = train_all()
    out = str(tmp_path / "ddp")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1)]
    for name in ("warm_kl", "kl", "train_loss", "val_loss", "masked_train_loss", "masked_val_loss", "expert_load"):
        assert ranks[0][name] == ranks[1][name], name  # every rank logs the same global numbers
        assert torch.tensor(ranks[0][name]) == pytest.approx(torch.tensor(single[name]), rel=1e-4, abs=1e-6), name
    for state in ("sparse_state", "classic_state"):
        for k, v in single[state].items():
            assert torch.equal(ranks[0][state][k], ranks[1][state][k]), k  # replicas never drift apart
            assert torch.allclose(ranks[0][state][k], v, rtol=1e-4, atol=1e-4), k  # Adam amplifies float noise
    assert single["rows"] == [4] and ranks[0]["rows"] == ranks[1]["rows"] == [2]  # each rank trains on half
    bias = [k for k in single["sparse_state"] if k.endswith("balance_bias")]
    assert all(torch.equal(ranks[0]["sparse_state"][k], single["sparse_state"][k]) for k in bias)  # global loads
    print(f"\n1 process vs 2 gloo processes, sparse stage train loss: {single['train_loss']} vs {ranks[0]['train_loss']}"
          f"\nmasked-task train loss: {single['masked_train_loss']} vs {ranks[0]['masked_train_loss']}")


def test_a_global_batch_the_ranks_cannot_split_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="batch_size=3 is not divisible by the 2 torchrun processes") as info:
        distributed.check_batch(3)
    assert "\n" not in str(info.value)
    distributed.check_batch(4)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert torch.equal(distributed.shard(torch.arange(8).view(4, 2)), torch.tensor([[4, 5], [6, 7]]))


def test_per_rank_means_would_be_wrong_on_the_masked_task():
    """Why the LM loss under DDP is (rank sum) / (global count): the mean of the two halves' means is not the
    global mean when the halves score different numbers of targets (the mutation the test above guards)."""
    inputs, targets = MaskedStream(1).next()
    logits = torch.randn(*targets.shape, CFG.vocab_size, generator=torch.Generator().manual_seed(0))
    ce = torch.nn.functional.cross_entropy
    whole = ce(logits.flatten(0, 1), targets.flatten())
    halves = [ce(logits[i:i + 2].flatten(0, 1), targets[i:i + 2].flatten()) for i in (0, 2)]
    assert abs((halves[0] + halves[1]) / 2 - whole) > 1e-3


@pytest.mark.parametrize("script", ["benchmark", "sample", "visualize_attention"])
def test_single_process_runners_refuse_torchrun_in_one_line(script, monkeypatch, capsys, tmp_path):
    """Under torchrun each of N processes would run the whole job and write the same files: refused, exit 2."""
    import importlib
    monkeypatch.setenv("WORLD_SIZE", "2")
    module = importlib.import_module(script)
    argv = {"benchmark": [], "visualize_attention": ["--checkpoint", str(tmp_path / "none.pt")],
            "sample": ["--checkpoint", str(tmp_path / "none.pt"), "--prompt", "x"]}[script]
    try:
        code = module.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "WORLD_SIZE=2" in err and "one process" in err


def test_comprehensive_ablations_join_torchrun_and_only_rank_0_writes(monkeypatch, tmp_path):
    """run_comprehensive_ablations.py under torchrun: every rank joins the process group and runs the variants
    (ablations.run_variants is distributed: batch slices, rank-0 records); a rank other than 0 writes nothing."""
    from dsa_lab.experiments import ablations
    import run_comprehensive_ablations
    calls = []
    monkeypatch.setattr(distributed, "init_from_env", lambda device="auto": calls.append(("init", device)) or 2)
    monkeypatch.setattr(distributed, "shutdown", lambda: calls.append(("shutdown",)))
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(ablations, "run_variants", lambda *a, **k: calls.append(("run_variants",)) or [])
    assert run_comprehensive_ablations.main(["--out", str(tmp_path / "abl"), "--device", "cpu"]) == 0
    assert calls == [("init", "cpu"), ("run_variants",), ("shutdown",)]
    assert not (tmp_path / "abl" / "summary.json").exists() and not (tmp_path / "abl" / "REPORT.md").exists()
