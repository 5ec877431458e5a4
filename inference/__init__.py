"""Serving pipelines over exported artifacts, free of any server framework: numpy in, numpy out."""
