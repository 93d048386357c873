"""Training: config, optimizer, learning-rate schedule, step and loop."""
