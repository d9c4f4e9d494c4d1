"""Evaluation: metrics (PR, PG, instance retrieval), evaluating a checkpoint on a dataset
split, figures for people, and model selection for sweeps."""
