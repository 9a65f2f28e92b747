"""``python -m concord ...`` is the ``concord`` command."""

from concord.trainer.cli import entry

entry()
