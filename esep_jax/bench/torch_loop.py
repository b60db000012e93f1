"""The plain PyTorch training loop a user would write for the same head — `bench time-to-head`'s baseline.

A linear head `q ↦ q W` from the identity, the softmax over the documents judged in training against each
query's grade-weighted positives (`F.cross_entropy` with probability targets), temperature, recovery
`‖f(q) − q‖²`, Adam with weight decay towards the identity, warm-up + cosine, gradient clipping, random batches,
and exact dev nDCG@10 every `eval_every` steps with early stopping — the default config's recipe, minus what
esep_jax adds on top (the in-domain gate, the new-documents view, checkpoints). Run as `python -m
esep_jax.bench.torch_loop DATA` in a fresh process so its start-up is timed like the CLI's.
"""

from __future__ import annotations

import json
import math
import sys
import time


def train(data: str, *, steps: int = 2000, batch: int = 256, lr: float = 5e-4, weight_decay: float = 10.0,
          temperature: float = 0.03, recovery: float = 0.5, warmup: int = 50, eval_every: int = 100,
          patience: int = 5, seed: int = 0) -> dict:
    started = time.perf_counter()
    import numpy as np
    import torch
    import torch.nn.functional as F

    from esep_jax.data.dataset import Dataset
    from esep_jax.evaluation.metrics import doc_id_ranks, mean_metrics, per_query_metrics

    torch.manual_seed(seed)
    dataset = Dataset(data)
    corpus = torch.from_numpy(dataset.read_corpus())
    train_qrels, dev_qrels = dataset.qrels("train"), dataset.qrels("dev")
    relevant = train_qrels.grades >= 1
    judged = torch.from_numpy(np.unique(train_qrels.doc_rows[relevant]).astype(np.int64))
    position = torch.full((corpus.shape[0],), -1, dtype=torch.long)
    position[judged] = torch.arange(judged.numel())
    # Dense targets over the judged documents, one row per training query with a positive.
    queries_with_positives = [i for i in range(train_qrels.num_queries) if (train_qrels.judgements(i)[1] >= 1).any()]
    targets = torch.zeros(len(queries_with_positives), judged.numel())
    for row, i in enumerate(queries_with_positives):
        docs, grades = train_qrels.judgements(i)
        keep = grades >= 1
        targets[row, position[torch.from_numpy(docs[keep].astype(np.int64))]] = torch.from_numpy(
            grades[keep].astype(np.float32))
    targets /= targets.sum(dim=1, keepdim=True)
    train_queries = torch.from_numpy(dataset.read_queries(train_qrels.query_rows[queries_with_positives]))
    dev_queries = torch.from_numpy(dataset.read_queries(dev_qrels.query_rows))
    contrasted = corpus[judged]
    ranks = doc_id_ranks(dataset.ids("corpus"))

    residual = torch.zeros(corpus.shape[1], corpus.shape[1], requires_grad=True)
    optimizer = torch.optim.AdamW([residual], lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(s / steps, 1.0)))))

    def dev_ndcg(W):
        with torch.no_grad():
            scores, rows = torch.topk((dev_queries @ W) @ corpus.T, 100, dim=1)
        return mean_metrics(per_query_metrics(rows.numpy().astype(np.int32), scores.numpy(), dev_qrels, ranks,
                                              (10, 100)))["ndcg@10"]

    identity = torch.eye(corpus.shape[1])
    best, best_step, stale = dev_ndcg(identity), 0, 0
    curve = [(0, time.perf_counter() - started, best)]  # (step, seconds since start, dev nDCG@10)
    best_weights = identity.clone()  # noqa: F841
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        rows = torch.randint(0, train_queries.shape[0], (batch,), generator=generator)
        q = train_queries[rows]
        mapped = q + q @ residual
        loss = F.cross_entropy(mapped @ contrasted.T / temperature, targets[rows]) + recovery * (
            (mapped - q) ** 2).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([residual], 1.0)
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            score = dev_ndcg(identity + residual.detach())
            curve.append((step, time.perf_counter() - started, score))
            if score > best:
                best, best_step, stale = score, step, 0
                best_weights = identity + residual.detach().clone()  # noqa: F841 (kept, as a user would)
            else:
                stale += 1
                if stale >= patience:
                    break
    return {"total_s": time.perf_counter() - started, "steps": step, "best_step": best_step,
            "dev_ndcg@10": best, "threads": torch.get_num_threads(), "curve": curve}


if __name__ == "__main__":
    print("RESULT" + json.dumps(train(sys.argv[1])), flush=True)
