"""The runtime's allocator setting: freed (B, d) temporaries are reused, not page-faulted anew."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Minor page faults of 100 allocations of 1 MiB tensors (the temporaries of a GradDrop-like pass at
# B=1024, d=256), in steady state, before and after keep_freed_memory(); in a fresh interpreter, whose
# malloc thresholds are glibc's defaults.
SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from concord.trainer.runtime import keep_freed_memory

    grads = [torch.randn(1024, 256) for _ in range(3)]

    def faults():
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(25):
            sign = torch.sign(grads[0])
            rows = [g * sign for g in grads]
            del sign, rows
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

    faults()
    before = faults()
    applied = keep_freed_memory()
    faults()
    print(applied, before, faults())
    """
)


def _run(malloc_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(**(malloc_env or {}))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
    applied, before, after = out.split()
    return applied == "True", int(before), int(after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_are_reused_without_page_faults():
    applied, before, after = _run()
    assert applied
    # With glibc's defaults every one of the 100 blocks comes back as fresh pages (one fault per
    # page, or per huge page); once freed memory is kept, the loop reuses it.
    assert before >= 100 and after <= 5, (before, after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_users_malloc_setting_is_left_alone():
    applied, _, _ = _run({"MALLOC_TRIM_THRESHOLD_": "1"})
    assert not applied
