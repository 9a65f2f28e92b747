"""``python -m concord ...`` is the ``concord`` command."""

import sys

from concord.trainer.cli import main

sys.exit(main())
