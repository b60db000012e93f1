"""A sweep on NFCorpus: `esep-jax sweep --config configs/sweep_nfcorpus.py --data DIR --workdir W`.

Learning rate, temperature and recovery weight vary per member of one ensemble; the head (linear vs low rank)
makes two groups, so two compiled ensembles of 8 members each.
"""

from esep_jax.config import Config


def get_config() -> Config:
    config = Config()
    config.train.num_steps = 1500
    config.train.eval_every = 100
    config.train.patience = 4
    config.model.rank = 64
    return config


def get_sweep() -> dict:
    return {"grid": {"model.head": ["linear", "lowrank"], "optim.learning_rate": [3e-4, 1e-3],
                     "loss.temperature": [0.03, 0.05], "loss.recovery_weight": [0.3, 1.0]}}
