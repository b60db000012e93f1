"""Query drift where B is the stronger encoder: B's queries search the index of a weaker encoder A.

Use on a drift dataset whose paired texts are embedded by both encoders (`--paired-source B.npy
--paired-target A.npy`, e.g. the corpus documents). Here A's own query embeddings are the weak side, so
distilling onto them (`loss.distill`) would pull the head towards A's mistakes; instead the head learns how B
*ranks*: listwise distillation (`loss.listwise_weight`) makes its softmax over the paired texts' A embeddings
match B's softmax over their B embeddings, for the training queries and for the paired texts themselves as
unlabelled pseudo-queries, alongside the full-corpus softmax on the qrels. Like `configs/drift.py`, the map
moves far from the identity: weak decay, no recovery pull, an output bias; the head is a residual MLP.
Variant `demo` applies it on top of `configs/demo.py` with a linear head.
"""

from pathlib import Path

from esep_jax.config import Config, load_module, override

# A static index is a bag of tokens: ranking its rows like B needs a non-linear map (on NFCorpus the MLP
# head retains 100 % of B's quality; the linear head's dev nDCG@10 lagged it by 2.3 points at step 700).
REVERSE_DRIFT = {"model.head": "mlp", "model.hidden_dim": 1024, "model.use_bias": True, "model.gate": "none",
                 "loss.recovery_weight": 0.0, "loss.listwise_weight": 1.0, "loss.listwise_temperature": 0.05,
                 "optim.learning_rate": 1e-3, "optim.weight_decay": 1e-4, "train.patience": 10,
                 "train.new_document_fraction": 0.0}
# On the demo a linear head already retains 95.7 % (the MLP head: 95.0 % when stopped at step 800).
DEMO = {"model.head": "linear", "train.num_steps": 1500, "train.eval_every": 50, "train.patience": 10}


def get_config(variant: str = "") -> Config:
    # The same starting points as configs/drift.py: the demo's config, or the defaults with every document a
    # negative and τ 0.05 (what the measured runs used).
    drift = load_module(str(Path(__file__).with_name("drift.py")))
    config = override(drift.base_config(variant), REVERSE_DRIFT)
    return override(config, DEMO) if variant == "demo" else config
