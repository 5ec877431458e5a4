"""Load testing, the benchmark and the soak test of the medrefine service."""
