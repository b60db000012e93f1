"""Datasets: the on-disk format, ingest (arrays, BEIR text), batches and their signals, candidates, mixtures."""
