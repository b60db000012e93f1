"""NFCorpus (BEIR) with all-MiniLM-L6-v2 embeddings: the configuration behind the README's NFCorpus figures.

NFCorpus has ~40 graded positives per training query and noisy, medical-topic qrels; a naive head overfits
them. The defaults already guard against that (multi-positive targets, recovery regulariser, dev early
stopping), so this config only spells them out.
"""

from esep_jax.config import Config


def get_config() -> Config:
    config = Config()
    config.model.head = "linear"
    config.loss.kind = "full_corpus"
    config.loss.temperature = 0.05
    config.loss.recovery_weight = 1.0
    config.train.batch_size = 256
    config.train.eval_every = 100
    config.train.patience = 5
    return config
