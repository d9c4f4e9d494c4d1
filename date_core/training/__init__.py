"""Training: the optimiser, schedule, step and plain loop (engine), the worker-loop skeleton
(loop), DATE's losses, and CAPTURE-style cross-modal pretraining."""
