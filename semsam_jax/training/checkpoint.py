"""Training checkpoints (orbax ``CheckpointManager``) and the predictor export.

``WORKDIR/checkpoints/<step>/`` holds, saved together in one orbax step:

* ``state``: the :class:`~semsam_jax.training.state.TrainState` (params,
  optimizer state, step, base rng, skip counters);
* ``data``: the grain iterator state of every process
  (``grain.checkpoint.CheckpointSave``), so a resumed run reads exactly the
  batches an uninterrupted one would;
* ``meta``: JSON (step, global batch size, the model config).

orbax writes each step into a temporary directory and renames it when the
save (asynchronous by default) is complete, so ``latest_step`` only ever
sees finished checkpoints.  Restoring takes the abstract state with the
shardings of the *current* mesh: a checkpoint restores onto any mesh shape.

``WORKDIR/export/`` is the final params in the layout of
:mod:`semsam_jax.convert.checkpoint` (``params/``, ``config.json``,
``semsam_checkpoint.json``): ``SemanticSAMPredictor.from_checkpoint(WORKDIR/export)``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import numpy as np

from semsam_jax.convert import checkpoint as convert_ckpt


def _ocp():
  import orbax.checkpoint as ocp
  return ocp


class TrainCheckpointer:
  """Keep-last-N, interval-based, optionally asynchronous train checkpoints."""

  def __init__(self, directory, *, every: int, keep: int, use_async: bool = True):
    ocp = _ocp()
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep) if keep else None,
        save_interval_steps=max(int(every), 1),
        enable_async_checkpointing=bool(use_async),
        create=True)
    import grain
    handlers = {"state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=tuple(handlers),
                                         item_handlers=handlers)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, meta: dict, *, force: bool = False) -> bool:
    """Saves at ``step`` if orbax's interval says so (or ``force``); returns whether it did."""
    ocp = _ocp()
    import grain
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator),
                              meta=ocp.args.JsonSave(meta))
    return bool(self.manager.save(int(step), args=args, force=force))

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores the state onto ``abstract_state``'s shardings and the iterator in place."""
    ocp = _ocp()
    import grain
    out = self.manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def export_params(directory, params, model_config) -> pathlib.Path:
  """Writes ``params`` (sharded jax arrays welcome) in the predictor's orbax layout.

  Every process must call it (orbax saves collectively); process 0 writes the
  JSON files and moves the complete directory into place, replacing an older
  export.
  """
  ocp = _ocp()
  directory = pathlib.Path(directory).absolute()
  tmp = directory.parent / f".{directory.name}.tmp"
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
  _sync("export-mkdir")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp / convert_ckpt.PARAMS_DIR, params)
  ckptr.wait_until_finished()
  ckptr.close()
  if jax.process_index() == 0:
    leaves = jax.tree_util.tree_leaves(params)
    info = dict(format=convert_ckpt.FORMAT, version=convert_ckpt.FORMAT_VERSION,
                num_tensors=len(leaves),
                num_params=int(sum(int(np.prod(x.shape)) for x in leaves)))
    (tmp / convert_ckpt.CONFIG_FILE).write_text(
        convert_ckpt.config_to_json(model_config) + "\n", encoding="utf-8")
    (tmp / convert_ckpt.INFO_FILE).write_text(json.dumps(info, indent=2) + "\n",
                                              encoding="utf-8")
    if directory.exists():
      old = directory.parent / f".{directory.name}.old"
      shutil.rmtree(old, ignore_errors=True)
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  _sync("export-done")
  return directory


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
