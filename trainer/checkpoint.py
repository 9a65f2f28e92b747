"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, newest found on start, last K kept.

What is saved, all of it tensors: the sharded model (tables as ShardedTensors, dense parameters), the
optimizers' state (the fused embedding optimizer's and the dense one's; hyper-parameters come from the
config, so param_groups are left out), the balancer's state (EMA norms, weights, bandit, random
generators) and the progress (global step). The data position beside it, in ``concord.json``, says
how the step's epoch is being read (:mod:`concord.trainer.data.position`).

Atomic: every rank writes into ``step-XXXXXXXX.tmp``; after a barrier the ranks checksum the files,
each its share (:func:`checksums_together`), and rank 0 records the size and CRC-32 of every file in
``concord.json`` (with the run's resume fingerprint) and renames the directory
to ``step-XXXXXXXX``, so a directory without ``.tmp`` is complete on every rank. A run killed mid-write
leaves only a ``.tmp`` directory, which is ignored (and removed by the next save).

Integrity: before loading, every file is checked against ``concord.json``, each rank reading its share
of the files (:func:`verify_together`). A damaged checkpoint (a file missing, truncated or changed) is
reported and the previous intact one is used.

Safe loading: DCP reads its ``.metadata`` file with ``pickle.load``, and non-tensor entries with
``torch.load(weights_only=False)``. Concord saves no non-tensor entries, and reads the metadata with an
unpickler that only admits DCP's metadata classes and torch's dtype/size/layout values, so nothing in a
checkpoint can run code when it is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from concord.balancing.collectives import sum_over_ranks
from concord.trainer.data.layout import published_checkpoints

logger = logging.getLogger("concord.checkpoint")

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "StorageMeta", "Metadata", "MetadataIndex",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size", "strided", "sparse_coo", "contiguous_format", "channels_last", "preserve_format"}
    | {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)},
    "collections": {"OrderedDict"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id
    "builtins": {"set", "frozenset", "tuple", "list", "dict"},
    "torch.serialization": {"_get_layout"},  # maps a layout name to torch.strided etc.
}


class CheckpointError(RuntimeError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which is not allowed to load")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


class Checkpointer:
    """Saves and finds checkpoints under ``root``; ``keep`` newest complete ones are kept."""

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def complete(self) -> list[Path]:
        """Published checkpoints (intact or damaged), oldest first."""
        return published_checkpoints(self.root)

    def latest(self) -> Optional[Path]:
        """The newest intact checkpoint; damaged newer ones are reported (logged) and passed over.
        Raises :class:`CheckpointError` when checkpoints exist but none is intact. Collective where a
        process group is up (:func:`verify_together`)."""
        published = self.complete()
        damaged = []
        for path in reversed(published):
            problem = verify_together(path)
            if problem is None:
                if damaged:
                    logger.warning("using %s instead of the damaged newer checkpoint(s): %s", path.name, "; ".join(damaged))
                return path
            damaged.append(f"{path.name}: {problem}")
        if damaged:
            raise CheckpointError(
                f"{self.root}: no intact checkpoint ({'; '.join(damaged)}); train.resume=false starts afresh "
                "(the damaged run moves to previous-<id>/)"
            )
        return None

    def info(self, path: Path) -> Dict[str, Any]:
        """What :meth:`save` recorded beside the tensors (``concord.json``), less the file list."""
        record = json.loads((path / INFO_FILE).read_text()) if (path / INFO_FILE).is_file() else {}
        record.pop("files", None)
        return record

    def save(self, step: int, state: Dict[str, Any], info: Optional[Dict[str, Any]] = None) -> Path:
        """Collective: every rank calls it with its own (sharded) state; ``info`` (JSON) is recorded
        beside it with the files' checksums."""
        final = self.root / f"step-{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if _is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # re-saving a step (after a restart): the new one replaces it
                shutil.rmtree(final)
        _barrier()
        try:
            dcp.save(state, storage_writer=FileSystemWriter(str(tmp)))
        except (Exception, CheckpointException) as error:  # noqa: BLE001 - named below when the cause is the disk
            raise CheckpointError(f"cannot write checkpoint {final}: {_disk_problem(self.root) or error}") from error
        _barrier()
        files = checksums_together(tmp)
        if _is_main():
            (tmp / INFO_FILE).write_text(json.dumps({**(info or {}), "step": step, "files": files}, sort_keys=True))
            tmp.rename(final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("checkpoint written: %s", final)
        _barrier()
        return final

    @staticmethod
    def load(path: Path, state: Dict[str, Any]) -> None:
        """Collective: loads into ``state``'s tensors in place (resharding as DCP does)."""
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)))
        except CheckpointException as error:  # every rank's traceback in one exception: keep the first line
            first = next((line for line in str(error).splitlines() if "Error" in line), str(error).splitlines()[0])
            raise CheckpointError(f"{path}: cannot be loaded ({first.strip()})") from None


INFO_FILE = "concord.json"


def _disk_problem(folder: Path) -> Optional[str]:
    """Why writing under ``folder`` fails, when the disk is the reason: read-only, or (nearly) full."""
    if not os.access(folder, os.W_OK):
        return f"{folder} is not writable (read-only file system or permissions)"
    free = shutil.disk_usage(folder).free
    if free < (256 << 20):
        return f"the disk holding {folder} is full ({free >> 20} MiB free)"
    return None


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify(path: Path, share: Tuple[int, int] = (0, 1)) -> Optional[str]:
    """None if every file of the checkpoint matches its recorded size and CRC-32, else what is wrong.
    ``share`` (k, n): only the files that :func:`_shares` gives the k-th of n readers."""
    info_path = path / INFO_FILE
    if not info_path.is_file():
        return f"{INFO_FILE} is missing (not written by this version, or the directory was damaged)"
    try:
        files = json.loads(info_path.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{INFO_FILE} is unreadable ({e})"
    mine, readers = share
    for name in _shares(files, readers)[mine]:
        size, crc = files[name]
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
        if _crc32(f) != crc:
            return f"{name} does not match its checksum"
    return None


_RANKS_FILE = re.compile(r"__(\d+)_\d+\.distcp")  # how DCP's FileSystemWriter names rank k's data


def _shares(files: Dict[str, Any], readers: int) -> list[list[str]]:
    """The recorded files dealt to ``readers``: a rank's own data file to that rank (after a save it
    is still in that host's page cache), the rest by size, largest first to the reader with the fewest
    bytes so far (ties: the lower one), so that no reader waits long on another; each reader's files in
    name order. The same on every rank, as the record is."""
    shares: list[list[str]] = [[] for _ in range(readers)]
    loads = [0] * readers
    rest = []
    for name, (size, _) in sorted(files.items(), key=lambda item: (-item[1][0], item[0])):
        match = _RANKS_FILE.fullmatch(name)
        writer = int(match.group(1)) if match else readers
        if writer < readers:
            shares[writer].append(name)
            loads[writer] += size
        else:
            rest.append((name, size))
    for name, size in rest:  # after every own file, so that the least loaded counts them
        reader = loads.index(min(loads))
        shares[reader].append(name)
        loads[reader] += size
    return [sorted(share) for share in shares]


def checksums_together(folder: Path) -> Dict[str, list[int]]:
    """``{name: [size, CRC-32]}`` of every file in ``folder``. Collective where a process group is up:
    rank 0 lists the files (a listing other ranks might see late on a network file system), each rank
    reads its share of them (:func:`_shares`), and one sum over ranks gathers the checksums (each below
    2^32, exact in float64): the job reads a new checkpoint once, not rank 0 all of it."""
    listing = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()} if _is_main() else None
    if not _distributed():
        return {name: [size, _crc32(folder / name)] for name, size in listing.items()}
    box = [listing]
    dist.broadcast_object_list(box, src=0)
    listing = box[0]
    names = sorted(listing)
    mine = set(_shares({name: [size, 0] for name, size in listing.items()}, dist.get_world_size())[dist.get_rank()])
    crcs = torch.tensor([float(_crc32(folder / name)) if name in mine else 0.0 for name in names], dtype=torch.float64)
    return {name: [listing[name], int(crc)] for name, crc in zip(names, sum_over_ranks(crcs).tolist())}


def verify_together(path: Path) -> Optional[str]:
    """:func:`verify` by all ranks of the job at once, where a process group is up (collective): each
    rank reads its share of the files (:func:`_shares`), so that the job reads the checkpoint once where
    each rank read all of it (on a shared file system, the ranks times the checkpoint's size); every
    rank gets a problem where any rank found one, named by that rank."""
    if not _distributed():
        return verify(path)
    mine = verify(path, (dist.get_rank(), dist.get_world_size()))
    found = sum_over_ranks(torch.tensor([float(mine is not None)], dtype=torch.float64))
    if float(found[0]) == 0.0:
        return None
    return mine or "a file failed its check on another rank (that rank's log names it)"
