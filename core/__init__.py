"""The bottom layer, shared by everything above: image I/O, data sets, metrics, losses, phantoms."""
