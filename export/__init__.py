"""Export of trained models to ONNX / TensorRT / BentoML / Triton, with parity checks."""
