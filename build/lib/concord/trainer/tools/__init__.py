"""Research tools on top of the trainer: QPS benches and multi-seed comparisons."""
