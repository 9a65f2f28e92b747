"""What a run reports: task metrics, the run log, step timing, progress bars, plots."""
