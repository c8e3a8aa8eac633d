"""The ``loss`` config section: every weight and switch of the training objective.

Defaults are the released SA-1B recipe of Semantic-SAM
(``semantic_sam_only_sa-1b_swinT.yaml`` and the code's fixed constants).
:func:`loss_config_from_reference_yaml` reads the same fields from an original
YAML (``MODEL.DECODER.*``).
"""

from __future__ import annotations

import ml_collections

# Prompt modes (``box_prompts``).
BOX_PROMPTS = ("none", "reference_split", "all")
# Uniform draws of the point sampler (``point_draws``).
POINT_DRAWS = ("hash", "jax")


def loss_config() -> ml_collections.ConfigDict:
  """The objective's settings with the reference's defaults."""
  return ml_collections.ConfigDict(dict(
      # ---- matcher (M2MHungarianMatcher); no class cost in the SA-1B recipe
      cost_mask=5.0,             # MODEL.DECODER.COST_MASK_WEIGHT  (point BCE)
      cost_dice=5.0,             # MODEL.DECODER.COST_DICE_WEIGHT
      cost_box=5.0,              # MODEL.DECODER.COST_BOX_WEIGHT   (L1)
      cost_giou=2.0,             # MODEL.DECODER.COST_GIOU_WEIGHT  (-GIoU)
      # ---- loss weights (weight_dict)
      weight_mask_bce=5.0,       # MODEL.DECODER.MASK_WEIGHT
      weight_mask_dice=5.0,      # MODEL.DECODER.DICE_WEIGHT
      weight_iou=1.0,            # MODEL.DECODER.IOU_WEIGHT
      weight_bbox=5.0,           # MODEL.DECODER.BOX_WEIGHT
      weight_giou=2.0,           # MODEL.DECODER.GIOU_WEIGHT
      # Losses on every decoder layer (MODEL.DECODER.DEEP_SUPERVISION); the
      # matching of the last layer is reused for all of them (reference).
      deep_supervision=True,
      # ---- point sampling (PointRend-style, matcher and mask losses)
      train_num_points=12544,    # MODEL.DECODER.TRAIN_NUM_POINTS (matcher too)
      oversample_ratio=3.0,      # MODEL.DECODER.OVERSAMPLE_RATIO
      importance_sample_ratio=0.75,  # MODEL.DECODER.IMPORTANCE_SAMPLE_RATIO
      # Uniform draws of the mask-loss point sampler: "hash" = a counter-based
      # stream per (prompt, target) seeded from the step key, generated inside
      # the native kernel (the K*T*3P candidates never exist in memory);
      # "jax" = jax.random.uniform arrays.  Both are uniform; they differ only
      # in the random numbers (the reference draws torch.rand).
      point_draws="hash",
      # Point reads: "auto" (native CPU kernels when computing on the CPU),
      # "native" or "xla".  Same values either way.
      point_impl="auto",
      # ---- IoU head target: 1 - point dice loss, NOT detached in the reference.
      iou_loss=True,
      detach_iou_target=False,
      # ---- prompts (prepare_targets_interactive / prepare_for_dn_mo)
      click_box_half_size=3.0,   # a click becomes the box [x-3, y-3, x+3, y+3] (pixels)
      # The reference's training encodes clicks with pb = 1 (and boxes with
      # pb = 0), the opposite of its inference code.  True = reproduce that;
      # False = clicks 0 / boxes 1 as at inference.
      pb_quirk=True,
      # "none": every prompt is a click (the reference: its box_start draw is
      # overwritten); "reference_split": the draw the reference makes and
      # discards (prompts from randint((K-1)//2, K-1) on are boxes);
      # "all": every prompt is its mask's box.  Level targets stay the click's.
      box_prompts="none",
      dn="seg",                  # MODEL.DECODER.DN ("no" disables the noise)
      dn_noise_scale=0.4,        # MODEL.DECODER.DN_NOISE_SCALE
      click_noise_factor=0.01,   # fixed in the reference: clicks get 1% of the box noise
      # ---- numerics
      # Cost of a pair (query, target of another prompt); the blocks are
      # solved separately, this only documents the reference's value.
      invalid_pair_cost=1e6,
  ))


def loss_config_from_reference(opt) -> ml_collections.ConfigDict:
  """The ``loss`` section from a loaded original config dict (see
  :func:`semsam_jax.convert.reference_config.load_reference_yaml`)."""
  from semsam_jax.convert.reference_config import _Reader  # pylint: disable=import-outside-toplevel
  r = _Reader(opt)
  d = "MODEL.DECODER."
  cfg = loss_config()
  cfg.cost_mask = r.float(d + "COST_MASK_WEIGHT", cfg.cost_mask)
  cfg.cost_dice = r.float(d + "COST_DICE_WEIGHT", cfg.cost_dice)
  cfg.cost_box = r.float(d + "COST_BOX_WEIGHT", cfg.cost_box)
  cfg.cost_giou = r.float(d + "COST_GIOU_WEIGHT", cfg.cost_giou)
  cfg.weight_mask_bce = r.float(d + "MASK_WEIGHT", cfg.weight_mask_bce)
  cfg.weight_mask_dice = r.float(d + "DICE_WEIGHT", cfg.weight_mask_dice)
  cfg.weight_iou = r.float(d + "IOU_WEIGHT", cfg.weight_iou)
  cfg.weight_bbox = r.float(d + "BOX_WEIGHT", cfg.weight_bbox)
  cfg.weight_giou = r.float(d + "GIOU_WEIGHT", cfg.weight_giou)
  cfg.deep_supervision = r.bool(d + "DEEP_SUPERVISION", cfg.deep_supervision)
  cfg.train_num_points = r.int(d + "TRAIN_NUM_POINTS", cfg.train_num_points, minimum=1)
  cfg.oversample_ratio = r.float(d + "OVERSAMPLE_RATIO", cfg.oversample_ratio)
  cfg.importance_sample_ratio = r.float(d + "IMPORTANCE_SAMPLE_RATIO",
                                        cfg.importance_sample_ratio)
  cfg.dn = r.str(d + "DN", cfg.dn)
  cfg.dn_noise_scale = r.float(d + "DN_NOISE_SCALE", cfg.dn_noise_scale)
  validate(cfg)
  return cfg


def loss_config_from_reference_yaml(source) -> ml_collections.ConfigDict:
  """The ``loss`` section from an original YAML (path, list of paths or dict)."""
  from semsam_jax.convert.reference_config import load_reference_yaml  # pylint: disable=import-outside-toplevel
  return loss_config_from_reference(load_reference_yaml(source))


def validate(cfg) -> None:
  """Raises ValueError naming the first field out of range."""
  if cfg.oversample_ratio < 1.0:
    raise ValueError(f"loss.oversample_ratio = {cfg.oversample_ratio} must be >= 1")
  if not 0.0 <= cfg.importance_sample_ratio <= 1.0:
    raise ValueError(f"loss.importance_sample_ratio = {cfg.importance_sample_ratio} "
                     "must lie in [0, 1]")
  if cfg.train_num_points < 1:
    raise ValueError(f"loss.train_num_points = {cfg.train_num_points} must be >= 1")
  if cfg.box_prompts not in BOX_PROMPTS:
    raise ValueError(f"loss.box_prompts = {cfg.box_prompts!r}; valid: {BOX_PROMPTS}")
  if cfg.get("point_draws", "hash") not in POINT_DRAWS:
    raise ValueError(f"loss.point_draws = {cfg.point_draws!r}; valid: {POINT_DRAWS}")
  if cfg.get("point_impl", "auto") not in ("auto", "native", "xla"):
    raise ValueError(f"loss.point_impl = {cfg.point_impl!r}; valid: 'auto', 'native', 'xla'")
  if cfg.dn not in ("seg", "standard", "no"):
    raise ValueError(f"loss.dn = {cfg.dn!r}; valid: 'seg', 'standard', 'no'")
