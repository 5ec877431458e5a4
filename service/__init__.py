"""Serving: a framework-free segmentation pipeline over exported artifacts, and the servers around it.

``service.pipeline.SegmentationPipeline`` takes and returns numpy; it runs the UltraRefiner chain
(TransUNet -> prompts -> ROI -> SAM encoder/decoder -> paste-back -> gate -> threshold) on an inference
engine (``service.engines``) over a verified artifact directory (``service.artifacts``). Benchmarks,
tests and the HTTP/gRPC fronts all use that same pipeline.
"""
