"""Invalid layouts and model configs are refused with messages naming the field and the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from model_helpers import tiny_spec
from shardwright.config import ModelSpec, ParallelLayout
from shardwright.hf_config import spec_fields_from_hf


def test_layout_world_size_and_defaults():
    assert ParallelLayout().world_size == 1
    assert ParallelLayout(tp=2, pp=3, cp=2, dp=2).world_size == 24


@pytest.mark.parametrize("field", ["tp", "pp", "cp", "dp"])
def test_layout_rejects_non_positive_sizes(field):
    with pytest.raises(ValidationError, match=field):
        ParallelLayout(**{field: 0})


def test_layout_rejects_unknown_fields():
    with pytest.raises(ValidationError, match="tensor_parallel"):
        ParallelLayout(tensor_parallel=2)


def test_tp_must_divide_heads_and_names_the_choices():
    spec = tiny_spec("llama", num_heads=4, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"tp=3 does not divide num_heads=4; choose tp in \[1, 2, 4\]"):
        ParallelLayout(tp=3).validate_for(spec)


def test_kv_heads_split_or_replicated():
    spec = tiny_spec("llama", num_heads=8, num_kv_heads=2, hidden_size=128, head_dim=16)
    ParallelLayout(tp=2).validate_for(spec)  # split: one kv head per rank
    ParallelLayout(tp=8).validate_for(spec)  # replicated: each kv head on 4 ranks
    spec6 = tiny_spec("llama", num_heads=12, num_kv_heads=4, hidden_size=192, head_dim=16,
                      intermediate_size=192)
    with pytest.raises(ValueError, match="tp=6 and num_kv_heads=4: one must divide the other"):
        ParallelLayout(tp=6).validate_for(spec6)


def test_pp_larger_than_layers():
    with pytest.raises(ValueError, match="pp=3 exceeds num_layers=2"):
        ParallelLayout(pp=3).validate_for(tiny_spec("gpt2"))


def test_several_problems_are_reported_together():
    with pytest.raises(ValueError) as err:
        ParallelLayout(tp=3, pp=5).validate_for(tiny_spec("llama"))
    assert "num_heads" in str(err.value) and "num_layers" in str(err.value)


def test_model_spec_rejects_bad_values():
    with pytest.raises(ValidationError, match="num_kv_heads=3 must divide num_heads=4"):
        tiny_spec("llama", num_kv_heads=3)
    with pytest.raises(ValidationError, match="hidden_size"):
        tiny_spec("llama", hidden_size=-1)
    with pytest.raises(ValidationError, match="bogus"):
        tiny_spec("llama", bogus=1)


def test_hf_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model_type='bert' is not supported"):
        spec_fields_from_hf({"model_type": "bert"})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        spec_fields_from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                             "intermediate_size": 8, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        spec_fields_from_hf({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True})


def test_missing_config_json_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelSpec.from_hf_dir(tmp_path)


def test_missing_weights_say_how_to_save(tmp_path):
    from shardwright.models.checkpoint import CheckpointReader

    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        CheckpointReader(tmp_path)


def test_settings_ray_auth_mode_from_the_environment():
    from shardwright.config import Settings

    assert Settings.from_env({}).ray_auth_mode == "token"  # the local head serve starts is authenticated
    assert Settings.from_env({"RAY_AUTH_MODE": "DISABLED"}).ray_auth_mode == "disabled"
    with pytest.raises(ValueError, match="RAY_AUTH_MODE='tokn': Ray knows 'token' and 'disabled'"):
        Settings.from_env({"RAY_AUTH_MODE": "tokn"})
