"""Evaluation: probes (identity encoder, attribute classifiers) and the metrics benchmarks report."""
