"""Reads a PyTorch checkpoint of plain tensors into numpy arrays, without torch.

Only the legacy serialization (`torch.save(..., _use_new_zipfile_serialization=False)`,
the format of the EfficientNet-Lite0 ImageNet weights) is read:

    pickle: magic number, protocol, system info
    pickle: the state dict; each tensor refers to a storage by key (persistent id)
    pickle: the storage keys, in the order their data follow
    per storage: int64 element count, then the raw little-endian elements

The unpickler resolves a fixed allow-list of names (an ordered dict, tensor rebuilds,
typed storages) and refuses any other global, so a hostile file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
import struct
from typing import Any, BinaryIO

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
    """The file is not a legacy PyTorch checkpoint of plain tensors."""


class _Tensor:
    """A tensor before its storage has been read: (storage key, offset, shape, strides)."""

    def __init__(self, storage, offset, shape, stride, *_):
        self.key, self.offset, self.shape, self.stride = storage, int(offset), tuple(shape), tuple(stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, dtypes: dict[str, Any]):
        super().__init__(f)
        self._dtypes = dtypes

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _Tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise CheckpointError(f"refusing to load {module}.{name}: only plain tensors are read")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, element count, view metadata)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent id {pid!r:.80}")
        self._dtypes[str(pid[2])] = _STORAGE_DTYPES[pid[1]]
        return str(pid[2])


def read_state_dict(f: BinaryIO) -> dict[str, np.ndarray]:
    """A legacy PyTorch checkpoint (an open binary file) -> {name: numpy array}."""
    try:
        if pickle.load(f) != _MAGIC:
            raise CheckpointError("not a legacy PyTorch checkpoint (wrong magic number)")
        pickle.load(f), pickle.load(f)  # protocol version, system info
        dtypes: dict[str, Any] = {}
        state = _Unpickler(f, dtypes).load()
        keys = pickle.load(f)
        storages = {}
        for key in keys:
            (count,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(dtypes[key])
            storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
    except CheckpointError:
        raise
    except Exception as e:  # truncated file, pickle errors, unknown storage
        raise CheckpointError(f"cannot read the checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint holds a {type(state).__name__}, not a state dict")
    out = {}
    for name, t in state.items():
        if not isinstance(t, _Tensor):
            raise CheckpointError(f"{name} is not a tensor")
        data = storages[t.key]
        itemsize = data.dtype.itemsize
        out[name] = np.lib.stride_tricks.as_strided(
            data[t.offset:], shape=t.shape, strides=tuple(s * itemsize for s in t.stride)).copy()
    return out
