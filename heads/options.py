"""What a task can be (no torch import, so that validating a config stays cheap)."""

TASK_TYPES = ("binary", "regression")
