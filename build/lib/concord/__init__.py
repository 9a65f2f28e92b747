"""Concord: multi-task recommendation training with TorchRec, balancing the task gradients where the
tasks meet, at the shared representation.

Installed, the repository's folders are the subpackages ``concord.balancing`` (usable alone, needs only
torch and NumPy), ``concord.trainer``, ``concord.embeddings``, ``concord.heads``, ``concord.launch``
and ``concord.configs``.
"""

__version__ = "0.2.0"
