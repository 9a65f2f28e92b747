"""The training loop's step drivers (``train.pipeline``).

``sparse_dist``: TorchRec's :class:`TrainPipelineSparseDist`. While batch i runs forward and
backward, batch i+1's sparse features are already on their way to the ranks that own their tables
(the input all-to-all) and batch i+2 is copied to the device on a stream of its own. TorchRec calls
``loss.backward()`` and ``optimizer.step()`` itself; here its two hooks run Concord's own instead
(the boundary's non-finite policy, parameter-level methods, clipping), so every step means the same
as without the pipeline. ``plain``: one batch at a time, nothing overlapped.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import NoWait

from concord.trainer.data.reader import Batch
from concord.trainer.observe.timing import StepTimer


class PlainSteps:
    """One batch at a time: :meth:`Trainer.train_step`."""

    def __init__(self, trainer, batches: Iterator[Batch]) -> None:
        self.trainer, self.batches = trainer, batches

    def step(self, timer: StepTimer):
        return self.trainer.train_step(self.batches, timer)

    def pause(self) -> None:
        """Before evaluating: nothing to undo."""

    def close(self) -> None:
        """After the last step: nothing to undo."""


class SparseDistSteps(TrainPipelineSparseDist):
    """TorchRec's pipeline around the trainer's forward, backward and update. Phase timings: ``data``
    is the wait for the next decoded batch; ``input_dist`` the rest before the forward (batch i's
    wait, starting batch i+1's input all-to-all, batch i+2's copy to the device); the end of batch
    i+1's all-to-all falls in ``backward``."""

    def __init__(self, trainer, batches: Iterator[Batch]) -> None:
        super().__init__(trainer.dmp, trainer.optimizer, trainer.rt.device, custom_model_fwd=self._forward)
        # not ``batches``: TorchRec's pipeline keeps its batches in flight under that name
        self._trainer, self._data = trainer, _Marked(self, batches)
        self._timer: Optional[StepTimer] = None
        self._out = None
        self._bad: List[str] = []

    def step(self, timer: StepTimer):
        self._timer = timer
        timer.start()
        if not self._model_attached and self.contexts:
            # TorchRec's attach starts batch i+1's input all-to-all again; completed here, no
            # collective is left behind unwaited.
            self.attach(self._model)
            self.wait_sparse_data_dist(self.contexts[0])
        out = self.progress(self._data)
        return out, self._trainer.step_timings(timer)

    def pause(self) -> None:
        """Before the model is called outside the pipeline (evaluation): its own forwards back. The
        batches in flight stay; the next :meth:`step` re-attaches."""
        self._settle()
        self.detach()

    def close(self) -> None:
        """After the last step: as before an evaluation."""
        self.pause()

    def _settle(self) -> None:
        """Completes the input all-to-alls already under way for the batches in flight (their results
        kept for those batches' forward), so that none is pending while the model is used outside the
        pipeline or when the process group is destroyed."""
        with self._stream_context(self._data_dist_stream):
            for context in self.contexts:
                for name, request in list(context.input_dist_tensors_requests.items()):
                    context.input_dist_tensors_requests[name] = NoWait(request.wait())

    # TorchRec's hooks -------------------------------------------------------------------------
    def _forward(self, batch: Batch) -> Tuple[torch.Tensor, object]:
        self._timer.mark("input_dist")
        out = self._out = self._trainer.forward(batch)
        self._timer.mark("forward")
        return out.objective, out

    def _backward(self, losses: torch.Tensor) -> None:
        self._bad = self._trainer.backward(self._out)
        self._timer.mark("backward")

    def _optimizer_step(self) -> None:
        self._trainer.update(self._bad)
        self._timer.mark("optimizer")


class _Marked:
    """The batches, with the time spent waiting for each marked ``data`` on the step's timer."""

    def __init__(self, steps: SparseDistSteps, batches: Iterator[Batch]) -> None:
        self.steps, self.batches = steps, batches

    def __iter__(self) -> "_Marked":
        return self

    def __next__(self) -> Batch:
        self.steps._timer.mark("input_dist")
        batch = next(self.batches)
        self.steps._timer.mark("data")
        return batch


def step_driver(trainer, batches: Iterator[Batch]):
    """The configured driver of the training steps."""
    if trainer.cfg.train.pipeline == "sparse_dist":
        return SparseDistSteps(trainer, batches)
    return PlainSteps(trainer, batches)
