"""A sweep on NFCorpus: `esep-jax sweep --config configs/sweep_nfcorpus.py --data DIR --workdir W`.

Learning rate, weight decay and temperature vary per member of one ensemble; the head (linear vs low rank)
makes two groups, so two compiled ensembles of 8 members each. The leaderboard and plots in the README come
from this sweep.
"""

from pathlib import Path

from esep_jax.config import Config, load_config_file, override


def get_config() -> Config:
    # Measured with the 0.1 defaults (configs/earlier_defaults.py); the swept fields override them.
    base = load_config_file(str(Path(__file__).with_name("earlier_defaults.py")))
    return override(base, {"train.num_steps": 1500, "train.eval_every": 100, "train.patience": 4, "model.rank": 64})


def get_sweep() -> dict:
    return {"grid": {"model.head": ["linear", "lowrank"], "optim.learning_rate": [3e-4, 1e-3],
                     "optim.weight_decay": [1e-4, 10.0], "loss.temperature": [0.03, 0.05]}}
