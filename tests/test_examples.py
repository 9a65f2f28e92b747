"""The README's "Use the boundary in your own model" examples: shown verbatim, and they run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["docs/examples/plain_pytorch.py", "docs/examples/torchrec_dmp.py"]


@pytest.mark.parametrize("path", EXAMPLES)
def test_the_readme_shows_the_example_verbatim(path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- example: {re.escape(path)} -->\n```python\n(.*?)```", readme, re.S)
    assert block is not None, f"README.md has no example block for {path}"
    assert block.group(1) == (ROOT / path).read_text()


def test_the_plain_pytorch_example_runs():
    proc = subprocess.run([sys.executable, EXAMPLES[0]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task weights:" in proc.stdout


@pytest.mark.multiprocess
def test_the_torchrec_dmp_example_runs_on_two_ranks():
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", EXAMPLES[1]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task weights, identical on every rank:" in proc.stdout
