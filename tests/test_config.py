"""TrainConfig validation: every bad input is a ConfigError whose message starts with the field's name."""

from __future__ import annotations

import json

import pytest

from misa_train.config import (
    FIELDS,
    ConfigError,
    TrainConfig,
    check_resume_compatible,
    load_config,
    validate_against_model,
)


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = TrainConfig().validate()
    assert (cfg.method, cfg.rule, cfg.delta, cfg.eta, cfg.period) == ("misa", "misa_norm", 0.03, 1.0, 20)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_config(path) == cfg


def test_every_field_has_help():
    assert all(f.metadata.get("help") for f in FIELDS.values())


@pytest.mark.parametrize("overrides, field", [
    ({"method": "sgd"}, "method"),
    ({"rule": "lisa"}, "rule"),
    ({"task": "chat"}, "task"),
    ({"dtype": "fp16"}, "dtype"),
    ({"on_nan": "ignore"}, "on_nan"),
    ({"device": "tpu"}, "device"),
    ({"delta": 0}, "delta"),
    ({"delta": 1.5}, "delta"),
    ({"delta": -0.1}, "delta"),
    ({"lr": 0}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"betas": [0.9]}, "betas"),
    ({"betas": [0.9, 1.0]}, "betas"),
    ({"ema_beta": 1.0}, "ema_beta"),
    ({"depth_bias": -1.0}, "depth_bias"),
    ({"depth_bias": float("nan")}, "depth_bias"),
    ({"depth_bias": float("inf")}, "depth_bias"),
    ({"depth_bias": 1.0, "method": "lisa"}, "depth_bias"),
    ({"period": 0}, "period"),
    ({"max_steps": 0}, "max_steps"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"max_seq_len": 4}, "max_seq_len"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"reweight": "maybe"}, "reweight"),
    ({"data": "/no/such/file.jsonl"}, "data"),
    ({"model": "./no/such/model"}, "model"),
    ({"resume": "/no/such/run"}, "resume"),
    ({"deltaa": 0.1}, "deltaa"),
])
def test_bad_input_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert msg.startswith(f"{field}:") and "\n" not in msg


def test_unknown_choice_lists_the_choices():
    with pytest.raises(ConfigError, match="misa, lisa, badam, full, lora"):
        load_config(None, {"method": "adam"})


def test_yaml_strings_are_coerced(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; the config must still take it as a number
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nmethod: lisa\nreweight: yes\nbetas: [0.8, 0.99]\n")
    cfg = load_config(path, {"max_steps": "7"})
    assert cfg.lr == 1e-4 and cfg.method == "lisa" and cfg.reweight is True
    assert cfg.betas == (0.8, 0.99) and cfg.max_steps == 7


def test_bad_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="^config:"):
        load_config(path)
    with pytest.raises(ConfigError, match="^config:"):
        load_config(tmp_path / "missing.yaml")


def test_binary_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"^config: .*model\.safetensors is not a text file"):
        load_config(path)


class _M:
    def __init__(self, size, layer):
        self.size, self.layer, self.name, self.kind = size, layer, f"m{layer}", "q"


def test_validate_against_model():
    mods = [_M(100, 0), _M(400, 0), _M(100, 1), _M(400, 1)]
    validate_against_model(TrainConfig(delta=0.1), mods, 1000, 512)
    with pytest.raises(ConfigError, match="^delta:.*smallest module"):
        validate_against_model(TrainConfig(delta=0.05), mods, 1000, 512)
    with pytest.raises(ConfigError, match="^max_seq_len:"):
        validate_against_model(TrainConfig(delta=0.5, max_seq_len=1024), mods, 1000, 512)
    with pytest.raises(ConfigError, match="^lisa_layers:"):
        validate_against_model(TrainConfig(method="lisa", lisa_layers=3), mods, 1000, 512)
    with pytest.raises(ConfigError, match="^badam_layers:"):
        validate_against_model(TrainConfig(method="badam", badam_layers=5), mods, 1000, 512)


def test_resume_compatibility():
    saved = TrainConfig().to_dict()
    check_resume_compatible(TrainConfig(max_steps=500, lr=3e-4), saved, 1, 1)  # schedule may change
    with pytest.raises(ConfigError, match="^resume:.*method"):
        check_resume_compatible(TrainConfig(method="lora"), saved, 1, 1)
    with pytest.raises(ConfigError, match="^resume:.*model"):
        check_resume_compatible(TrainConfig(model="other"), saved, 1, 1)
    with pytest.raises(ConfigError, match="^resume:.*seed=0.*seed=1"):
        check_resume_compatible(TrainConfig(seed=1), saved, 1, 1)  # the seed picks the data split
    with pytest.raises(ConfigError, match="^resume:.*world size"):
        check_resume_compatible(TrainConfig(), saved, 2, 1)


def test_reweight_needs_a_rule_with_inclusion_probabilities():
    with pytest.raises(ConfigError, match="^reweight: rule misa"):
        TrainConfig(method="misa", rule="misa", reweight=True).validate()
    TrainConfig(method="misa", rule="misa_norm", reweight=True).validate()
