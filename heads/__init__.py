"""One MLP head per task, and the task losses."""

from heads.heads import TaskHead, TaskHeads, task_loss

__all__ = ["TaskHead", "TaskHeads", "task_loss"]
