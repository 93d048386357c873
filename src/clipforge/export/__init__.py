"""Deployment: ONNX graphs per tower, int8 quantisation and parity reports (`clipforge export --to onnx`).

Nothing heavy at import: `onnx_export`, `runtime` and `quantize` import ONNX packages only when called.
"""
