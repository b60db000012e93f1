"""The torch side of `build_teacher.py`: training pairs and batches, the frozen-lower-layers cache, the in-batch
InfoNCE fine-tuning loop and length-sorted encoding of a SentenceTransformer (MiniLM) — no esep_jax code.

`build_teacher.py` is the pipeline around it (data, calibration to a time budget, outputs, evaluation).
"""

from __future__ import annotations

import random
import sys
import time

import numpy as np


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_seeds(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_pairs(train: dict[str, dict[str, int]], qtext: dict[str, str], dtext: dict[str, str],
                max_pos: int, seed: int) -> list[tuple[str, str]]:
    """(qid, docid) pairs, ordered in rounds: round r holds every query's r-th positive, each round shuffled."""
    rng = random.Random(seed)
    per_query: dict[str, list[str]] = {}
    for qid in sorted(train):
        if qid not in qtext:
            continue
        docs = [d for d, g in train[qid].items() if g >= 1 and d in dtext]
        rng.shuffle(docs)
        docs.sort(key=lambda d: -train[qid][d])  # stable: higher grades first, random within a grade
        if docs:
            per_query[qid] = docs[:max_pos]
    pairs: list[tuple[str, str]] = []
    for r in range(max_pos):
        round_pairs = [(q, docs[r]) for q, docs in per_query.items() if len(docs) > r]
        rng.shuffle(round_pairs)
        pairs.extend(round_pairs)
    return pairs


def make_batches(pairs: list[tuple[str, str]], batch_size: int) -> list[list[tuple[str, str]]]:
    """Batch pairs in order with no repeated query or document inside a batch; a clashing pair is deferred
    to the next batch that can take it. A last batch smaller than half a batch is dropped."""
    batches: list[list[tuple[str, str]]] = []
    deferred: list[tuple[str, str]] = []
    cur: list[tuple[str, str]] = []
    qs: set[str] = set()
    ds: set[str] = set()

    def fits(pair):
        return pair[0] not in qs and pair[1] not in ds

    def add(pair):
        cur.append(pair)
        qs.add(pair[0])
        ds.add(pair[1])

    def emit():
        nonlocal cur, deferred
        batches.append(cur)
        cur = []
        qs.clear()
        ds.clear()
        keep = []
        for pair in deferred:  # deferred pairs go first into the next batch
            if len(cur) < batch_size and fits(pair):
                add(pair)
            else:
                keep.append(pair)
        deferred = keep

    for pair in pairs:
        if fits(pair):
            add(pair)
        else:
            deferred.append(pair)
        if len(cur) == batch_size:
            emit()
    while cur:  # flush: every emit refills from the deferred pairs, at least one of which fits
        if len(cur) < batch_size // 2 and batches:
            break
        emit()
    return batches


class LowerCache:
    """Frozen embeddings + lower `k` transformer layers, with the corpus' hidden states after them cached.

    With the lower layers frozen, a document's hidden states after layer k never change, so they are computed
    once (at `--encode-max-len` tokens) and reused: training runs only the upper layers on the documents (on
    the first `--doc-max-len` cached positions), and B's final corpus encoding runs only the upper layers too.
    Queries (short) always go through the whole model.
    """

    def __init__(self, model, k: int):
        import torch

        self.torch = torch
        self.model = model
        self.bert = model[0].auto_model
        self.k = k
        self.tok = model[0].tokenizer
        for module in (self.bert.embeddings, *self.bert.encoder.layer[:k]):
            for param in module.parameters():
                param.requires_grad_(False)
        self.states: dict[str, object] = {}

    def _mask(self, hidden, mask2d):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden, attention_mask=mask2d)

    def lower(self, texts: list[str], max_len: int):
        torch = self.torch
        feats = self.tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.inference_mode():
            self.bert.eval()
            hidden = self.bert.embeddings(input_ids=feats["input_ids"], token_type_ids=feats["token_type_ids"])
            mask = self._mask(hidden, feats["attention_mask"])
            for layer in self.bert.encoder.layer[:self.k]:
                hidden = layer(hidden, mask)
        return hidden, feats["attention_mask"]

    def build(self, ids: list[str], texts: list[str], max_len: int, batch_size: int = 32) -> None:
        from tqdm import tqdm

        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in tqdm(range(0, len(texts), batch_size), desc=f"cache layers 0-{self.k - 1}", mininterval=10,
                          file=sys.stdout):
            idx = order[start:start + batch_size]
            hidden, mask = self.lower([texts[i] for i in idx], max_len)
            lengths = mask.sum(1).tolist()
            for row, i in enumerate(idx):
                self.states[ids[i]] = hidden[row, :lengths[row]].clone()

    def upper(self, ids: list[str], max_len: int | None = None):
        """Normalised embeddings of cached documents (first `max_len` positions), through the upper layers."""
        torch = self.torch
        seqs = [self.states[i] if max_len is None else self.states[i][:max_len] for i in ids]
        width = max(len(x) for x in seqs)
        hidden = torch.zeros(len(seqs), width, seqs[0].shape[-1])
        mask2d = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, x in enumerate(seqs):
            hidden[row, :len(x)] = x
            mask2d[row, :len(x)] = 1
        mask = self._mask(hidden, mask2d)
        for layer in self.bert.encoder.layer[self.k:]:
            hidden = layer(hidden, mask)
        m = mask2d.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # the model's own mean pooling
        return torch.nn.functional.normalize(pooled, dim=-1)

    def encode(self, ids: list[str], batch_size: int, desc: str) -> np.ndarray:
        from tqdm import tqdm

        torch = self.torch
        self.model.eval()
        order = np.argsort([-len(self.states[i]) for i in ids], kind="stable")
        out = np.zeros((len(ids), self.bert.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in tqdm(range(0, len(ids), batch_size), desc=desc, mininterval=10, file=sys.stdout):
                idx = order[start:start + batch_size]
                out[idx] = self.upper([ids[i] for i in idx]).numpy().astype(np.float32)
        return out


class Trainer:
    """Plain torch MultipleNegativesRankingLoss training of a SentenceTransformer."""

    def __init__(self, model, qtext, dtext, train_qrels, args, cache: LowerCache | None = None):
        import torch

        self.cache = cache
        self.torch = torch
        self.model = model
        self.qtext, self.dtext, self.train_qrels = qtext, dtext, train_qrels
        self.args = args
        self.tokenizer = model[0].tokenizer

    def embed(self, texts: list[str], max_len: int):
        torch = self.torch
        feats = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        feats = dict(feats)
        out = self.model(feats)["sentence_embedding"]
        return torch.nn.functional.normalize(out, dim=-1)

    def loss(self, batch: list[tuple[str, str]]):
        torch = self.torch
        q = self.embed([self.qtext[qid] for qid, _ in batch], self.args.query_max_len)
        if self.cache is not None:
            d = self.cache.upper([did for _, did in batch], self.args.doc_max_len)
        else:
            d = self.embed([self.dtext[did] for _, did in batch], self.args.doc_max_len)
        logits = self.args.scale * q @ d.T
        # mask in-batch "negatives" that are in fact train positives of the query
        mask = torch.zeros_like(logits, dtype=torch.bool)
        for i, (qid, _) in enumerate(batch):
            positives = self.train_qrels.get(qid, {})
            for j, (_, did) in enumerate(batch):
                if j != i and positives.get(did, 0) >= 1:
                    mask[i, j] = True
        logits = logits.masked_fill(mask, -1e4)
        labels = torch.arange(len(batch))
        return torch.nn.functional.cross_entropy(logits, labels), int(mask.sum())

    def time_steps(self, batches, n: int) -> float:
        """Seconds per forward+backward+step, measured on `n` batches without changing the weights."""
        self.model.train()
        times = []
        for batch in batches[:n]:
            t0 = time.perf_counter()
            loss, _ = self.loss(batch)
            loss.backward()
            self.model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        # the first step pays warm-up costs; the optimizer step adds a little
        return 1.1 * float(np.median(times[1:] if len(times) > 1 else times))

    def train(self, batches, steps: int, deadline: float | None = None):
        from tqdm import tqdm

        torch = self.torch
        args = self.args
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cache is not None:  # frozen layers: no dropout, like the cached document states
            for module in (self.cache.bert.embeddings, *self.cache.bert.encoder.layer[:self.cache.k]):
                module.eval()
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
        warmup = max(1, int(round(args.warmup * steps)))

        def lr_lambda(step):
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (steps - step) / max(1, steps - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        history = []
        running = None
        bar = tqdm(range(steps), desc="train", mininterval=10, file=sys.stdout)
        for step in bar:
            batch = batches[step % len(batches)]
            loss, masked = self.loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}", refresh=False)
            if (step + 1) % 25 == 0 or step + 1 == steps:
                history.append({"step": step + 1, "loss_ema": round(running, 4)})
                log(f"step {step + 1}/{steps} loss(ema) {running:.4f} masked {masked}")
            if deadline is not None and time.perf_counter() > deadline and step + 1 < steps:
                log(f"deadline reached: stopping after {step + 1} of {steps} steps")
                history.append({"step": step + 1, "loss_ema": round(running, 4), "stopped_early": True})
                break
        self.model.eval()
        return history, step + 1


def base_dim(model) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def encode(model, texts: list[str], max_len: int, batch_size: int, desc: str) -> np.ndarray:
    """L2-normalised float32 embeddings, sorted by length for speed, returned in input order."""
    import torch
    from tqdm import tqdm

    model.eval()
    tok = model[0].tokenizer
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), base_dim(model)), dtype=np.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, mininterval=10, file=sys.stdout):
            idx = order[start:start + batch_size]
            feats = dict(tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                             return_tensors="pt"))
            emb = model(feats)["sentence_embedding"]
            emb = torch.nn.functional.normalize(emb, dim=-1)
            out[idx] = emb.cpu().numpy().astype(np.float32)
    return out
