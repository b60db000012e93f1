"""Teacher scores from a hybrid lexical + dense scorer: BM25 (bm25s) fused with the dense embeddings.

A dense head learns only what its query vectors can express; a lexical scorer sees exact terms (drug names,
gene symbols, identifiers) the embeddings blur. Fused with the dense score it is a stronger scorer than either
(on NFCorpus BM25 alone is already on par with all-MiniLM-L6-v2), made offline in seconds — a teacher for
`loss.teacher` (`esep-jax teacher --scores ...`).

Per query, candidates are the union of the dense top-`depth` and the BM25 top-`depth`; each score is z-normalised
over the query's candidates and fused as `alpha · dense + (1 − alpha) · bm25`, with `alpha` chosen on the dev
split by the teacher's own nDCG@10 (reranking its candidates; documents outside them rank last). Writes
`teacher_<split>.tsv` (`query-id  corpus-id  score`, BEIR style) per requested split and `report.json`.

    python tools/builders/build_hybrid_teacher.py --beir ../shared/data/nfcorpus --embeddings ../shared/data/nfcorpus/minilm \\
        --out /tmp/hybrid-nfcorpus --splits train,dev,test
    esep-jax teacher --data /tmp/nfcorpus --scores /tmp/hybrid-nfcorpus/teacher_train.tsv --name hybrid

Needs `pip install bm25s PyStemmer` (the `teacher` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from esep_jax.data.ids import read_ids  # noqa: E402
from esep_jax.data.beir import read_beir_corpus, read_beir_queries  # noqa: E402


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        columns = line.split("\t")
        if line_number == 1 and columns[-1].strip().lower() == "score":
            continue
        if len(columns) == 3:
            qrels.setdefault(columns[0], {})[columns[1]] = int(columns[2])
    return qrels


def zscore(values: np.ndarray) -> np.ndarray:
    return (values - values.mean(axis=1, keepdims=True)) / (values.std(axis=1, keepdims=True) + 1e-6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beir", required=True, help="BEIR directory: corpus.jsonl(.gz), queries.jsonl(.gz), qrels/")
    parser.add_argument("--embeddings", required=True,
                        help="directory with corpus.npy, queries.npy, corpus_ids.txt, queries_ids.txt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--splits", default="train,dev,test")
    parser.add_argument("--depth", type=int, default=100, help="candidates per query from each scorer")
    parser.add_argument("--dev", default="dev", help="split on which alpha is chosen")
    parser.add_argument("--alpha", type=float, default=None,
                        help="fix the dense weight instead of choosing it on dev (1 = the dense scores alone)")
    args = parser.parse_args(argv)
    import bm25s
    import Stemmer

    start = time.perf_counter()
    beir, emb = Path(args.beir), Path(args.embeddings)
    corpus_file = next(p for p in (beir / "corpus.jsonl", beir / "corpus.jsonl.gz") if p.exists())
    queries_file = next(p for p in (beir / "queries.jsonl", beir / "queries.jsonl.gz") if p.exists())
    doc_ids_text, doc_texts, _ = read_beir_corpus(str(corpus_file))
    query_ids_text, query_texts, _ = read_beir_queries(str(queries_file))
    doc_ids, query_ids = read_ids(str(emb / "corpus_ids.txt")), read_ids(str(emb / "queries_ids.txt"))
    text_of_doc = dict(zip(doc_ids_text, doc_texts))
    text_of_query = dict(zip(query_ids_text, query_texts))
    corpus = np.load(emb / "corpus.npy").astype(np.float32)
    queries = np.load(emb / "queries.npy").astype(np.float32)
    query_row = {q: i for i, q in enumerate(query_ids)}

    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([text_of_doc[d] for d in doc_ids], stopwords="en", stemmer=stemmer,
                                   show_progress=False), show_progress=False)

    def candidates(split_queries: list[str]):
        rows = np.array([query_row[q] for q in split_queries])
        dense_all = queries[rows] @ corpus.T  # [Q, N]: small corpora only (this is an offline tool)
        tokens = bm25s.tokenize([text_of_query[q] for q in split_queries], stopwords="en", stemmer=stemmer,
                                show_progress=False)
        bm25_all = np.zeros_like(dense_all)
        docs, scores = retriever.retrieve(tokens, k=min(len(doc_ids), 4 * args.depth), show_progress=False)
        np.put_along_axis(bm25_all, docs, scores, axis=1)
        dense_top = np.argsort(-dense_all, axis=1)[:, :args.depth]
        bm25_top = np.argsort(-bm25_all, axis=1)[:, :args.depth]
        union = [np.union1d(a, b) for a, b in zip(dense_top, bm25_top)]
        width = max(len(u) for u in union)
        cand = np.stack([np.pad(u, (0, width - len(u)), constant_values=u[0]) for u in union])
        valid = np.stack([np.arange(width) < len(u) for u in union])
        dense = np.take_along_axis(dense_all, cand, axis=1)
        lexical = np.take_along_axis(bm25_all, cand, axis=1)
        return cand, valid, zscore(dense), zscore(lexical)

    def ndcg(split_queries, cand, valid, fused, qrels) -> float:
        """The teacher's nDCG@10 reranking its candidates (trec_eval conventions, via pytrec_eval)."""
        import pytrec_eval

        run = {q: {doc_ids[cand[i, j]]: float(fused[i, j]) for j in np.flatnonzero(valid[i])}
               for i, q in enumerate(split_queries)}
        judged = {q: qrels[q] for q in split_queries}
        measures = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10"}).evaluate(run)
        return float(np.mean([m["ndcg_cut_10"] for m in measures.values()]))

    qrels = {split: read_qrels(beir / "qrels" / f"{split}.tsv") for split in set(args.splits.split(",")) | {args.dev}}
    dev_queries = [q for q in qrels[args.dev] if any(g > 0 for g in qrels[args.dev][q].values())]
    cand, valid, dense, lexical = candidates(dev_queries)
    alphas = np.round(np.linspace(0, 1, 11), 2)
    dev_scores = {float(a): ndcg(dev_queries, cand, valid, a * dense + (1 - a) * lexical, qrels[args.dev])
                  for a in alphas}
    alpha = max(dev_scores, key=lambda a: (dev_scores[a], a)) if args.alpha is None else args.alpha
    print(f"dev nDCG@10 by alpha: {dev_scores}; alpha = {alpha}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"alpha": alpha, "dev_by_alpha": dev_scores, "depth": args.depth, "splits": {}}
    for split in args.splits.split(","):
        split_queries = [q for q in qrels[split] if any(g > 0 for g in qrels[split][q].values())]
        cand, valid, dense, lexical = candidates(split_queries)
        fused = alpha * dense + (1 - alpha) * lexical
        report["splits"][split] = {"queries": len(split_queries),
                                   "teacher_ndcg@10": ndcg(split_queries, cand, valid, fused, qrels[split]),
                                   "dense_ndcg@10": ndcg(split_queries, cand, valid, dense, qrels[split]),
                                   "bm25_ndcg@10": ndcg(split_queries, cand, valid, lexical, qrels[split])}
        lines = ["query-id\tcorpus-id\tscore"]
        for i, q in enumerate(split_queries):
            lines += [f"{q}\t{doc_ids[cand[i, j]]}\t{fused[i, j]:.6f}" for j in np.flatnonzero(valid[i])]
        tmp = out / f".teacher_{split}.tsv.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(out / f"teacher_{split}.tsv")
        print(f"{split}: {report['splits'][split]}")
    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
