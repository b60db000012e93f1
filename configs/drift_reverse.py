"""Query drift where B is the stronger encoder: B's queries search the index of a weaker encoder A.

Use on a drift dataset whose paired texts are embedded by both encoders (`--paired-source B.npy
--paired-target A.npy`, e.g. the corpus documents). Here A's own query embeddings are the weak side, so
distilling onto them (`loss.distill`) would pull the head towards A's mistakes; instead the head learns how B
*ranks*: listwise distillation (`loss.listwise_weight`) makes its softmax over the paired texts' A embeddings
match B's softmax over their B embeddings, for the training queries and for the paired texts themselves as
unlabelled pseudo-queries, alongside the full-corpus softmax on the qrels. Like `configs/drift.py`, the map
moves far from the identity: weak decay, no recovery pull, an output bias; the head is a residual MLP. `configs/drift_reverse_demo.py`
is the same on top of the demo's settings.
"""

from esep_jax.config import Config


def apply_reverse_drift_settings(config: Config) -> Config:
    # A static index is a bag of tokens: ranking its rows like B needs a non-linear map (on NFCorpus the MLP
    # head retains 100 % of B's quality; the linear head's dev nDCG@10 lagged it by 2.3 points at step 700).
    config.model.head = "mlp"
    config.model.hidden_dim = 1024
    config.model.use_bias = True
    config.loss.recovery_weight = 0.0
    config.loss.listwise_weight = 1.0
    config.loss.listwise_temperature = 0.05
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 1e-4
    config.train.patience = 10
    return config


def get_config() -> Config:
    return apply_reverse_drift_settings(Config())
