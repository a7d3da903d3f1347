"""Scoring generated clouds: the metrics, the evaluation of sets, its report, projections and renders."""
