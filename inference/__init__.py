"""Serving pipelines over exported artifacts, free of any server framework: numpy in, numpy out.

Segmentation (``inference.pipeline``) and generation (``inference.generation``) on an engine
(``inference.engines``) over a verified artifact directory (``inference.artifacts``, ``inference.manifest``).
"""
