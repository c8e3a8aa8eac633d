"""Semantic-SAM, SwinL backbone (release ``swinl_only_sam_many2many.pth``)."""

import ml_collections

from semsam_jax.config import model_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config("swin_l")
  return config
