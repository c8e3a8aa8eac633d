"""Training side of semsam_jax: the reference optimisation recipe (optax).

Only the optimizer is built so far (see ``docs/train.md``); the loop, train
state, sharded step and checkpoints of issue 11 are not yet written.
"""

from semsam_jax.training.optim import (clip_by_global_norm_torch, lr_factor, lr_multipliers,
                                       make_optimizer, weight_decay_mask)

__all__ = ["clip_by_global_norm_torch", "lr_factor", "lr_multipliers", "make_optimizer",
           "weight_decay_mask"]
