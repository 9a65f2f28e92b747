"""torchrun as ``concord train``'s launcher runs it: the same agent (``torch.distributed.run``), which
reports a failed worker with its own traceback and a table of every rank. Where a worker recorded
the failure as one line naming its cause (bad data, a bad config: ``failures.report``, any exit code
but 1), that report would bury the line the launcher prints last, so it is left out; an unexpected
error (exit code 1, the worker's traceback in its log) or a worker that died without a record (killed,
a crash in native code) keeps torchrun's report, the only account of it there is.

    python -m concord.trainer.torchrun [torchrun's arguments]
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import parse_args, run

from concord.trainer import failures


@record
def main(argv: Optional[List[str]] = None) -> int:
    try:
        run(parse_args(argv))
    except ChildFailedError:
        folder = os.environ.get(failures.ERROR_DIR_ENV)
        first = failures.first_error(folder) if folder else None
        if first is None or first[0] == 1:
            raise
        return first[0]
    return 0


if __name__ == "__main__":
    sys.exit(main())
