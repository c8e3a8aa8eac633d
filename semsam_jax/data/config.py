"""Configuration of the training data (``config.data``).

``data_config()`` returns the defaults; ``configs/*.py`` override fields.  The
reference values are those of the original SA-1B training
(``configs/semantic_sam_only_sa-1b_swinT.yaml``: ``INPUT.IMAGE_SIZE 1024``,
``MIN_SCALE 0.99``, ``MAX_SCALE 1.01``, ``RANDOM_FLIP horizontal``,
``MODEL.DECODER.MAX_NUM_INSTANCE 60``).  The number of level targets per prompt
(T) is ``config.model.decoder.num_mask_tokens``, not a data field.
"""

from __future__ import annotations

import os

import ml_collections


def default_cache_dir() -> str:
  """Where the default synthetic dataset is generated (``$SEMSAM_DATA_CACHE``)."""
  return os.environ.get(
      "SEMSAM_DATA_CACHE",
      os.path.join(os.path.expanduser("~"), ".cache", "semsam_jax", "data"))


def data_config() -> ml_collections.ConfigDict:
  """Defaults of ``config.data`` (reference SA-1B training input)."""
  return ml_collections.ConfigDict(dict(
      # TFDS data dir holding the dataset built by `python -m semsam_jax.data
      # build-*`; None = the default synthetic dataset (generated on first use
      # into `synthetic.cache_dir`, see ensure_dataset()).
      data_dir=None,
      builder_name="segment_anything_local",
      train_split="train",
      eval_split="heldout",
      # Augmentation (detectron2 RandomFlip + ResizeScale + FixedSizeCrop).
      image_size=1024,          # S: square canvas side, a multiple of 32
      min_scale=0.99,
      max_scale=1.01,
      random_flip="horizontal",  # "horizontal" | "none" (vertical is not supported)
      image_pad_value=128,      # FixedSizeCrop pad_value
      # FixedSizeCrop seg_pad_value as the reference applies it to SA-1B masks:
      # 255 = every mask includes the crop's pad region (the original's quirk,
      # see docs/differences.md "Training data"); 0 = masks stop at the image.
      mask_pad_value=255,
      # Prompts and slots.
      max_num_instance=60,      # K prompts per image
      max_masks_per_image=256,  # M mask slots (referenced masks only)
      # Loader.
      seed=None,                # None -> config.seed
      shuffle=True,
      worker_count=0,           # grain worker processes (0 = in-process)
      worker_buffer_size=2,     # batches buffered per worker
      # Reader threads per process (in-process, or in each worker) and the
      # batches they prefetch (grain's defaults, 16 and 500, would hold
      # hundreds of ~35 MiB examples in memory; see docs/data.md).
      read_threads=1,
      read_prefetch=2,
      synthetic=dict(
          cache_dir=None,       # None -> $SEMSAM_DATA_CACHE or ~/.cache/semsam_jax/data
          num_train_images=64,
          num_heldout_images=16,
          train_seed=0,
          heldout_seed=1,
          image_size=256,
          # Generator knobs (semsam_jax.data.synthetic; part of the cache key).
          # The defaults are the generator's own (synthetic.DEFAULT_KNOBS).
          objects_per_image=(3, 6),      # inclusive range of objects per image
          max_parts=3,                   # parts per object drawn in 1..max_parts
          object_radius=(0.06, 0.16),    # object radius / min(H, W)
          subpart_radius=(0.15, 0.35),   # sub-part radius / its object's radius
          subparts_per_part=(0, 2),      # inclusive range of sub-parts per part
          detail_prob=0.4,               # chance that a sub-part holds a detail
          min_area=4,                    # smaller visible regions are not annotated
      ),
  ))
