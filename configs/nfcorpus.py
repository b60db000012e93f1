"""NFCorpus (BEIR) with all-MiniLM-L6-v2 embeddings: the configuration behind the README's NFCorpus figures.

NFCorpus has ~40 graded positives per training query and noisy, medical-topic qrels; a naive head overfits
them. The defaults already guard against that (multi-positive targets, recovery regulariser, dev early
stopping), so this config is the defaults.
"""

from esep_jax.config import Config


def get_config() -> Config:
    return Config()
