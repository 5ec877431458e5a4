"""Shared by training, export and service: image I/O, data sets, metrics, losses, phantoms, checkpoints."""
