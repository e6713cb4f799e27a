"""Training: optimisers and schedules, mixed precision and devices, imag episodes, curve diagnosis."""
