"""Evaluation: zero-shot classification, retrieval, linear probes and margins over model features."""
