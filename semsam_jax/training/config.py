"""``config.optim`` defaults: the SOLVER section of the reference SA-1B YAMLs."""

from __future__ import annotations

import ml_collections


def optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      base_lr=1e-4,                 # SOLVER.BASE_LR
      weight_decay=0.05,            # SOLVER.WEIGHT_DECAY
      weight_decay_norm=0.0,        # SOLVER.WEIGHT_DECAY_NORM (GroupNorm, LayerNorm)
      weight_decay_embed=0.0,       # SOLVER.WEIGHT_DECAY_EMBED (embedding tables)
      # Swin's relative_position_bias_table / absolute_pos_embed: always 0.
      b1=0.9, b2=0.999, eps=1e-8,   # torch.optim.AdamW defaults
      lr_multiplier=(("backbone", 0.1),),  # SOLVER.LR_MULTIPLIER (path substring)
      clip_norm=0.01,               # SOLVER.CLIP_GRADIENTS (full model, L2); 0 = off
      steps=(327778, 355092),       # SOLVER.STEPS
      gamma=0.1,                    # SOLVER.GAMMA
      warmup_factor=1.0,            # SOLVER.WARMUP_FACTOR (1.0: no effective warm-up)
      warmup_iters=10,              # SOLVER.WARMUP_ITERS
      warmup_method="linear",       # SOLVER.WARMUP_METHOD
      max_iter=368750,              # SOLVER.MAX_ITER
  ))


def train_config() -> ml_collections.ConfigDict:
  """Top-level fields of a training config (``train.py``) besides its sections.

  A full training config holds ``model`` (semsam_jax.config), ``data``
  (semsam_jax.data.config), ``loss`` (semsam_jax.losses.config), ``optim``
  (:func:`optim_config`) and these fields; :func:`complete_config` fills in
  whatever a config file leaves out.
  """
  return ml_collections.ConfigDict(dict(
      seed=0,
      batch_size=64,               # global batch (reference: 64 GPUs x 1 image)
      total_steps=368750,          # reference SOLVER.MAX_ITER
      grad_accum_steps=1,          # micro-batches per step (batch_size % it == 0)
      # Device mesh: axis sizes; -1 = all remaining devices.
      mesh=dict(data=-1, fsdp=1),
      sharding_rules="fsdp",       # semsam_jax.sharding.RULES key
      # Non-finite loss or gradient: the update is skipped (and counted); this
      # many consecutive skipped steps stop the run with an error.
      max_consecutive_bad_steps=10,
      # Checkpoints (orbax CheckpointManager in WORKDIR/checkpoints).
      checkpoint_every=1000,
      keep_checkpoints=3,
      async_checkpoints=True,
      # Export of the final params in the predictor's layout (WORKDIR/export).
      export_final=True,
      # Logging.
      log_every=1,                 # JSON-lines / TensorBoard interval (steps)
      progress_bar=True,
      profile_steps=(),            # (first, last) steps to trace with jax.profiler
      init=dict(
          # Converted Semantic-SAM weights: an orbax checkpoint directory
          # (python -m semsam_jax.convert) or an original .pth file.
          checkpoint=None,
          # The original YAML of a .pth given as `checkpoint` (None: the .pth
          # is converted onto config.model).
          reference_config=None,
          # Backbone only: an ImageNet Swin .pth (swin_tiny_patch4_window7_224,
          # swin_large_patch4_window12_384_22k key layout), the rest random.
          backbone=None,
      ),
  ))


def reference_recipe(backbone: str) -> ml_collections.ConfigDict:
  """The original's SA-1B training recipe (``configs/swin_t.py``, ``swin_l.py``)
  for ``backbone`` ("swin_t" or "swin_l"): the reference model, input,
  loss and SOLVER sections, global batch 64, 368,750 iterations, a checkpoint
  every 5000."""
  from semsam_jax.config import model_config
  from semsam_jax.data.config import data_config
  from semsam_jax.losses.config import loss_config
  config = train_config()
  config.model = model_config(backbone)
  config.data = data_config()          # reference input: 1024², K = 60, M = 256
  config.loss = loss_config()          # reference weights, 12544 points
  config.optim = optim_config()        # reference SOLVER section
  config.batch_size = 64
  config.total_steps = 368750
  config.checkpoint_every = 5000
  config.log_every = 20
  return config


def complete_config(config) -> ml_collections.ConfigDict:
  """``config`` with every missing section / field filled from the defaults.

  Lets model-only configs (``configs/semsam_swint.py``) train with the
  reference recipe.  Fields present in ``config`` always win.
  """
  from semsam_jax.config import model_config
  from semsam_jax.data.config import data_config
  from semsam_jax.losses.config import loss_config

  def merge(default, given):
    out = ml_collections.ConfigDict(default.to_dict())
    if given is None:
      return out
    for k in given.keys():
      v = given[k]
      if isinstance(v, ml_collections.ConfigDict) and k in out and isinstance(
          out[k], ml_collections.ConfigDict):
        out[k] = merge(out[k], v)
      else:
        with out.unlocked():
          out[k] = v
    return out

  base = train_config()
  with base.unlocked():
    base.model = model_config()
    base.data = data_config()
    base.loss = loss_config()
    base.optim = optim_config()
  out = merge(base, config)
  out.optim.max_iter = int(out.optim.max_iter)
  return out
