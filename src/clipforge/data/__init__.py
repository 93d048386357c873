"""Datasets: the embedded synthetic world, manifests, folders, shards and offline corpora."""
