"""Exact retrieval and trec_eval-equal metrics; the eval report, its views, drift retention and mining."""
