"""Checkpoints of a training run: one :class:`Checkpointer` for one process and for DCP shards.

``OUT/checkpoint/`` holds ``meta.pt`` (step, tokens, schedule, data position, RNG, path choices),
the model and optimizer (``state.pt`` for one process; ``torch.distributed.checkpoint`` shards
``__<rank>_0.distcp`` plus ``.metadata`` under ``--parallel``, which any world size, DDP or FSDP2
resumes) and ``manifest.json`` (the sha256 of every other file), written last.

- Nothing in a checkpoint can run code: every ``torch.load`` is ``weights_only=True`` (tensors
  and plain containers only), and DCP's ``.metadata`` (which DCP reads with plain ``pickle``) is
  first read by an unpickler that can build DCP's metadata classes and nothing else.
- Nothing rotten is loaded: the manifest is checked before anything is unpickled; a file whose
  digest differs is named in the error and left untouched.
- A crash never loses the last checkpoint: the new one is written to ``.checkpoint.new`` and
  swapped in by two renames (old one to ``.checkpoint.old``); :meth:`Checkpointer.recover`
  completes or undoes a swap that a crash cut.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from torch import nn

from slcompile.recipes.distributed import DistContext
from slcompile.recipes.files import atomic_path, is_disk_full, sha256_file

VERSION = 2
MANIFEST, META, STATE, DCP_METADATA = "manifest.json", "meta.pt", "state.pt", ".metadata"
KINDS = {False: "single-process", True: "distributed"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or used; it is always left untouched."""


def _kept(path: Path) -> str:
    return f"{path} was left untouched: remove it to start over, or point --out elsewhere"


def safe_load(path: Path):
    """``torch.load(weights_only=True)``: refuses (without running) anything but tensors and plain data."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint file {path} holds objects other than tensors and plain data, which "
                              f"could run code when loaded; refused ({str(exc).splitlines()[0]}); "
                              + _kept(path)) from exc
    except Exception as exc:  # torch raises several types for truncated/garbled files
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); "
                              + _kept(path)) from exc


# What DCP's ``.metadata`` pickle names: its metadata dataclasses, torch sizes, dtypes and layouts, a path.
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "TensorStorageMetadata", "StorageMeta",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"} | {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that can build DCP metadata and nothing else (no other callable can be reached)."""

    def find_class(self, module: str, name: str):
        if name in _DCP_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


def _check_dcp_metadata(path: Path) -> None:
    """Unpickle DCP's ``.metadata`` with :class:`_MetadataUnpickler` first: DCP then reads it with
    plain ``pickle``, which would run any callable a hostile file names."""
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as exc:
        raise CheckpointError(f"checkpoint file {path} is not plain DCP metadata (it could run code when "
                              f"loaded); refused ({type(exc).__name__}: {exc}); " + _kept(path)) from exc


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state with FQNs free of DDP/FSDP2 prefixes (any layout reads any other)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


class Checkpointer:
    """Save and resume ``OUT/checkpoint/``; the caller does not care which kind it is.

    Under ``--parallel`` every rank calls :meth:`load_meta`, :meth:`load_state` and :meth:`save`
    (rank 0 alone :meth:`recover`): rank 0 writes ``meta.pt`` and the manifest and swaps
    directories; every rank writes its DCP shard and verifies the manifest.
    """

    def __init__(self, out: Path, ctx: DistContext):
        self.directory, self.ctx = out / "checkpoint", ctx
        self._new, self._old = out / ".checkpoint.new", out / ".checkpoint.old"
        self.kind = KINDS[ctx.enabled]

    def recover(self) -> None:
        """Finish or undo a swap that a crash cut (rank 0 alone, holding the run lock): a complete new
        checkpoint (manifest present) wins, else the previous one; refuses a format-1 ``checkpoint.pt``."""
        legacy = self.directory.with_name("checkpoint.pt")
        if legacy.exists():
            raise CheckpointError(f"{legacy} was written by an older slcompile (format 1, unpickled with code "
                                  "execution allowed); it cannot be resumed: " + _kept(legacy))
        if not self.directory.exists():
            if (self._new / MANIFEST).exists():
                os.replace(self._new, self.directory)
            elif self._old.exists():
                os.replace(self._old, self.directory)
        shutil.rmtree(self._new, ignore_errors=True)
        shutil.rmtree(self._old, ignore_errors=True)

    def load_meta(self) -> dict:
        """Verify the manifest and the kind, then return ``meta.pt``."""
        manifest = self._verify()
        if manifest.get("kind") != self.kind:
            how = ("without --parallel" if self.ctx.enabled else
                   "under torchrun with --parallel ddp or fsdp2 (any number of ranks dividing --batch-size)")
            raise CheckpointError(f"{self.directory} holds a {manifest.get('kind')} checkpoint: resume it {how}, "
                                  "or use another --out")
        return safe_load(self.directory / META)

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load model and optimizer state (resharding DCP shards to this world size and wrapper)."""
        if not self.ctx.enabled:
            state = safe_load(self.directory / STATE)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_state_dict
        _check_dcp_metadata(self.directory / DCP_METADATA)
        state = _state_dicts(model, optimizer)
        try:
            dcp.load(state, checkpoint_id=self.directory)
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            raise CheckpointError(f"distributed checkpoint {self.directory} does not fit this model "
                                  f"({type(exc).__name__}: {exc}); " + _kept(self.directory)) from exc
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
        """Write a complete checkpoint beside the current one, then swap it in.

        A failed write (a full disk) removes the partial one and raises on every rank: the
        previous one stays.
        """
        try:
            with self.ctx.all_or_none("writing the checkpoint"):
                self._write(model, optimizer, meta)
        except BaseException as exc:  # also DCP's CheckpointException
            if self.ctx.is_main:
                shutil.rmtree(self._new, ignore_errors=True)
            if is_disk_full(exc):
                raise CheckpointError(f"the disk is full: the checkpoint of step {meta['step']} could not be "
                                      f"written; the previous one in {self.directory} is intact") from exc
            raise
        if self.ctx.is_main:
            if self.directory.exists():
                os.replace(self.directory, self._old)
            os.replace(self._new, self.directory)
            shutil.rmtree(self._old, ignore_errors=True)
        self.ctx.barrier()

    def _write(self, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
        if self.ctx.is_main:
            shutil.rmtree(self._new, ignore_errors=True)
        self.ctx.barrier()
        if self.ctx.enabled:
            import torch.distributed.checkpoint as dcp
            dcp.save(_state_dicts(model, optimizer), checkpoint_id=self._new)  # returns once every rank wrote
        else:
            self._new.mkdir()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, self._new / STATE)
        if self.ctx.is_main:
            torch.save({"version": VERSION, **meta}, self._new / META)
            files = {p.name: sha256_file(p) for p in sorted(self._new.iterdir())}
            with atomic_path(self._new / MANIFEST) as tmp:
                tmp.write_text(json.dumps({"version": VERSION, "kind": self.kind, "sha256": files}, indent=1))

    def _verify(self) -> dict:
        """The manifest, after checking every file it lists against its sha256."""
        path = self.directory / MANIFEST
        try:
            manifest = json.loads(path.read_text())
            digests = dict(manifest["sha256"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint manifest {path} is missing or unreadable ({exc}); "
                                  + _kept(self.directory)) from exc
        for name, expected in digests.items():
            file = self.directory / name
            if file.parent != self.directory or not file.is_file() or sha256_file(file) != expected:
                raise CheckpointError(f"checkpoint file {file} is damaged or missing (its sha256 differs from "
                                      f"the one in {MANIFEST}); " + _kept(file))
        if STATE not in digests and DCP_METADATA not in digests or META not in digests:
            raise CheckpointError(f"checkpoint manifest {path} lists no model state; " + _kept(self.directory))
        return manifest
