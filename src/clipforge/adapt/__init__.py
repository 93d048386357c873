"""Adapting a trained CLIP: weight-space ensembles (WiSE-FT) and linear heads initialised from zero-shot weights.

LoRA lives with the models (`clipforge.models.lora`), the negative queue with the losses (`clipforge.losses_queue`).
"""
