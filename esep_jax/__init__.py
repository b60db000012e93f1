"""esep_jax: train tiny query-side searching modules over frozen, precomputed embeddings.

The package is layered by pipeline stage; a module imports only from its own stage and the ones above it in
this list (`tests/test_layout.py` checks it):

    errors, atomic, config   foundations: user-facing errors, all-or-nothing writes, the typed config
    data/                    datasets on disk, ingest, step-addressed batches and their signals
    heads/                   searching modules (a registry with an export contract), ensembles, closed forms
    objectives/              loss terms (a registry) and the sharded full-corpus softmax
    runs/                    what a run is on disk, and TrainedRun: reading a run without writing to it
    evaluation/              exact retrieval, trec_eval metrics, reports and views, drift retention, mining
    training/                the plan, the pure step, the loop, checkpoints, sweeps
    export/, serving/        bundles (safetensors + ScaNN) and the JAX-free searcher
    bench/                   benchmarks
    cli/                     the `esep-jax` command: argument parsing only
"""

__version__ = "0.2.0"
