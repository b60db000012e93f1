"""The defaults (what `esep-jax train` uses without --config): a good first run on a dataset never seen.

A linear head starting at the identity, trained with the exact full-corpus softmax over all positives of each
query, pulled back towards the base query vectors (recovery regulariser), evaluated on dev every 100 steps and
stopped when dev nDCG@10 stops improving; the best dev head — possibly the untouched identity — is kept.
Every default lives in `esep_jax/config/schema.py`.
"""

from esep_jax.config import Config


def get_config() -> Config:
    return Config()
