"""Training: phantom data synthesis, the shared trainer and its phases, evaluation."""
