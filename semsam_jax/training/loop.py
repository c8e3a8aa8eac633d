"""The training loop behind ``train.py``.

:func:`train` builds the mesh, the sharded state, the jitted step and the
data iterator; resumes from the latest complete checkpoint in
``WORKDIR/checkpoints``; trains to ``config.total_steps``; and exports the
final params.  Metrics of step ``n`` are fetched while step ``n+1`` runs (one
step of lag keeps the device busy).  Only process 0 writes logs.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from semsam_jax.training import checkpoint as ckpt_lib
from semsam_jax.training import init as init_lib
from semsam_jax.training import optim
from semsam_jax.training import state as state_lib
from semsam_jax.training.config import complete_config
from semsam_jax.training.logging import MetricWriter
from semsam_jax.training.step import make_step_fn

CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass
class RunResult:
  step: int                 # iterations done
  state: object             # the final TrainState (jax arrays)
  history: list             # per-step host metrics of this invocation
  preempted: bool = False
  resumed_from: int | None = None


class _Preemption:
  """SIGTERM -> a flag the loop polls after every step."""

  def __init__(self):
    self.flag = threading.Event()
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def requested(self) -> bool:
    local = self.flag.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def _barrier(name: str, timeout_s: int = 1800):
  """All processes meet here (the coordination service; no device collective)."""
  from jax._src import distributed
  distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _global_ids(batch, local) -> list[int]:
  """The example ids of the global batch, in row order (logged per step)."""
  if jax.process_count() == 1:
    return [int(i) for i in local["example_id"]]
  from jax.experimental import multihost_utils
  ids = multihost_utils.process_allgather(batch["example_id"], tiled=True)
  return [int(i) for i in np.asarray(ids).ravel()]


def inject_nan(batch: dict) -> dict:
  """A batch whose boxes are NaN (the loss and gradient become non-finite)."""
  batch = dict(batch)
  batch["mask_boxes"] = np.full_like(batch["mask_boxes"], np.nan)
  return batch


def build(config, devices=None):
  """Mesh, step function and abstract state of ``config`` (no data, no params)."""
  from semsam_jax.losses import make_loss_fn
  from semsam_jax.models import semantic_sam as ss
  mesh = state_lib.make_mesh(config, devices)
  n = mesh.devices.size
  if config.batch_size % n:
    raise ValueError(f"batch_size {config.batch_size} must divide by the {n} devices of "
                     f"the mesh {dict(mesh.shape)}")
  if config.batch_size % (n * int(config.grad_accum_steps)):
    raise ValueError(f"batch_size {config.batch_size} must divide by devices x "
                     f"grad_accum_steps = {n} x {config.grad_accum_steps}")
  shapes = ss.param_shapes(config.model)
  tx = optim.make_optimizer(shapes, config.optim)
  abstract = jax.eval_shape(lambda p: state_lib.new_state(p, tx, jax.random.PRNGKey(0)), shapes)
  shardings = state_lib.state_shardings(config, mesh, abstract)
  step_fn = make_step_fn(make_loss_fn(config), tx, int(config.grad_accum_steps))
  return mesh, tx, abstract, shardings, step_fn


def jit_step(step_fn, shardings, batch_shardings, mesh):
  """The train step jitted with explicit in/out shardings and the state donated."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn, in_shardings=(shardings, batch_shardings, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def initial_state(config, tx, shardings, log=print):
  """Step-0 train state placed on ``shardings``."""
  key = jax.random.PRNGKey(int(config.seed))
  init_key, run_key = jax.random.split(key)
  params = init_lib.initial_params(config, init_key, log=log)
  params = jax.device_put(params, shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  rep = shardings.step
  return state_lib.TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params,
      opt_state=opt_state, rng=jax.device_put(run_key, rep),
      bad_steps=jax.device_put(jnp.zeros((), jnp.int32), rep),
      skipped_steps=jax.device_put(jnp.zeros((), jnp.int32), rep))


def train(config, workdir, *, devices=None, stop_after: int | None = None,
          log=None) -> RunResult:
  """Trains ``config`` in ``workdir`` (resuming when it holds a checkpoint).

  Args:
    config: a training config (missing sections / fields take the defaults,
      :func:`semsam_jax.training.config.complete_config`).
    workdir: checkpoints, metrics, TensorBoard events and the export go here.
    devices: the devices of the mesh (default: all).
    stop_after: end this invocation after this many steps of it (with a
      checkpoint), as if preempted -- for resume tests and drills.
  """
  from semsam_jax.data import make_train_loader
  config = complete_config(config)
  workdir = pathlib.Path(workdir).absolute()
  is_main = jax.process_index() == 0
  log = log or (lambda m: print(m, flush=True) if is_main else None)
  mesh, tx, abstract, shardings, step_fn = build(config, devices)
  rules = state_lib.rules_of(config)

  loader = make_train_loader(config, process_index=jax.process_index(),
                             process_count=jax.process_count())
  data_iter = iter(loader)
  ckpt = ckpt_lib.TrainCheckpointer(workdir / CHECKPOINT_DIR,
                                    every=int(config.checkpoint_every),
                                    keep=int(config.keep_checkpoints),
                                    use_async=bool(config.async_checkpoints))
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract, shardings)
  restored = ckpt.restore_latest_good(target, data_iter, warn=log) \
      if ckpt.latest_step() is not None else None
  latest = None
  if restored is not None:
    latest, state, meta = restored
    if int(meta.get("batch_size", config.batch_size)) != int(config.batch_size):
      raise ValueError(f"{workdir}: checkpoint {latest} was trained with batch_size "
                       f"{meta['batch_size']}, the config says {config.batch_size}")
    log(f"resumed from {ckpt.directory}/{latest} (mesh {dict(mesh.shape)})")
    start = latest
  else:
    state = initial_state(config, tx, shardings, log=log)
    start = 0
  meta = {"batch_size": int(config.batch_size), "model": config.model.to_dict()}

  total = int(config.total_steps)
  end = total if stop_after is None else min(total, start + int(stop_after))
  writer = MetricWriter(workdir, enabled=is_main, resume_step=start, progress_total=total,
                        progress_initial=start, progress_bar=bool(config.progress_bar))
  max_bad = int(config.max_consecutive_bad_steps)
  nan_steps = {int(s) for s in config.get("debug", {}).get("nan_steps", ())}
  prof = tuple(int(s) for s in config.profile_steps) if config.profile_steps else ()
  log_every = max(int(config.log_every), 1)

  jitted = None
  history = []
  pending = None
  last_time = time.perf_counter()
  preempted = False

  def handle(p):
    nonlocal last_time
    step_no, metrics, wait, ids = p
    m = _host(metrics)
    now = time.perf_counter()
    dt, last_time = now - last_time, now
    rec = {k: (bool(v) if v.dtype == bool else float(v)) for k, v in m.items()}
    rec.update(step_time=dt, images_per_s=config.batch_size / dt if dt > 0 else 0.0,
               data_wait_s=wait)
    history.append(dict(rec, step=step_no, example_ids=ids))
    if not rec["finite"]:
      writer.message(f"step {step_no}: non-finite loss/gradient (loss {rec['loss']}, "
                     f"grad norm {rec['grad_norm']}): update skipped "
                     f"({int(rec['bad_steps'])} in a row, {int(rec['skipped_steps'])} in all)")
    if step_no % log_every == 0 or not rec["finite"] or step_no == end:
      writer.write(step_no, dict(rec, example_ids=ids))
    writer.progress(loss=rec["loss"], lr=rec["lr"], img_s=rec["images_per_s"])
    if int(rec["bad_steps"]) >= max_bad:
      raise NonFiniteError(
          f"{int(rec['bad_steps'])} consecutive steps with a non-finite loss or gradient "
          f"(up to step {step_no}; config.max_consecutive_bad_steps = {max_bad}); stopping. "
          f"The last checkpoint is in {ckpt.directory}")

  try:
    with _Preemption() as preempt:
      for step in range(start, end):
        t0 = time.perf_counter()
        local = next(data_iter)
        wait = time.perf_counter() - t0
        if step in nan_steps:
          local = inject_nan(local)
        if jitted is None:
          batch_sh = state_lib.batch_shardings(mesh, rules, local)
          jitted = jit_step(step_fn, shardings, batch_sh, mesh)
        if prof and step == prof[0]:
          jax.profiler.start_trace(str(workdir / "profile"))
        batch = state_lib.global_batch(local, batch_sh, int(config.batch_size))
        lr = np.float32(float(config.optim.base_lr) * optim.lr_factor(step, config.optim))
        if step == start and jax.process_count() > 1:
          # Compile first, then meet: gloo's first collective times out when one
          # process is still compiling (seen on a loaded 2-core machine).
          jitted = jitted.lower(state, batch, lr).compile()
          _barrier("semsam-train-first-step")
        state, metrics = jitted(state, batch, lr)
        if prof and step == prof[-1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
        if pending is not None:
          handle(pending)
        pending = (step + 1, metrics, wait, _global_ids(batch, local))
        done = step + 1
        stop = preempt.requested()
        if stop or done == end:
          if pending is not None:
            handle(pending)
            pending = None
        if stop or done == end or done % max(int(config.checkpoint_every), 1) == 0:
          ckpt.save(done, state, data_iter, meta, force=True)
        if stop:
          preempted = True
          log(f"SIGTERM: checkpoint of step {done} saved to {ckpt.directory}; exiting")
          break
      if pending is not None:
        handle(pending)
        pending = None
      ckpt.wait()
      done = int(jax.device_get(state.step))
      if done >= total and bool(config.export_final) and not preempted:
        ckpt_lib.export_params(workdir / EXPORT_DIR, state.params, config.model)
        log(f"exported the final params to {workdir / EXPORT_DIR}")
  finally:
    ckpt.close()
    writer.close()
  return RunResult(step=int(jax.device_get(state.step)), state=state, history=history,
                   preempted=preempted, resumed_from=latest)
