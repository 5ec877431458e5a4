"""Building models from weights files: run directories, SAM / TransUNet checkpoints, the served graphs' wrappers."""
