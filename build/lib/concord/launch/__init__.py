"""torchx components for launching Concord jobs."""
