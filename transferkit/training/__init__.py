"""Training: the trainer (phases and epochs), its Keras callback, early stopping and history files, checkpoints;
optimisers and schedules, mixed precision and devices, imag episodes, curve diagnosis."""
