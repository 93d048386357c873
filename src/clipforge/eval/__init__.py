"""Evaluation: zero-shot classification, retrieval, linear probes and margins over model features."""

# The tasks of `clipforge eval` (kept here, free of imports, so that the command line parser stays light).
TASKS = ("zeroshot", "retrieval", "linear-probe", "robustness", "margins")
