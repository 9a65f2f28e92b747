"""Concord's trainer: config, data, model assembly, training loop, CLI."""
