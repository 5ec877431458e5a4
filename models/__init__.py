"""Neural network modules (torch nn.Modules and pure tensor functions, no I/O)."""
