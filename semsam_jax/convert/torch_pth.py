"""Read PyTorch ``.pth`` checkpoints into numpy arrays without importing torch.

``torch.save`` writes a zip archive holding ``<name>/data.pkl`` (a pickle whose
tensors refer to storages through "persistent ids") and one ``<name>/data/<key>``
entry per storage.  We unpickle with a restricted ``Unpickler`` that only
resolves the handful of globals a state dict needs, turning each storage into a
flat numpy array and each tensor into a strided view of it.  Anything else in
the pickle (arbitrary classes, functions) is refused, so loading an untrusted
file cannot execute code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np


class CheckpointReadError(ValueError):
  """The file is not a readable PyTorch checkpoint."""


# torch storage class name -> numpy dtype
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

# torch dtype name (as pickled for UntypedStorage-era files) -> numpy dtype
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64,
    "double": np.float64, "float16": np.float16, "half": np.float16,
    "bfloat16": "bfloat16", "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}


def _np_dtype(spec):
  if isinstance(spec, str) and spec == "bfloat16":
    import ml_dtypes  # shipped with jax
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(spec)


class _StorageType:
  """Stand-in for ``torch.FloatStorage`` & co. inside the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _np_dtype(_STORAGE_DTYPES[name])


class _TorchDtype:
  def __init__(self, name: str):
    self.dtype = _np_dtype(_TORCH_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """Strided view of a flat storage array (what ``torch._utils._rebuild_tensor_v2`` does)."""
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  if not size:
    return np.array(storage[storage_offset])
  needed = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride) if n > 0)
  if any(n == 0 for n in size):
    return np.zeros(size, storage.dtype)
  if needed > storage.size:
    raise CheckpointReadError(
        f"tensor of shape {size} at offset {storage_offset} needs {needed} elements "
        f"but its storage has only {storage.size} (truncated or corrupt file)")
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size, strides=tuple(s * item for s in stride))
  return np.array(view)  # own the memory; contiguous


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  return data


def _ordered_dict(*args):
  return collections.OrderedDict(*args)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
  """Restricted unpickler; ``load_storage(key, dtype, numel)`` supplies storages."""

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage
    self._cache: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(name)
    if module == "torch" and name == "UntypedStorage":
      return _StorageType("ByteStorage")
    raise CheckpointReadError(
        f"refusing to unpickle {module}.{name}: only plain state dicts of tensors "
        "are supported")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise CheckpointReadError(f"unsupported persistent id in checkpoint: {pid!r}")
    _, storage_type, key, _location, numel = pid[:5]
    dtype = storage_type.dtype
    key = str(key)
    if key not in self._cache:
      self._cache[key] = self._load_storage(key, dtype, int(numel))
    return self._cache[key]


def _read_zip(path: str) -> Any:
  try:
    return _read_zip_archive(path)
  except CheckpointReadError:
    raise
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError,
          RuntimeError, ValueError, UnicodeDecodeError) as e:
    # A damaged archive can fail in many places inside zipfile.
    raise CheckpointReadError(
        f"{path}: corrupt or truncated zip checkpoint ({type(e).__name__}: {e})") from e


def _read_zip_archive(path: str) -> Any:
  try:
    zf = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise CheckpointReadError(f"{path}: corrupt or truncated zip checkpoint ({e})") from e
  with zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise CheckpointReadError(f"{path}: expected one data.pkl in the archive, found {pkl}")
    root = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if root + "byteorder" in names:
      byteorder = zf.read(root + "byteorder").decode().strip()

    def load_storage(key, dtype, numel):
      entry = f"{root}data/{key}"
      try:
        raw = zf.read(entry)
      except KeyError:
        raise CheckpointReadError(f"{path}: storage {entry} is missing") from None
      except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointReadError(f"{path}: cannot read storage {entry} ({e})") from e
      arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<" if byteorder == "little" else ">"))
      if arr.size < numel:
        raise CheckpointReadError(
            f"{path}: storage {entry} holds {arr.size} elements, expected {numel}")
      return arr[:numel].astype(dtype, copy=False)

    try:
      data = zf.read(pkl[0])
    except (zipfile.BadZipFile, EOFError, OSError) as e:
      raise CheckpointReadError(f"{path}: cannot read {pkl[0]} ({e})") from e
    try:
      return _Unpickler(io.BytesIO(data), load_storage).load()
    except CheckpointReadError:
      raise
    except Exception as e:  # malformed pickle stream
      raise CheckpointReadError(f"{path}: malformed checkpoint pickle ({e})") from e


def read_pth(path: str | os.PathLike) -> Any:
  """Unpickle a ``.pth`` file with every tensor as a numpy array."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if zipfile.is_zipfile(path):
    return _read_zip(path)
  from semsam_jax.convert import torch_legacy  # legacy (non-zip) torch.save format
  return torch_legacy.read_legacy(path, _Unpickler, CheckpointReadError)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Flat ``{key: array}`` state dict from a ``.pth`` file.

  Accepts a bare state dict or one wrapped as ``{'model': state_dict}`` (or
  ``'state_dict'``); keys are returned as saved (normally with ``model.``).
  """
  obj = read_pth(path)
  if isinstance(obj, dict):
    for wrapper in ("model", "state_dict"):
      inner = obj.get(wrapper)
      if isinstance(inner, dict) and inner and all(
          isinstance(v, np.ndarray) for v in inner.values()):
        obj = inner
        break
  if not isinstance(obj, dict) or not obj:
    raise CheckpointReadError(f"{path}: no state dict found (got {type(obj).__name__})")
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointReadError(f"{path}: entries that are not tensors: {bad[:10]}")
  return dict(obj)
