"""--dtype / --compile and the throughput figures: bf16 autocast keeps fp32 master weights and trains close to
fp32; what cannot run on CPU is refused in one line; tokens/s and the model-FLOPs count follow their definitions."""
import math

import pytest
import torch

import run_experiment
from dsa_lab.training import train
from conftest import tiny_model_config
from config import TrainConfig
from dsa_lab.training.data import BatchStream
from selection_checks import single_thread  # noqa: F401  (autouse fixture: one torch thread)
from dsa_lab.training.train import Execution, run_stage, sparse_from_state, sparse_stage

TCFG = TrainConfig(batch_size=4, steps=6, eval_every=3, eval_windows=4, profile_steps=1, learning_rate=1e-2)


@pytest.mark.parametrize("attention", [dict(attention_backend="gather"), dict(attention_type="mla",
                                                                              attention_backend="gather")])
def test_bf16_autocast_trains_close_to_fp32_with_fp32_master_weights(attention):
    """The bf16 path (CUDA autocast in a run; CPU autocast here, the same code) runs the sparse stage: LM, KL and
    MoE in bf16 matmuls; weights and optimizer state stay fp32; the losses stay within bf16 noise of fp32's."""
    cfg = tiny_model_config(max_seq_len=16, sparse_top_k=4, **attention)
    windows = torch.randint(0, cfg.vocab_size, (40, 17), generator=torch.Generator().manual_seed(0))
    results = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        from models import ClassicAttentionMoELLM
        model = sparse_from_state(cfg, ClassicAttentionMoELLM(cfg).state_dict(), seed=0)
        results[dtype] = run_stage(model, sparse_stage(TCFG), BatchStream(windows, 4, 1), windows[:4], TCFG,
                                   torch.device("cpu"), "sparse", run=Execution(dtype=dtype))
        assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32, bf16 = results["fp32"]["curves"], results["bf16"]["curves"]
    assert bf16["train_loss"] != fp32["train_loss"]  # autocast was on
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], abs=0.05)
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], abs=0.05)
    assert all(math.isfinite(v) for v in results["bf16"]["step_indexer_kl"])


def test_what_cannot_run_on_cpu_is_refused_in_one_line(capsys, tmp_path):
    cpu = torch.device("cpu")
    for run, fragment in ((Execution(dtype="bf16"), "--dtype bf16 runs CUDA autocast"),
                          (Execution(compile=True), "--compile (torch.compile) is for CUDA runs"),
                          (Execution(dtype="fp16"), "dtype='fp16' is unknown"),
                          (Execution(checkpoint_every=-1), "checkpoint_every=-1")):
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            run.validate(cpu)
    Execution(dtype="fp32", checkpoint_every=5).validate(cpu)
    for flags in (["--dtype", "bf16"], ["--compile"]):
        code = run_experiment.main(["--preset", "quick", "--seq-lens", "16", "--device", "cpu", "--out",
                                    str(tmp_path)] + flags)
        err = capsys.readouterr().err.strip()
        assert code == 2 and "CUDA" in err and "\n" not in err
    assert not (tmp_path / "summary.json").exists()


def test_tokens_per_second_and_model_flops_follow_their_definitions():
    from models import ClassicAttentionMoELLM
    cfg = tiny_model_config(max_seq_len=16)
    model = ClassicAttentionMoELLM(cfg)
    windows = torch.randint(0, cfg.vocab_size, (40, 17), generator=torch.Generator().manual_seed(0))
    final = run_stage(model, train.dense_stage(TCFG), BatchStream(windows, 4, 1), windows[:4], TCFG,
                      torch.device("cpu"), "dense")["final"]
    assert final["tokens_per_s"] == pytest.approx(4 * 16 / final["avg_time_per_step"])
    assert math.isnan(final["model_flops_utilization"])  # CPU: no datasheet peak, no MFU
    # active parameters: everything but the routed experts a token does not use (top-2 of 4: half of them)
    expert = sum(p.numel() for p in model.blocks[0].ffn.experts[0].parameters())
    routed = cfg.n_layers * cfg.num_experts * expert
    active = sum(p.numel() for p in model.parameters()) - routed // 2
    assert train.model_flops_per_token(model, 16) == 6 * active + 12 * cfg.n_layers * cfg.d_model * 8.5
    assert train.model_flops_per_token(model, 16, mean_keys=4.0) == 6 * active + 12 * cfg.n_layers * cfg.d_model * 4
    assert train.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert train.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12 and train.peak_bf16_flops("NVIDIA H200") == 989e12
    assert train.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12 and train.peak_bf16_flops("NVIDIA L4") == 121e12
    assert train.peak_bf16_flops("Some GPU") is None
