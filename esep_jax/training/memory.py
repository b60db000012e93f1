"""A peak-memory estimate of a training run from shapes alone, checked before anything is allocated.

A batch of ten million queries, a ten-million-wide hidden layer or a hundred thousand ensemble members should
be refused in a second with the numbers, not found by the kernel's OOM killer minutes later. The estimate
counts the large buffers — the train state (parameters, two Adam moments, the best parameters), the device
corpus and the evaluation index, a batch and its signals, and the full-corpus scan's working set — and is
compared with the memory available to the run: the accelerator's own memory, or on the CPU the host's
available memory (which the host-side copies share).
"""

from __future__ import annotations

import math
import os

import jax

from esep_jax.config import Config
from esep_jax.errors import InputError
from esep_jax.objectives.corpus_softmax import row_block, scan_chunk

GiB = 1 << 30


def parameter_count(head, query_dim: int) -> int:
    """Parameters of one member of `head`, from shapes only (nothing is allocated)."""
    from esep_jax.heads import init_params

    shapes = jax.eval_shape(lambda: init_params(head, jax.random.key(0), query_dim))
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


def activation_count(head, query_dim: int) -> int:
    """Numbers one query's pass through one member of `head` produces (every layer's output), from shapes."""
    import jax.numpy as jnp

    from esep_jax.heads import init_params

    def forward():
        params = init_params(head, jax.random.key(0), query_dim)
        _, state = head.apply({"params": params}, jnp.zeros((1, query_dim), jnp.float32),
                              capture_intermediates=True, mutable=["intermediates"])
        return state
    shapes = jax.eval_shape(forward)
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


def estimate(config: Config, *, head, query_dim: int, corpus_dim: int, scored_dim: int, num_documents: int,
             num_positives: int, dev_queries: int, corpus_on_device: bool, signals: frozenset[str],
             host_corpus: bool, task_documents: int | None = None) -> dict:
    """Estimated bytes by part (device and host) and in total, for this machine's share of the corpus (all of it
    on one host; a host of a multi-host job holds its corpus shards only). `task_documents`: rows of the task's
    corpus table when it holds only the contrasted documents (dev evaluation then has its own index)."""
    tc, members = config.train, config.ensemble.members
    corpus_bytes = 2 if tc.corpus_dtype == "bfloat16" else 4
    micro = tc.micro_batch_size or tc.batch_size
    shards = max(1, min(jax.process_count(), tc.corpus_shards))
    local_documents = -(-num_documents // shards)
    task_documents = num_documents if task_documents is None else task_documents
    local_task_documents = -(-task_documents // shards)
    # Dev retrieves from the training corpus's own device arrays unless the task scores Matryoshka prefixes
    # or holds only the contrasted documents.
    separate_index = not corpus_on_device or scored_dim != corpus_dim or task_documents < num_documents
    activations = activation_count(head, query_dim)
    block = row_block(micro * members)  # query rows per corpus scan (an ensemble's members are folded in)
    parts = {
        # params, Adam's two moments and the best params [E, ...] float32; the update's gradients, moments and
        # parameters before donation frees the old ones; and the host copies a checkpoint save takes
        "train state": 10 * 4 * members * parameter_count(head, query_dim),
        # every layer's output, kept for the backward pass (and its gradient), per member and query
        "head activations": 3 * 4 * micro * members * activations,
        "corpus on device": local_task_documents * scored_dim * corpus_bytes if corpus_on_device else 0,
        "evaluation index": local_documents * corpus_dim * corpus_bytes if separate_index else 0,
        # queries and positives (ids and weights), twice for the read-ahead and the device copy
        "batch": 2 * tc.batch_size * (4 * query_dim + 8 * num_positives),
        # the scan's scores/probabilities [row block, chunk] and its running sums [b·E, d], a few of each live
        "full-corpus scan": 3 * 4 * (block * scan_chunk(min(tc.corpus_chunk, local_task_documents), block)
                                     + micro * members * scored_dim) if corpus_on_device else 0,
        "dev evaluation": 4 * dev_queries * members * (corpus_dim + activations)
        + 4 * config.eval.query_chunk * min(config.eval.corpus_chunk, num_documents) * 3,
        "host corpus": 4 * num_documents * corpus_dim if host_corpus else 0,
        # placing the corpus: one device's rows at a time pass through the host before they reach the device
        "corpus placement": local_documents * scored_dim * corpus_bytes // max(1, jax.local_device_count()),
    }
    if "sampled_candidates" in signals:
        candidates = num_positives + 32 + config.loss.random_negatives
        parts["candidate vectors"] = 2 * 4 * tc.batch_size * candidates * scored_dim
    if "teacher_candidates" in signals:
        parts["teacher vectors"] = 2 * 4 * tc.batch_size * 100 * corpus_dim
    parts["total"] = sum(parts.values())
    return parts


def available_bytes() -> tuple[int, str]:
    """(bytes, what) the run may use: the first device's memory limit, or the host's available memory."""
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host memory"
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")), "available host memory"


def check_fits(parts: dict, config: Config) -> None:
    """Refuses a run whose estimate exceeds `train.memory_fraction` of the available memory, naming the
    largest parts so the user knows which field to change."""
    limit, what = available_bytes()
    budget = config.train.memory_fraction * limit
    if parts["total"] <= budget:
        return
    largest = sorted(((v, k) for k, v in parts.items() if k != "total"), reverse=True)[:3]
    detail = ", ".join(f"{name} {value / GiB:.1f} GiB" for value, name in largest)
    raise InputError(f"this run needs about {parts['total'] / GiB:.1f} GiB ({detail}) but "
                     f"{config.train.memory_fraction:.0%} of the {limit / GiB:.1f} GiB of {what} is "
                     f"{budget / GiB:.1f} GiB: lower train.batch_size (or set train.micro_batch_size), "
                     "ensemble.members or the head's size", field="config")


def describe(parts: dict) -> str:
    return ", ".join(f"{name} {value / GiB:.2f} GiB" for name, value in parts.items() if value)


