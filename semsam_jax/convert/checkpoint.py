"""Save / load converted Semantic-SAM weights as an orbax checkpoint + config.

Layout of a checkpoint directory::

    DIR/
      params/                 orbax (StandardSave) checkpoint of the param tree
      config.json             the ``model`` config section (semsam_jax.config schema)
      semsam_checkpoint.json  format marker, tensor and parameter counts

:func:`save_checkpoint` builds everything in a hidden temporary sibling
directory and renames it into place only when complete, so ``DIR`` is either
absent, the previous checkpoint, or the complete new one -- never partial.
Saving is meant for one process (the conversion tool); loading works on any
number of processes and can place every array directly onto a sharding.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from flax import traverse_util

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
INFO_FILE = "semsam_checkpoint.json"
FORMAT = "semsam_jax.params"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A checkpoint directory is missing pieces or cannot be restored."""


def _checkpointer():
  import orbax.checkpoint as ocp  # imported lazily: heavy
  return ocp, ocp.Checkpointer(ocp.StandardCheckpointHandler())


# --------------------------------------------------------------------------
# Config <-> JSON

def model_section(config) -> ml_collections.ConfigDict:
  """The ``model`` section of ``config`` (a full config with ``.model`` or the section)."""
  if isinstance(config, Mapping) and not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(dict(config))
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"expected an ml_collections ConfigDict, got {type(config).__name__}")
  if "model" in config and "backbone" not in config:
    config = config.model
  if "backbone" not in config or "decoder" not in config:
    raise ValueError("config has no model section (expected backbone / pixel_decoder / "
                     "decoder fields, or a .model holding them)")
  return ml_collections.ConfigDict(config.to_dict())


def _tuples(obj):
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  return obj


def config_to_json(config) -> str:
  return json.dumps(model_section(config).to_dict(), indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of :func:`config_to_json` (JSON lists become the schema's tuples)."""
  return ml_collections.ConfigDict(_tuples(json.loads(text)))


# --------------------------------------------------------------------------
# Save

def _plain_params(params) -> dict:
  from flax import core
  from flax.linen import meta
  params = meta.unbox(core.unfreeze(params))
  if not isinstance(params, Mapping) or not params:
    raise TypeError("params must be a non-empty nested dict of arrays")
  flat = traverse_util.flatten_dict(dict(params))
  bad = [("/".join(map(str, k)), type(v).__name__) for k, v in flat.items()
         if not isinstance(v, (np.ndarray, jax.Array))]
  if bad:
    raise TypeError(f"params leaves must be numpy or jax arrays; got {bad[:5]}")
  return traverse_util.unflatten_dict(flat)


def save_checkpoint(directory, params, config, *, overwrite: bool = False) -> pathlib.Path:
  """Writes ``params`` and ``config`` to ``directory`` atomically.

  Args:
    directory: destination; must not exist unless ``overwrite``.
    params: nested dict of numpy / jax arrays (Flax ``params`` collection).
    config: our config (the ``model`` section, or a config holding ``.model``).
    overwrite: replace an existing checkpoint directory.

  Returns:
    The absolute path written.

  Raises:
    FileExistsError: ``directory`` exists and ``overwrite`` is false.
  """
  if jax.process_count() > 1:
    raise NotImplementedError("save_checkpoint is single-process (conversion tool)")
  directory = pathlib.Path(directory).expanduser().absolute()
  if directory.exists() or directory.is_symlink():
    if not overwrite:
      raise FileExistsError(f"{directory} already exists (pass overwrite=True to replace it)")
    if not directory.is_dir() or directory.is_symlink():
      raise FileExistsError(f"{directory} exists and is not a directory; not replacing it")
  config_json = config_to_json(config)
  params = _plain_params(params)
  leaves = jax.tree_util.tree_leaves(params)
  info = dict(format=FORMAT, version=FORMAT_VERSION, num_tensors=len(leaves),
              num_params=int(sum(int(np.prod(x.shape)) for x in leaves)))

  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  try:
    ocp, ckptr = _checkpointer()
    ckptr.save(tmp / PARAMS_DIR, args=ocp.args.StandardSave(params))
    (tmp / CONFIG_FILE).write_text(config_json + "\n", encoding="utf-8")
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    if directory.exists():
      old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(directory, old)
      try:
        os.rename(tmp, directory)
      except BaseException:
        os.rename(old, directory)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


# --------------------------------------------------------------------------
# Load

ShardingSpec = Any  # None | Sharding | pytree of Shardings | callable(path, sds) -> Sharding


def _resolve_shardings(meta_flat: dict, sharding: ShardingSpec) -> dict:
  if sharding is None:
    device = jax.local_devices()[0]
    return {k: jax.sharding.SingleDeviceSharding(device) for k in meta_flat}
  if isinstance(sharding, jax.sharding.Sharding):
    return {k: sharding for k in meta_flat}
  if callable(sharding):
    out = {}
    for k, m in meta_flat.items():
      s = sharding(k, jax.ShapeDtypeStruct(tuple(m.shape), m.dtype))
      if not isinstance(s, jax.sharding.Sharding):
        raise TypeError(f"sharding callable returned {type(s).__name__} for {'/'.join(k)}")
      out[k] = s
    return out
  from flax import core
  from flax.linen import meta
  tree = meta.unbox(core.unfreeze(sharding))
  if not isinstance(tree, Mapping):
    raise TypeError("sharding must be None, a Sharding, a callable or a pytree of Shardings")
  flat = traverse_util.flatten_dict(dict(tree))
  missing = sorted("/".join(k) for k in meta_flat if k not in flat)
  extra = sorted("/".join(k) for k in flat if k not in meta_flat)
  if missing or extra:
    raise ValueError(f"sharding tree does not match the checkpoint: missing {missing[:10]}, "
                     f"unexpected {extra[:10]}")
  bad = ["/".join(k) for k, v in flat.items() if not isinstance(v, jax.sharding.Sharding)]
  if bad:
    raise TypeError(f"sharding tree leaves must be Shardings: {bad[:10]}")
  return flat


def read_config(directory) -> ml_collections.ConfigDict:
  """Just the config of a checkpoint directory."""
  path = _check_dir(directory) / CONFIG_FILE
  try:
    return config_from_json(path.read_text(encoding="utf-8"))
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: unreadable config ({e})") from e


def _check_dir(directory) -> pathlib.Path:
  directory = pathlib.Path(directory).expanduser().absolute()
  if not directory.is_dir():
    raise FileNotFoundError(f"checkpoint directory not found: {directory}")
  missing = [n for n in (PARAMS_DIR, CONFIG_FILE) if not (directory / n).exists()]
  if missing:
    raise CheckpointError(f"{directory} is not a semsam_jax checkpoint (missing "
                          f"{', '.join(missing)})")
  return directory


def _flat_keys(d, prefix=()):
  for k, v in d.items():
    if isinstance(v, Mapping):
      yield from _flat_keys(v, prefix + (k,))
    else:
      yield prefix + (k,)


def validate_config(config, meta_flat: Mapping[tuple, Any], where: str = "checkpoint") -> None:
  """Checks a checkpoint's config against our schema and its parameters.

  Every field of :func:`semsam_jax.config.model_config` must be present
  (except the training-only ``OPTIONAL_MODEL_FIELDS``, e.g. ``remat``), and
  the model that the config describes must have exactly the parameter
  names and shapes of ``meta_flat`` (``{path tuple: obj with .shape}``).
  Nothing is allocated (``jax.eval_shape``).

  Raises:
    CheckpointError: naming the missing fields or the first mismatched
      parameters with both shapes.
  """
  from semsam_jax.config import OPTIONAL_MODEL_FIELDS, model_config
  have = set(_flat_keys(config.to_dict()))
  missing = sorted(".".join(k) for k in _flat_keys(model_config().to_dict())
                   if k not in have and k not in OPTIONAL_MODEL_FIELDS)
  if missing:
    raise CheckpointError(f"{where}: config.json lacks field(s) {', '.join(missing[:8])}"
                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
  from semsam_jax.models import semantic_sam as ss
  try:
    shapes = traverse_util.flatten_dict(dict(ss.param_shapes(config)))
  except Exception as e:  # a value of the wrong type or an inconsistent combination
    msg = " ".join(str(e).split())[:300]
    raise CheckpointError(f"{where}: config.json does not describe a valid model "
                          f"({type(e).__name__}: {msg})") from None
  want = {k: tuple(v.shape) for k, v in shapes.items()}
  got = {tuple(k): tuple(m.shape) for k, m in meta_flat.items()}
  problems = [f"{'/'.join(k)} missing" for k in want if k not in got]
  problems += [f"{'/'.join(k)} unexpected" for k in got if k not in want]
  problems += [f"{'/'.join(k)}: params {got[k]}, config {want[k]}" for k in want
               if k in got and got[k] != want[k]]
  if problems:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise CheckpointError(f"{where}: config.json does not match the parameters: "
                          f"{'; '.join(problems[:3])}{more}")


def _quiet_orbax():
  """Silences orbax / absl log records while restoring (a failed restore
  logs tracebacks of its background threads; the error is raised anyway)."""
  import contextlib
  import logging

  @contextlib.contextmanager
  def quiet():
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "asyncio", "jax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
      lg.setLevel(logging.CRITICAL)
    try:
      yield
    finally:
      for lg, lv in zip(loggers, levels):
        lg.setLevel(lv)

  return quiet()


class _HeldStderr:
  """Holds what is written to ``sys.stderr`` while restoring.  A failed orbax
  restore leaves TensorStore reads in flight whose callbacks then print
  hundreds of lines of "Event loop is closed" tracebacks from background
  threads; on failure those are dropped (after they settle, up to ~3 s), on
  success anything held is passed on."""

  def __enter__(self):
    import io
    import sys
    self._sys, self._real, self.buf = sys, sys.stderr, io.StringIO()
    sys.stderr = self.buf
    return self

  def __exit__(self, exc_type, exc, tb):
    import time
    if exc_type is not None:
      size, deadline = -1, time.monotonic() + 3.0
      while time.monotonic() < deadline:
        time.sleep(0.25)
        now = len(self.buf.getvalue())
        if now == size:
          break
        size = now
    self._sys.stderr = self._real
    if exc_type is None and self.buf.getvalue():
      self._real.write(self.buf.getvalue())
    return False


def _short(e: BaseException) -> str:
  """The first line of an orbax / TensorStore error, without the spec dump."""
  text = " ".join(str(e).split("\n", 1)[0].split())
  text = text.split(" See full TensorStore")[0].rstrip(".")
  return f"{type(e).__name__}: {text[:300]}"


def load_checkpoint(directory, sharding: ShardingSpec = None, *, validate: bool = False):
  """Restores ``(config, params)`` written by :func:`save_checkpoint`.

  Args:
    directory: the checkpoint directory.
    sharding: where to put the arrays: ``None`` (first local device), one
      ``jax.sharding.Sharding`` for every array, a pytree of Shardings with
      the params' structure, or a callable ``(path: tuple[str, ...],
      jax.ShapeDtypeStruct) -> Sharding``.
    validate: check ``config.json`` against the model schema and the stored
      parameter shapes before restoring (:func:`validate_config`).

  Returns:
    ``(config, params)``: the ``model`` ConfigDict and a nested dict of
    ``jax.Array`` placed on the requested shardings.
  """
  directory = _check_dir(directory)
  config = read_config(directory)
  ocp, ckptr = _checkpointer()
  params_dir = directory / PARAMS_DIR
  try:
    with _quiet_orbax():
      metadata = ckptr.metadata(params_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    meta_flat = traverse_util.flatten_dict(dict(tree))
  except Exception as e:  # orbax raises a variety of errors for broken dirs
    raise CheckpointError(f"{params_dir}: cannot read the orbax checkpoint metadata "
                          f"({_short(e)})") from None
  if not meta_flat or not all(hasattr(m, "shape") and hasattr(m, "dtype")
                              for m in meta_flat.values()):
    raise CheckpointError(f"{params_dir}: checkpoint metadata lists no arrays")
  if validate:
    validate_config(config, meta_flat, where=str(directory))
  shardings = _resolve_shardings(meta_flat, sharding)
  target = traverse_util.unflatten_dict({
      k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=shardings[k])
      for k, m in meta_flat.items()})
  try:
    with _quiet_orbax(), _HeldStderr():
      params = ckptr.restore(params_dir, args=ocp.args.StandardRestore(target))
  except Exception as e:
    raise CheckpointError(f"{params_dir}: cannot restore the parameters "
                          f"({_short(e)}); the checkpoint is damaged: convert it "
                          "again") from None
  return config, params
