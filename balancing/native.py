"""The boundary's cheapest steps as C++ autograd nodes (``csrc/nodes.cpp``), and its passes over the
task gradients (``csrc/passes.cpp``).

On a CPU most steps' backward is small arithmetic: where autograd sums the task gradients
(``autograd_sums``), scaling that sum and checking it; between a lagged rule's sums, the held
coefficients' weighted sum and its check. A Python node costs more than that arithmetic, in the
engine's call into the interpreter and in the interpreter itself, and PyTorch has no native node that
does it, so these are compiled once per machine by PyTorch's own extension builder (a C++ compiler
and ninja; about 30 s, cached under ``TORCH_EXTENSIONS_DIR``, ``~/.cache/torch_extensions`` by
default, in a folder named by a digest of the sources, the flags and the torch that builds them: two
versions of Concord, or two environments, on one machine each keep their own build, neither rebuilds
the other's nor loads it mid-job). Where they cannot be built, or with ``CONCORD_NATIVE=0``, the
boundary keeps its Python nodes, after one warning that says why: the results are the same.

CoGrad's element-wise rule, run compiled by ``torch.compile``, spent about as long in its Python call
and guards as in its loop, and its loop took about twice as long as a hand-vectorised one:
``cograd_pass`` forms the rule (and on a statistics step its norms) in one vectorised pass, and the
between-sums node runs it with no Python in backward (docs/performance.md).

Torch's ops read the gradients once per operation: the sum's ``mul`` and ``add_``, its check, and on a
lagged rule's statistics step the Gram's dot products. The passes read each gradient once, a block
at a time: the same sum, bit for bit; the check asks whether every element is finite (torch's ops,
whether their sum is: they differ only where a finite aggregate's sum overflows); the dot
products are summed in float64 across blocks, where ``torch.dot`` sums in the gradients' dtype.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("passes.cpp", "nodes.cpp")]  # in this order: nodes.cpp uses passes.cpp
_built: dict = {}


def native_ops() -> Optional[object]:
    """The compiled module (``sum_at_view``, ``held_sum``, ``gram_and_sum``, ``checked_weighted_sum``,
    ``cograd_pass``, ``cograd_telemetry_pass``), built on first use; None where it cannot be built or ``CONCORD_NATIVE=0``."""
    if "ops" not in _built:
        _built["ops"] = None if os.environ.get("CONCORD_NATIVE", "1") == "0" else _build()
    return _built["ops"]


def passable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the passes take ``tensors`` (``concord::passable`` in csrc/passes.cpp): contiguous CPU
    float32 or float64 tensors of one dtype and shape."""
    if not tensors or tensors[0].dtype not in (torch.float32, torch.float64):
        return False
    first = tensors[0]
    return all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == first.dtype and t.shape == first.shape for t in tensors)


def wide_vector_passes() -> Optional[object]:
    """The compiled module where its vectorised passes have vectors of 32 bytes or more (AVX2,
    AVX-512); else None. CoGrad's pass with 16-byte vectors took longer than its ``torch.compile``d
    rule (docs/performance.md), so there the rule stays compiled by torch."""
    ops = native_ops()
    if "wide" not in _built:
        _built["wide"] = ops is not None and max(ops.vector_widths()) >= 32
    return ops if _built["wide"] else None


def _build() -> Optional[object]:
    from torch.utils import cpp_extension

    # Said once a machine, by its first local rank (torchrun's LOCAL_RANK), not by each of its ranks.
    level = logging.INFO if os.environ.get("LOCAL_RANK", "0") == "0" else logging.DEBUG
    log.log(level, "loading Concord's native boundary nodes (the first time on a machine they are built: ~30 s)")
    sources = [source.read_text() for source in _SOURCES]
    functions = ["sum_at_view", "held_sum", "gram_and_sum", "checked_weighted_sum", "cograd_pass", "cograd_telemetry_pass", "vector_widths", "use_vector_width", "probe", "set_alone_references"]
    try:
        try:
            # The passes share their blocks among torch's intra-op threads through at::parallel_for,
            # which is OpenMP in torch's CPU wheels: without -fopenmp it runs on one thread.
            # load_inline adds its header and module definition to the list it is given: each call its own.
            flags = {"extra_cflags": ["-O3", "-fopenmp"], "extra_ldflags": ["-fopenmp"]}
            ops = cpp_extension.load_inline(extension_name("concord_boundary", sources, flags), cpp_sources=list(sources),
                                            functions=functions, **flags)
        except Exception as error:  # noqa: BLE001 - a compiler without OpenMP: the passes on one thread
            log.info("building Concord's native nodes without OpenMP (%s)", (str(error).strip().splitlines() or [""])[0])
            flags = {"extra_cflags": ["-O3"]}
            ops = cpp_extension.load_inline(extension_name("concord_boundary_serial", sources, flags),
                                            cpp_sources=list(sources), functions=functions, **flags)
        ops.set_alone_references(_alone_references(ops))
        return ops
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, no headers: the Python node is exact
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log.warning("could not build Concord's native boundary node (%s: %s); the boundary keeps its Python "
                    "node, slower on a CPU but with the same results", type(error).__name__, first)
        return None


def extension_name(stem: str, sources: Sequence[str], flags: dict) -> str:
    """``stem`` and a digest of what the build depends on. PyTorch keeps one build folder per
    extension name and rebuilds in place when the sources change: under one name, a job of one
    version of Concord would rebuild another's module, or load it half-way through its ranks' start."""
    digest = hashlib.sha256()
    for part in (*sources, repr(sorted(flags.items())), torch.__version__, str(Path(torch.__file__).parent)):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"{stem}_{digest.hexdigest()[:12]}"


def _alone_references(ops) -> int:
    """The reference count of a gradient that only autograd hands to a C++ node: that of a sum
    formed by a multiplication's backward, which nothing else can hold."""
    record = torch.zeros(1, dtype=torch.float64)
    x = torch.zeros(4, requires_grad=True)
    with torch.enable_grad():
        (ops.probe(x, record) * 2).sum().backward()
    return int(record[0])
