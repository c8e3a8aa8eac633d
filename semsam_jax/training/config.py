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
