"""The config schema: locked and typed everywhere — files, overrides, saved copies — and one loader."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from esep_jax.cli import main, split_config_overrides
from esep_jax.config import (Config, LossConfig, from_dict, load_config, load_config_file, override, read_config,
                             save_config, to_dict)
from esep_jax.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_overrides_are_typed():
    config = load_config(None, ["optim.learning_rate=3e-4", "train.batch_size=64", "model.head=mlp",
                                "ensemble.members=2", "ensemble.temperature=0.05,0.1", "loss.matryoshka_dims=64,128"])
    assert config.optim.learning_rate == 3e-4 and config.train.batch_size == 64 and config.model.head == "mlp"
    assert config.ensemble.temperature == (0.05, 0.1) and config.loss.matryoshka_dims == (64, 128)


@pytest.mark.parametrize("change, fragment", [
    ("optim.learning_rat=1", "config.optim.learning_rat: unknown config field"),
    ("nosection.x=1", "unknown config field (sections"), ("train.batch_size=big", "cannot parse 'big' as int"),
    ("model.head=transformer", "cannot parse 'transformer' as one of 'linear', 'lowrank', 'mlp'"),
    ("loss.temperature=0", "must be > 0"), ("loss.temperature=nan", "must be > 0"),
    ("train", "expected --config.FIELD=VALUE"), ("ensemble.members=2", "1 values for 2 members"),
    ("loss.matryoshka_dims=a,b", "cannot parse 'a'")])
def test_bad_overrides_are_refused(change, fragment):
    if change == "ensemble.members=2":
        with pytest.raises(InputError, match=fragment):
            load_config(None, [change, "ensemble.dropout=0.1"])
        return
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [change])


def test_sections_are_frozen_keyword_only_with_literal_choices():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.loss.temperature = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError, match="temprature"):  # no new attribute either
        config.loss.temprature = 0.5
    with pytest.raises(TypeError):
        LossConfig(0.5)  # keyword-only
    assert typing.get_origin(typing.get_type_hints(LossConfig)["kind"]) is typing.Literal


def test_a_typo_in_a_config_file_is_one_line_naming_the_field(tmp_path, capsys):
    path = tmp_path / "typo.py"
    path.write_text("from esep_jax.config import Config\n\ndef get_config():\n    c = Config()\n"
                    "    c.loss.temprature = 0.5\n    return c\n")
    with pytest.raises(InputError, match="temprature"):
        load_config_file(str(path))
    constructor = tmp_path / "constructor.py"
    constructor.write_text("from esep_jax.config import Config, LossConfig\n\n"
                           "def get_config():\n    return Config(loss=LossConfig(temprature=0.5))\n")
    with pytest.raises(InputError, match="temprature"):
        load_config_file(str(constructor))
    dotted = tmp_path / "dotted.py"
    dotted.write_text("from esep_jax.config import Config, override\n\n"
                      "def get_config():\n    return override(Config(), {'loss.temprature': 0.5})\n")
    with pytest.raises(InputError, match="config.loss.temprature: unknown config field"):
        load_config_file(str(dotted))
    assert main(["train", "--data", str(tmp_path), "--workdir", str(tmp_path / "run"), "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "temprature" in error and error.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_wrong_type_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "wrong.py"
    path.write_text("from esep_jax.config import Config, LossConfig\n\n"
                    "def get_config():\n    return Config(loss=LossConfig(temperature='warm'))\n")
    with pytest.raises(InputError, match="config.loss.temperature: expected float, got 'warm'"):
        load_config_file(str(path))


def test_config_files_variants_and_saved_copies(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("from esep_jax.config import Config, override\n\n"
                    "def get_config(variant=''):\n"
                    "    return override(Config(), {'loss.temperature': 0.02 if variant == 'cold' else 0.07})\n")
    config = load_config(str(path) + ":cold", ["loss.recovery_weight=0.5"])
    assert (config.loss.temperature, config.loss.recovery_weight) == (0.02, 0.5)
    assert load_config(str(path)).loss.temperature == 0.07
    save_config(config, tmp_path / "config.json")
    assert read_config(tmp_path / "config.json") == config


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d["loss"].update(temprature=1.0), "unknown field 'temprature'"),
    (lambda d: d["train"].update(batch_size="many"), "config.train.batch_size: expected int, got 'many'"),
    (lambda d: d.update(extra={}), "unknown section 'extra'"),
    (lambda d: d["model"].update(head="transformer"), "config.model.head: expected one of"),
])
def test_a_hand_edited_config_json_is_one_clear_error(tmp_path, edit, fragment):
    data = to_dict(Config())
    edit(data)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=fragment):
        read_config(tmp_path / "config.json")


def test_old_comma_strings_in_saved_configs_are_read_as_tuples():
    data = to_dict(Config())
    data["ensemble"].update(members=2, learning_rate="1e-3,2e-3")
    assert from_dict(data).ensemble.learning_rate == (1e-3, 2e-3)


def test_override_checks_values_and_accepts_ints_for_floats():
    config = override(Config(), {"optim.weight_decay": 3, "ensemble.members": 2, "ensemble.temperature": [0.05, 1]})
    assert config.optim.weight_decay == 3.0 and isinstance(config.optim.weight_decay, float)
    assert config.ensemble.temperature == (0.05, 1.0)
    with pytest.raises(InputError, match="config.train.seed: expected int"):
        override(Config(), {"train.seed": 1.5})


def test_repository_configs_load_with_their_variants():
    for path in sorted((REPO / "configs").glob("*.py")):
        assert isinstance(load_config(str(path)), Config), path
    assert load_config(str(REPO / "configs/drift.py:demo")).loss.negatives == "judged"
    assert load_config(str(REPO / "configs/drift_reverse.py:demo")).model.head == "linear"
    for variant in ("to_minilm", "to_e5", "to_minilm_mse", "to_e5_mse", "to_minilm_demo", "to_e5_demo"):
        assert load_config(str(REPO / f"configs/drift_e5.py:{variant}")).model.head == "linear"
    with pytest.raises(InputError, match="unknown variant"):
        load_config(str(REPO / "configs/drift.py:nope"))


def test_cli_override_syntax():
    rest, overrides = split_config_overrides(["train", "--config.a.b=1", "--data", "x", "--config.c.d", "2"])
    assert rest == ["train", "--data", "x"] and overrides == ["a.b=1", "c.d=2"]


def test_select_metric_must_be_computed():
    assert load_config(None, ["train.select_metric=recall@100"]).train.select_metric == "recall@100"
    with pytest.raises(InputError, match="select_metric"):
        load_config(None, ["train.select_metric=ndcg@7"])
