import pytest

from config import PRESETS, build_configs, config_for_length


def test_presets_build_and_default_matches_the_research_plan():
    model, train, data, exp = build_configs(preset="default")
    assert (model.d_model, model.n_layers, model.n_heads, model.d_ff) == (256, 4, 8, 512)
    assert (model.num_experts, model.expert_top_k, model.indexer_heads, model.indexer_dim) == (4, 2, 4, 64)
    assert (train.warmup_steps, train.steps, train.batch_size, exp.seeds, exp.seq_lens) == (
        200, 1000, 16, [42], [64, 128, 256])
    m, d = config_for_length(model, data, exp, 256, 4096)
    assert m.sparse_top_k == 128 and d.seq_len == 256  # k = L / 2
    for name in PRESETS:
        build_configs(preset=name)


@pytest.mark.parametrize("overrides, fragment", [
    ({"d_modle": 64}, "unknown config key(s) ['d_modle']"),
    ({"d_model": 30, "n_heads": 4}, "not divisible by n_heads"),
    ({"sparse_top_k": 0}, "sparse_top_k=0 must be > 0"),
    ({"seq_lens": [64, 512], "max_seq_len": 256}, "exceed max_seq_len=256"),
    ({"attention_backend": "cuda-magic"}, "attention_backend='cuda-magic' is unknown"),
    ({"top_k_ratio": 0.0}, "top_k_ratio"),
    ({"expert_top_k": 5}, "exceeds num_experts"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"val_fraction": 1.5}, "val_fraction"),
])
def test_bad_values_are_rejected_with_the_key_named(overrides, fragment):
    with pytest.raises(ValueError) as err:
        build_configs(overrides, preset="quick")
    assert fragment in str(err.value)


def test_unknown_key_error_lists_valid_keys():
    with pytest.raises(ValueError, match="valid keys are: .*d_model"):
        build_configs({"nope": 1})


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset='huge' is unknown"):
        build_configs(preset="huge")
