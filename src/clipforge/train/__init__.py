"""Training, one way: `setup` (model, data, resume; the frozen `RunContext`) -> `step` (the one training step:
precision, accumulation, compile) -> `loop` (schedule, logging, evaluation hooks, checkpoints; `train`)."""
