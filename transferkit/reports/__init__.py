"""Reports: metrics, confusion matrices, predictions and plots of a run; comparisons of modes over seeds."""
