"""Element-wise update rules as one fused kernel (``torch.compile``), the same function run eagerly as
the fallback.

Run as separate torch operations, CoGrad's rule makes 4 passes over (B, d) tensors per task and
GradDrop's sign split 3; each pass costs a kernel launch (a GPU) or a trip through memory (a CPU).
Compiled, each rule is one loop that reads every ``G_k`` once (figures in ``docs/performance.md``).

Compilation happens on a rule's first large call (seconds; cached by Inductor across processes) and
again if the batch size changes (then once for all sizes: dynamic shapes). The boundary makes that
first call itself, on zeros, in its forward pass (``Balancer.warm_up``), so no compile stalls a
backward. Small tensors, where a compile would cost more than it saves, run eagerly; so does every
call after a compile fails (no C++ compiler, say), with one warning that says why.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional

import torch

log = logging.getLogger(__name__)

# Below this many elements per gradient a rule runs eagerly: the kernels are short and a compile
# (seconds) would not pay for itself in a short job or a unit test.
MIN_FUSED_NUMEL = 1 << 15


class FusedRule:
    """Calls ``rule(grads, *args)`` compiled when ``enabled`` and each of the gradients ``grads`` (a
    list of equal-shaped tensors) has at least ``MIN_FUSED_NUMEL`` elements, else eagerly. ``rule``
    must be pure: compiled and eager give the same values up to floating-point rounding."""

    def __init__(self, rule: Callable, enabled: bool = True) -> None:
        self.rule = rule
        self.enabled = bool(enabled)
        self._compiled: Optional[Callable] = None
        self._failure: Optional[str] = None

    def __call__(self, grads: List[torch.Tensor], *args):
        if not self.enabled or self._failure is not None or grads[0].numel() < MIN_FUSED_NUMEL:
            return self.rule(grads, *args)
        if self._compiled is None:
            log.info("compiling %s into one kernel (once a run; Inductor caches it across runs)", self.rule.__qualname__)
            self._compiled = torch.compile(self.rule, fullgraph=True)
        try:
            return self._compiled(grads, *args)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager rule is exact
            self._failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log.warning(
                "could not compile %s (%s); it runs eagerly from now on, slower but with the same result",
                self.rule.__qualname__,
                self._failure,
            )
            return self.rule(grads, *args)
