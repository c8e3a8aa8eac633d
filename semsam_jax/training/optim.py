"""The reference optimiser (``build_optimizer`` of the original ``train_net.py``) in optax.

* AdamW with torch's defaults (betas 0.9/0.999, eps 1e-8), decoupled weight
  decay ``lr * wd * p`` as ``torch.optim.AdamW``;
* weight decay 0 for the parameters of norm layers (a Flax module holding a
  ``scale`` leaf: LayerNorm / GroupNorm), of embedding tables (leaf
  ``embedding``) and for Swin's ``relative_position_bias_table`` /
  ``absolute_pos_embed``; biases of other layers ARE decayed (the original's
  bias rule tests the *module* name and never fires);
* lr multiplier 0.1 for every parameter whose path contains ``backbone``;
* full-model gradient clipping at global L2 norm ``clip_norm`` with torch's
  ``clip_grad_norm_`` formula (``g * min(1, c / (norm + 1e-6))``);
* detectron2's ``WarmupMultiStepLR`` as a function of the iteration number
  (:func:`lr_factor`); the learning rate is an injected hyper-parameter set
  from the iteration by the caller, so a skipped step keeps the schedule on
  the iteration count while Adam's bias correction counts applied updates
  (as torch's GradScaler skip does).
"""

from __future__ import annotations

import bisect

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def _flat(params):
  return traverse_util.flatten_dict(dict(params))


def weight_decay_mask(params, config) -> dict:
  """Per-leaf weight-decay coefficient (a pytree of floats like ``params``)."""
  flat = _flat(params)
  norm_modules = {k[:-1] for k in flat if k[-1] == "scale"}
  out = {}
  for k in flat:
    wd = float(config.weight_decay)
    if any(n in k[-1] for n in NO_DECAY_NAMES):
      wd = 0.0
    if k[:-1] in norm_modules:
      wd = float(config.weight_decay_norm)
    if k[-1] == "embedding":
      wd = float(config.weight_decay_embed)
    out[k] = wd
  return traverse_util.unflatten_dict(out)


def lr_multipliers(params, config) -> dict:
  """Per-leaf lr multiplier: product of every ``lr_multiplier`` key found in the path."""
  out = {}
  for k in _flat(params):
    path = "/".join(map(str, k))
    m = 1.0
    for key, mul in config.lr_multiplier:
      if key in path:
        m *= float(mul)
    out[k] = m
  return traverse_util.unflatten_dict(out)


def lr_factor(step: int, config) -> float:
  """detectron2 ``WarmupMultiStepLR`` factor for iteration ``step`` (0-based)."""
  steps = [s for s in config.steps if s <= config.max_iter]
  decay = lambda i: float(config.gamma) ** bisect.bisect_right(steps, i)
  if step < config.warmup_iters:
    if config.warmup_method == "constant":
      return float(config.warmup_factor) * decay(0)
    if config.warmup_method != "linear":
      raise ValueError(f"unknown warmup_method {config.warmup_method!r}")
    alpha = step / config.warmup_iters
    return float(config.warmup_factor) * decay(0) * (1 - alpha) + decay(config.warmup_iters) * alpha
  return decay(step)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """``torch.nn.utils.clip_grad_norm_``: scale by min(1, max_norm / (norm + 1e-6))."""
  def fn(updates, params=None):
    del params
    norm = optax.tree.norm(updates)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates)
  return optax.stateless(fn)


def make_optimizer(params, config) -> optax.GradientTransformation:
  """The reference AdamW for ``params`` (its structure fixes masks and multipliers).

  The learning rate is ``opt_state.hyperparams["learning_rate"]`` (initially
  ``base_lr * lr_factor(0)``); set it to ``base_lr * lr_factor(step)`` before
  each update.
  """
  wd = weight_decay_mask(params, config)
  mult = lr_multipliers(params, config)

  def chain(learning_rate):
    parts = []
    if config.clip_norm and config.clip_norm > 0:
      parts.append(clip_by_global_norm_torch(float(config.clip_norm)))
    parts += [
        optax.scale_by_adam(b1=float(config.b1), b2=float(config.b2), eps=float(config.eps)),
        optax.stateless(lambda u, p: jax.tree.map(lambda g, x, w: g + w * x, u, p, wd)),
        optax.stateless(lambda u, p=None: jax.tree.map(lambda g, m: g * m, u, mult)),
        optax.scale_by_learning_rate(learning_rate),
    ]
    return optax.chain(*parts)

  return optax.inject_hyperparams(chain)(
      learning_rate=float(config.base_lr) * lr_factor(0, config))
