"""Training: the optimiser, schedule, step and plain loop (engine), DATE's losses, and
CAPTURE-style cross-modal pretraining."""
