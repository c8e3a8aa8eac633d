"""Training objective of Semantic-SAM (see docs/objective.md and docs/training.md)."""

from semsam_jax.losses.config import (loss_config, loss_config_from_reference,
                                      loss_config_from_reference_yaml)
from semsam_jax.losses.objective import draw_keys, make_loss_fn, make_objective

__all__ = ["draw_keys", "loss_config", "loss_config_from_reference",
           "loss_config_from_reference_yaml", "make_loss_fn", "make_objective"]
