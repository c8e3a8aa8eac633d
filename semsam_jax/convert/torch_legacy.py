"""Reader for the legacy (non-zip) ``torch.save`` format, without torch.

Files written by PyTorch before 1.6, or later with
``_use_new_zipfile_serialization=False``, are one flat stream:

1. a pickled magic number, 2. a pickled protocol version, 3. a pickled dict of
system information (byte order, C type sizes), 4. the main pickle, whose
tensors reference storages through persistent ids
``('storage', storage_type, key, location, numel, view_metadata)``, 5. a
pickled list of storage keys, and 6. for each of those keys, in that order, an
8-byte little-endian element count followed by the raw little-endian data.

The storage data comes *after* the main pickle, and its size in bytes depends
on the storage types named inside that pickle.  So the main pickle is read
twice: a first pass (which builds no tensors) records every storage's type and
size; then the storages are read; a second pass builds the tensors from them.
Both passes use the caller's restricted unpickler class, so the same
allow-list of globals applies as for zip checkpoints.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from typing import Any, BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_NOOP_MODULES = ("torch._utils",)  # tensor/parameter rebuild functions


def _noop(*args, **kwargs):
  return None


class _Truncated(Exception):
  pass


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
  data = f.read(n)
  if len(data) != n:
    raise _Truncated(f"file ends inside {what} (wanted {n} bytes, got {len(data)})")
  return data


def _storage_entry(pid, error_cls):
  """Validates a persistent id; returns (storage_type, key, numel, view_metadata)."""
  if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
    raise error_cls(f"unsupported persistent id in checkpoint: {pid!r}")
  storage_type, key, _location, numel = pid[1:5]
  view = pid[5] if len(pid) > 5 else None
  if not hasattr(storage_type, "dtype"):
    raise error_cls(f"persistent id names no storage type: {pid!r}")
  try:
    numel = int(numel)
  except (TypeError, ValueError):
    raise error_cls(f"persistent id with a non-integer size: {pid!r}") from None
  if numel < 0:
    raise error_cls(f"persistent id with a negative size: {pid!r}")
  if view is not None:
    if not (isinstance(view, tuple) and len(view) == 3):
      raise error_cls(f"malformed storage view in persistent id: {pid!r}")
    view = (str(view[0]), int(view[1]), int(view[2]))
  return storage_type, str(key), numel, view


def read_legacy(path: str | os.PathLike, unpickler_cls: type, error_cls: type) -> Any:
  """Unpickles a legacy-format ``.pth`` file, tensors as numpy arrays.

  Args:
    path: the file.
    unpickler_cls: a restricted ``pickle.Unpickler`` subclass constructed as
      ``unpickler_cls(file, load_storage)``; its ``find_class`` decides which
      globals are allowed (see :mod:`semsam_jax.convert.torch_pth`).
    error_cls: exception class raised for unreadable files.

  Raises:
    error_cls: truncated or corrupt file, disallowed globals, unsupported
      layout.  Never a bare ``struct``/``pickle``/``EOFError``.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    try:
      return _read(f, path, unpickler_cls, error_cls)
    except error_cls:
      raise
    except _Truncated as e:
      raise error_cls(f"{path}: truncated legacy checkpoint: {e}") from None
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError,
            KeyError, IndexError, AttributeError, OverflowError, MemoryError) as e:
      raise error_cls(f"{path}: corrupt legacy checkpoint ({type(e).__name__}: {e})") from e


def _read(f: BinaryIO, path: str, unpickler_cls: type, error_cls: type) -> Any:

  def small_pickle(what):
    # Header pickles contain only builtins; the restricted class refuses the rest.
    try:
      return unpickler_cls(f, _refuse_storage(error_cls)).load()
    except EOFError:
      raise _Truncated(f"the {what}") from None

  head = f.read(4)
  f.seek(0)
  if head.startswith(b"PK"):
    raise error_cls(f"{path}: corrupt or truncated zip checkpoint (no readable "
                    "central directory)")
  if not head or head[0] != 0x80:  # PROTO opcode: every torch.save pickle starts with it
    raise error_cls(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a "
                    "legacy torch.save stream)")
  magic = small_pickle("magic number")
  if magic != MAGIC_NUMBER:
    raise error_cls(f"{path}: not a PyTorch checkpoint (bad magic number {magic!r}; "
                    "tar-format checkpoints from torch < 0.4 are not supported)")
  protocol = small_pickle("protocol version")
  if protocol != PROTOCOL_VERSION:
    raise error_cls(f"{path}: unsupported legacy checkpoint protocol {protocol!r}")
  sys_info = small_pickle("system info")
  if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
    raise error_cls(f"{path}: big-endian legacy checkpoints are not supported")

  # Pass 1: record the storages the main pickle references, build nothing.
  main_start = f.tell()
  entries: dict[str, tuple[np.dtype, int]] = {}
  views: dict[str, tuple[str, int, int]] = {}

  class Scanner(unpickler_cls):

    def find_class(self, module, name):
      obj = super().find_class(module, name)  # raises for disallowed globals
      return _noop if module in _NOOP_MODULES else obj

    def persistent_load(self, pid):
      storage_type, key, numel, view = _storage_entry(pid, error_cls)
      dtype = np.dtype(storage_type.dtype)
      old = entries.get(key)
      if old is not None and old != (dtype, numel):
        raise error_cls(f"{path}: storage {key} is referenced with two different "
                        f"types/sizes {old} and {(dtype, numel)}")
      entries[key] = (dtype, numel)
      if view is not None:
        views[view[0]] = (key, view[1], view[2])
      return None

  try:
    Scanner(f, _refuse_storage(error_cls)).load()
  except EOFError:
    raise _Truncated("the main pickle") from None
  main_end = f.tell()

  try:
    keys = unpickler_cls(f, _refuse_storage(error_cls)).load()
  except EOFError:
    raise _Truncated("the list of storage keys") from None
  if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) for k in keys):
    raise error_cls(f"{path}: malformed list of storage keys")
  missing = sorted(set(entries) - set(keys))
  if missing:
    raise error_cls(f"{path}: storages referenced but not stored: {missing[:10]}")

  # Storage data, in the order of the key list.
  file_size = os.fstat(f.fileno()).st_size
  storages: dict[str, np.ndarray] = {}
  for key in keys:
    if key not in entries:
      raise error_cls(f"{path}: stored storage {key} is not referenced by any tensor "
                      "(cannot tell its element type)")
    dtype, numel = entries[key]
    (count,) = struct.unpack("<q", _read_exact(f, 8, f"the size of storage {key}"))
    if count != numel:
      raise error_cls(f"{path}: storage {key} holds {count} elements, expected {numel}")
    nbytes = count * dtype.itemsize
    if nbytes > file_size - f.tell():
      raise _Truncated(f"the data of storage {key} ({nbytes} bytes needed, "
                       f"{file_size - f.tell()} left)")
    raw = _read_exact(f, nbytes, f"the data of storage {key}")
    storages[key] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)

  for view_key, (root, offset, size) in views.items():
    base = storages[root]
    if offset < 0 or size < 0 or offset + size > base.size:
      raise error_cls(f"{path}: storage view {view_key} [{offset}:{offset + size}] lies "
                      f"outside storage {root} of {base.size} elements")

  # Pass 2: build the object with the real storages.
  end_of_file = f.tell()
  f.seek(main_start)
  main_bytes = _read_exact(f, main_end - main_start, "the main pickle")
  f.seek(end_of_file)

  class Builder(unpickler_cls):

    def persistent_load(self, pid):
      _, key, _, view = _storage_entry(pid, error_cls)
      data = storages[key]
      if view is not None:
        _, offset, size = view
        data = data[offset:offset + size]
      return data

  return Builder(io.BytesIO(main_bytes), _refuse_storage(error_cls)).load()


def _refuse_storage(error_cls):
  def load_storage(key, dtype, numel):
    raise error_cls(f"unexpected storage reference {key!r} outside the main pickle")
  return load_storage
