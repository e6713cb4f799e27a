"""Training: the trainer (phases and epochs) and its Keras callbacks, one per concern (reseeding, NaN
guard, early stopping, checkpoints, history files); checkpoints; optimisers and schedules, mixed
precision and devices, imag episodes, curve diagnosis (curves, verdict, remedies)."""
