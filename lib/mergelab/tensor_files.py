"""Safetensors files written and read one tensor at a time, so that a model-sized payload is never held whole.

A study's full-space merge of an LLM is as large as the model's adapted matrices (3.6 GiB of a
Llama-3.2-1B's 4.6 GiB): holding it beside the model, or every page of a mapped file of it, would
more than double the study's memory. Here:

* :func:`write_safetensors` writes exactly the bytes of :func:`safetensors.torch.save_file` (metadata
  first in the header, the tensors ordered by dtype, widest first, then by name, the header padded with
  spaces to 8 bytes) from any mapping, which it asks for one tensor at a time, twice: once for the
  header (dtype and shape), once for the bytes;
* :class:`FileTensors` reads a file's tensors one at a time, each a view of its own map of the file,
  which closes when the tensor is freed;
* :class:`Spool` is a folder of one-tensor files that a writer fills tensor by tensor (a merge, module by
  module) and reads back as :class:`FileTensors` does, for :func:`write_safetensors` to copy into one file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mergelab.lazy_mapping import LazyMapping

__all__ = ["FileTensors", "Spool", "write_safetensors"]

#: safetensors' dtype names, in the order of its ``Dtype`` enum (a file's tensors are sorted widest first by it)
DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.complex64: "C64",
    torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
_RANK = {name: i for i, name in enumerate(DTYPES.values())}


def _plain(t: Tensor) -> Tensor:
    return t.detach().contiguous().cpu()


def _bytes(t: Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _entry(t: Tensor) -> tuple[str, list[int], int]:
    """A tensor's header entry: safetensors dtype, shape and size in bytes."""
    return DTYPES[t.dtype], list(t.shape), t.numel() * t.element_size()


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file(tensors, path, metadata)``, holding one tensor of ``tensors`` at a time."""
    shapes = {name: _entry(tensors[name]) for name in tensors}
    order = sorted(shapes, key=lambda name: (-_RANK[shapes[name][0]], name))
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        dtype, shape, size = shapes[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(text)) + text)
            for name in order:
                out.write(_bytes(_plain(tensors[name])))
    except OSError as err:  # a full disk: name the file, as an error of open() does
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, os.fspath(path)) from None


class FileTensors(LazyMapping[Tensor]):
    """The tensors of a safetensors file, each read when asked for (a view of its own map of the file)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = os.fspath(path)
        with safe_open(self.path, framework="pt") as f:
            super().__init__(f.offset_keys())  # the order of load_file's dict

    def _make(self, name: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(name)


class Spool(LazyMapping[Tensor]):
    """Tensors written one by one into ``folder`` (one safetensors file each) and read back one by one;
    the folder is removed with the spool."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True)
        super().__init__(())
        weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)

    def __setitem__(self, name: str, tensor: Tensor) -> None:
        if name in self:
            raise KeyError(f"{name!r} is already spooled")
        path = self.folder / f"{len(self)}.safetensors"
        write_safetensors(path, {name: tensor})
        self._add(name, path)  # once written: a failed write leaves no name without its file

    def _make(self, name: str) -> Tensor:
        return FileTensors(self._names[name])[name]
