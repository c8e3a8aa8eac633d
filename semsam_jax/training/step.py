"""The jitted train step: loss + grads (optionally accumulated), a guarded AdamW update.

A step whose loss or gradient norm is not finite leaves params and optimizer
state untouched (selected with ``jnp.where`` inside the jitted function: no
host round trip), increments ``bad_steps`` / ``skipped_steps`` and still
advances ``step`` (the lr schedule and the data follow the iteration count).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from semsam_jax.losses import prompts as prompts_lib
from semsam_jax.training.state import TrainState


def _set_lr(opt_state, lr):
  hp = dict(opt_state.hyperparams)
  hp["learning_rate"] = jnp.asarray(lr, hp["learning_rate"].dtype)
  return opt_state._replace(hyperparams=hp)


def make_step_fn(loss_fn, tx, grad_accum_steps: int = 1):
  """``step(state, batch, lr) -> (state, metrics)`` (not yet jitted).

  ``lr`` is the learning rate of this step (``base_lr * lr_factor(step)``,
  computed on the host).  With ``grad_accum_steps = A > 1`` the batch is cut
  into A strided micro-batches (``batch[i::A]``, so each device keeps its
  share), their gradients summed, each loss normalised by the target count of
  the whole batch (the reference's ``num_masks``); micro-batch ``i`` uses
  ``fold_in(step_key, i)``.
  """
  accum = int(grad_accum_steps)
  if accum < 1:
    raise ValueError(f"grad_accum_steps = {accum} must be >= 1")

  def micro_loss(params, batch, key, normalizer):
    return loss_fn(params, batch, key, deterministic=False, normalizer=normalizer)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state: TrainState, batch: dict, lr):
    key = jax.random.fold_in(state.rng, state.step)
    params = state.params
    if accum == 1:
      (loss, metrics), grads = grad_fn(params, batch, key, None)
    else:
      b = next(iter(batch.values())).shape[0]
      if b % accum:
        raise ValueError(f"batch of {b} does not split into {accum} micro-batches")
      count = prompts_lib.level_targets(batch)["valid"].astype(jnp.float32).sum()
      norm = jnp.maximum(count, 1.0)
      micro = jax.tree.map(
          lambda x: jnp.moveaxis(x.reshape((b // accum, accum) + x.shape[1:]), 1, 0), batch)

      def body(carry, xs):
        i, mb = xs
        (l, m), g = grad_fn(params, mb, jax.random.fold_in(key, i), norm)
        acc_l, acc_m, acc_g = carry
        return (acc_l + l, jax.tree.map(jnp.add, acc_m, m), jax.tree.map(jnp.add, acc_g, g)), None

      mb0 = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(grad_fn, params, mb0, key, norm)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      (_, m0), g0 = zeros
      (loss, metrics, grads), _ = jax.lax.scan(
          body, (jnp.zeros((), jnp.float32), m0, g0),
          (jnp.arange(accum, dtype=jnp.int32), micro))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    opt_state = _set_lr(state.opt_state, lr)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, c: jnp.where(finite, a, c), new, old)
    bad = jnp.where(finite, 0, state.bad_steps + 1).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, params),
        opt_state=keep(new_opt, opt_state),
        bad_steps=bad,
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    out = dict(metrics)
    out.update(loss=loss, grad_norm=grad_norm, lr=jnp.asarray(lr, jnp.float32),
               finite=finite, bad_steps=bad, skipped_steps=new_state.skipped_steps)
    return new_state, out

  return step
