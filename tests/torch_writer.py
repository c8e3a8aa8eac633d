"""Test-only writer of PyTorch checkpoint files, without torch.

Writes the zip format (torch >= 1.6 default) and the legacy stream format
(torch < 1.6, or ``_use_new_zipfile_serialization=False``) so the reader can be
tested on files with known content, including malformed ones.  Not part of the
package: the library only *reads* checkpoints.

Objects to save may contain numpy arrays (saved as tensors with their own
storage), :class:`Tensor` (explicit storage / offset / shape / stride, to share
one storage between several tensors) and :class:`Global` (an arbitrary global
reference, to build hostile pickles).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

_STORAGE_NAMES = {
    "float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
    "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage",
    "bool": "BoolStorage",
}

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class Global:
  """A reference to ``module.name`` inside the pickle (need not be importable)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle requires reduce functions to be callable
    raise TypeError("placeholder for a pickled global")


class Storage:
  """A flat typed storage; identity decides sharing."""

  def __init__(self, data: np.ndarray):
    self.data = np.ascontiguousarray(data).reshape(-1)


class Tensor:
  """A strided view of a :class:`Storage` (offset and strides in elements)."""

  def __init__(self, storage: Storage, offset: int, shape, stride=None):
    shape = tuple(int(s) for s in shape)
    if stride is None:
      stride, acc = [], 1
      for n in reversed(shape):
        stride.append(acc)
        acc *= n
      stride = tuple(reversed(stride))
    self.storage, self.offset, self.shape, self.stride = storage, offset, shape, tuple(stride)

  def __reduce__(self):
    return (Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, self.shape, self.stride, False,
             collections.OrderedDict()))


def as_tensor(array) -> Tensor:
  array = np.asarray(array)
  return Tensor(Storage(array), 0, array.shape)


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us emit any GLOBAL
  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self.legacy = legacy
    self.storages: dict[str, Storage] = {}
    self._keys: dict[int, str] = {}

  def persistent_id(self, obj):
    if isinstance(obj, np.ndarray):
      return None  # arrays are converted to Tensor before pickling
    if not isinstance(obj, Storage):
      return None
    key = self._keys.get(id(obj))
    if key is None:
      key = str(len(self._keys))
      self._keys[id(obj)] = key
      self.storages[key] = obj
    dtype_name = np.dtype(obj.data.dtype).name
    pid = ("storage", Global("torch", _STORAGE_NAMES[dtype_name]), key, "cpu",
           obj.data.size)
    return pid + (None,) if self.legacy else pid

  def _save_global_ref(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
    self.memoize(obj)

  dispatch[Global] = _save_global_ref


def _prepare(obj):
  """Numpy arrays -> Tensor (recursively in dicts, lists, tuples)."""
  if isinstance(obj, (np.ndarray, np.generic)):
    return as_tensor(obj)
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _prepare(v)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _prepare(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_prepare(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_prepare(v) for v in obj)
  return obj


def _pickle(obj, legacy: bool):
  buf = io.BytesIO()
  p = _Pickler(buf, legacy)
  p.dump(_prepare(obj))
  return buf.getvalue(), p.storages


def _raw(storage: Storage) -> bytes:
  data = storage.data
  if data.dtype.byteorder == ">":
    data = data.astype(data.dtype.newbyteorder("<"))
  return data.tobytes()


def save_zip(obj, path, archive: str = "archive", extra_entries=None, skip=()):
  """Writes ``obj`` in the zip format; ``extra_entries`` {name: bytes} added,
  entries whose name is in ``skip`` left out (for building broken files)."""
  data_pkl, storages = _pickle(obj, legacy=False)
  entries = {f"{archive}/data.pkl": data_pkl, f"{archive}/byteorder": b"little",
             f"{archive}/version": b"3\n"}
  for key, storage in storages.items():
    entries[f"{archive}/data/{key}"] = _raw(storage)
  entries.update(extra_entries or {})
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    for name, blob in entries.items():
      if name not in skip:
        zf.writestr(name, blob)


def legacy_bytes(obj) -> bytes:
  """``obj`` in the legacy stream format, as bytes."""
  main, storages = _pickle(obj, legacy=True)
  out = io.BytesIO()
  for header in (LEGACY_MAGIC, LEGACY_PROTOCOL,
                 {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
    pickle.dump(header, out, protocol=2)
  out.write(main)
  keys = sorted(storages)
  pickle.dump(keys, out, protocol=2)
  for key in keys:
    out.write(struct.pack("<q", storages[key].data.size))
    out.write(_raw(storages[key]))
  return out.getvalue()


def save_legacy(obj, path):
  with open(path, "wb") as f:
    f.write(legacy_bytes(obj))


def pickle_bytes(obj) -> bytes:
  """Just the (zip-style) pickle of ``obj``."""
  return _pickle(obj, legacy=False)[0]
