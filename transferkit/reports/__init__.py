"""Reports: metrics, confusion matrices, predictions and plots of a run; the statistics of modes compared over seeds
(:mod:`transferkit.strategies.compare` trains them)."""
