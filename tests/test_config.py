"""The config schema: files, overrides, typos refused, and the saved form round-trips."""

from __future__ import annotations

import pytest

from esep_jax.cli import split_config_overrides
from esep_jax.config import Config, from_dict, load_config, read_config, save_config, to_dict
from esep_jax.errors import InputError


def test_overrides_are_typed():
    config = load_config(None, ["optim.learning_rate=3e-4", "train.batch_size=64", "model.head=mlp"])
    assert config.optim.learning_rate == 3e-4 and config.train.batch_size == 64 and config.model.head == "mlp"


@pytest.mark.parametrize("override, fragment", [
    ("optim.learning_rat=1", "unknown config field"), ("nosection.x=1", "unknown config section"),
    ("train.batch_size=big", "cannot parse 'big' as int"), ("model.head=transformer", "must be one of"),
    ("loss.temperature=0", "must be > 0"), ("train", "expected --config.FIELD=VALUE")])
def test_bad_overrides_are_refused(override, fragment):
    with pytest.raises(InputError, match=fragment):
        load_config(None, [override])


def test_config_files_and_saved_copies(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("from esep_jax.config import Config\n\ndef get_config():\n    c = Config()\n"
                    "    c.loss.temperature = 0.02\n    return c\n")
    config = load_config(str(path), ["loss.recovery_weight=0.5"])
    assert (config.loss.temperature, config.loss.recovery_weight) == (0.02, 0.5)
    save_config(config, tmp_path / "config.json")
    assert read_config(tmp_path / "config.json") == config
    with pytest.raises(InputError, match="unknown fields"):
        from_dict({**to_dict(Config()), "loss": {"temprature": 1.0}})


def test_repository_configs_load():
    import pathlib
    for path in sorted(pathlib.Path(__file__).resolve().parents[1].glob("configs/*.py")):
        assert isinstance(load_config(str(path)), Config), path


def test_cli_override_syntax():
    rest, overrides = split_config_overrides(["train", "--config.a.b=1", "--data", "x", "--config.c.d", "2"])
    assert rest == ["train", "--data", "x"] and overrides == ["a.b=1", "c.d=2"]


def test_select_metric_must_be_computed():
    assert load_config(None, ["train.select_metric=recall@100"]).train.select_metric == "recall@100"
    with pytest.raises(InputError, match="select_metric"):
        load_config(None, ["train.select_metric=ndcg@7"])
