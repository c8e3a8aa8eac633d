"""The reference SA-1B training recipe of Semantic-SAM, SwinT backbone.

``semantic_sam_only_sa-1b_swinT.yaml``: 1024² crops (scale 0.99-1.01,
horizontal flip), 60 prompts per image, 6 granularity tokens, 12544 loss
points, global batch 64, 368,750 iterations, AdamW lr 1e-4 (backbone x0.1),
weight decay 0.05, clipping 0.01, steps 327,778 / 355,092, checkpoint every
5000 iterations.  Point ``config.data.data_dir`` at an SA-1B dataset built
with ``python -m semsam_jax.data build-sa1b`` and initialise the backbone
from ImageNet (``--config.init.backbone=...``) as the original does.
"""

import ml_collections

from semsam_jax.training.config import reference_recipe


def get_config() -> ml_collections.ConfigDict:
  return reference_recipe("swin_t")
