"""Build our model config from an original Semantic-SAM YAML config.

The original code loads its YAML with plain ``yaml.safe_load`` (no detectron2
``_BASE_`` inheritance); when several files are given, a later file replaces
whole top-level sections of an earlier one, and dotted top-level keys
(``"MODEL.DECODER.DEC_LAYERS": 3``) address nested fields.  The same rules are
followed here.

Which YAML field drives which part of the network (read from the original
``from_config`` functions):

* backbone: ``MODEL.BACKBONE.SWIN.*``;
* pixel decoder: ``MODEL.ENCODER.*`` -- but its deformable transformer encoder
  takes its head count, FFN width and dropout from ``MODEL.DECODER.NHEADS``,
  ``DIM_FEEDFORWARD`` and ``DROPOUT``;
* granularity decoder: ``MODEL.DECODER.*`` plus ``MODEL.ENCODER.MASK_DIM`` and
  ``MODEL.DIM_PROJ``.  Its decoder layers are built with the layer's default of
  **8 heads** whatever ``MODEL.DECODER.NHEADS`` says (the value is passed to the
  head but never to the layers), and 4 sampling points;
* ``INPUT.PIXEL_MEAN/STD`` and ``MODEL.DECODER.SIZE_DIVISIBILITY`` (a negative
  value means the backbone's 32) for pre-processing.

Settings that would change the network into something this port does not
implement raise ``ValueError`` naming the field; unrelated fields (datasets,
solver, losses, ...) are ignored.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import ml_collections
import yaml

from semsam_jax.config import model_config

# Fixed by the original code, not configurable from its YAML.
DECODER_NUM_HEADS = 8
N_POINTS = 4
GROUPNORM_GROUPS = 32
BACKBONE_SIZE_DIVISIBILITY = 32
SWIN_FEATURES = ("res2", "res3", "res4", "res5")

_REQUIRED_NAMES = (
    ("MODEL.NAME", "interactive_mask_dino"),
    ("MODEL.HEAD", "general_head"),
    ("MODEL.BACKBONE.NAME", "swin"),
    ("MODEL.ENCODER.NAME", "encoder_deform"),
    ("MODEL.DECODER.NAME", "interactive_mask_dino"),
)

_MISSING = object()


def _merge_into(opt: dict, update: Mapping, source: str) -> None:
  """The original loader's merge: dotted keys nest, values replace wholesale."""
  for key, value in update.items():
    parts = str(key).split(".")
    node = opt
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"{source}: cannot set {key}: {part} is not a section")
    node[parts[-1]] = value


def load_reference_yaml(source) -> dict:
  """Reads (and merges) original YAML file(s) into one nested dict.

  ``source``: a path, a list of paths (later ones override earlier ones), or an
  already-loaded dict.
  """
  if isinstance(source, Mapping):
    sources = [source]
  elif isinstance(source, (str, os.PathLike)):
    sources = [source]
  elif isinstance(source, Sequence):
    sources = list(source)
  else:
    raise TypeError(f"expected a YAML path, a list of paths or a dict, got {type(source).__name__}")
  opt: dict = {}
  for item in sources:
    if isinstance(item, Mapping):
      data, name = copy.deepcopy(dict(item)), "<dict>"
    else:
      name = os.fspath(item)
      if not os.path.isfile(name):
        raise FileNotFoundError(f"reference config not found: {name}")
      with open(name, encoding="utf-8") as f:
        try:
          data = yaml.safe_load(f)
        except yaml.YAMLError as e:
          raise ValueError(f"{name}: not valid YAML ({e})") from e
    if data is None:
      data = {}
    if not isinstance(data, Mapping):
      raise ValueError(f"{name}: the top level of a config must be a mapping")
    if "_BASE_" in data:
      raise ValueError(
          f"{name}: _BASE_ includes are not supported (Semantic-SAM's own loader "
          "ignores them); pass the files as a list instead, base first")
    _merge_into(opt, data, name)
  return opt


class _Reader:
  """Typed access to fields of the nested YAML dict, with field-naming errors."""

  def __init__(self, opt: Mapping):
    self.opt = opt

  def raw(self, field: str, default=_MISSING):
    node: Any = self.opt
    for part in field.split("."):
      if not isinstance(node, Mapping) or part not in node:
        if default is _MISSING:
          raise ValueError(f"reference config lacks the required field {field}")
        return default
      node = node[part]
    return node

  def int(self, field, default=_MISSING, minimum=None):
    v = self.raw(field, default)
    if isinstance(v, bool) or not isinstance(v, int):
      raise ValueError(f"{field} must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
      raise ValueError(f"{field} must be >= {minimum}, got {v}")
    return v

  def float(self, field, default=_MISSING):
    v = self.raw(field, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise ValueError(f"{field} must be a number, got {v!r}")
    return float(v)

  def bool(self, field, default=_MISSING):
    v = self.raw(field, default)
    if not isinstance(v, bool):
      raise ValueError(f"{field} must be true or false, got {v!r}")
    return v

  def str(self, field, default=_MISSING):
    v = self.raw(field, default)
    if not isinstance(v, str):
      raise ValueError(f"{field} must be a string, got {v!r}")
    return v

  def ints(self, field, length=None):
    v = self.raw(field)
    if not isinstance(v, (list, tuple)) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
      raise ValueError(f"{field} must be a list of positive integers, got {v!r}")
    if length is not None and len(v) != length:
      raise ValueError(f"{field} must have {length} entries, got {len(v)}")
    return tuple(v)

  def floats(self, field, length):
    v = self.raw(field)
    if not isinstance(v, (list, tuple)) or len(v) != length or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
      raise ValueError(f"{field} must be a list of {length} numbers, got {v!r}")
    return tuple(float(x) for x in v)

  def strs(self, field):
    v = self.raw(field)
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) for x in v):
      raise ValueError(f"{field} must be a non-empty list of strings, got {v!r}")
    return tuple(v)


def config_from_reference_yaml(source) -> ml_collections.ConfigDict:
  """The ``model`` config section for an original Semantic-SAM YAML config.

  Args:
    source: path of the YAML, a list of paths merged like the original loader,
      or the loaded dict.

  Returns:
    A ``ConfigDict`` with the schema of :func:`semsam_jax.config.model_config`
    (numerics fields ``dtype``/``param_dtype``/``msda_impl`` at their defaults).

  Raises:
    ValueError: a required field is missing or malformed, or a setting selects
      an architecture this port does not implement (the message names it).
  """
  r = _Reader(load_reference_yaml(source))

  for field, expected in _REQUIRED_NAMES:
    value = r.raw(field)
    if value != expected:
      raise ValueError(f"{field} = {value!r} is not supported (only {expected!r})")
  text_arch = r.raw("MODEL.TEXT.ARCH", "noencoder")
  if text_arch != "noencoder":
    raise ValueError(f"MODEL.TEXT.ARCH = {text_arch!r} is not supported (only "
                     "'noencoder': the language encoder is not ported)")

  # ---- backbone
  sw = "MODEL.BACKBONE.SWIN."
  depths = r.ints(sw + "DEPTHS", 4)
  num_heads = r.ints(sw + "NUM_HEADS", 4)
  embed_dim = r.int(sw + "EMBED_DIM", minimum=1)
  for i, h in enumerate(num_heads):
    if (embed_dim * 2 ** i) % h:
      raise ValueError(f"{sw}NUM_HEADS[{i}] = {h} does not divide the stage width "
                       f"{embed_dim * 2 ** i} ({sw}EMBED_DIM = {embed_dim})")
  qk_scale = r.raw(sw + "QK_SCALE")
  if qk_scale is not None:
    qk_scale = r.float(sw + "QK_SCALE")
  out_indices = r.raw(sw + "OUT_INDICES", None)
  if out_indices is not None and list(out_indices) != [0, 1, 2, 3]:
    raise ValueError(f"{sw}OUT_INDICES = {out_indices!r} is not supported (only [0, 1, 2, 3])")
  out_features = r.strs(sw + "OUT_FEATURES")
  bad = [f for f in out_features if f not in SWIN_FEATURES]
  if bad:
    raise ValueError(f"{sw}OUT_FEATURES names unknown features {bad} (known: {list(SWIN_FEATURES)})")
  backbone = dict(
      embed_dim=embed_dim,
      depths=depths,
      num_heads=num_heads,
      window_size=r.int(sw + "WINDOW_SIZE", minimum=1),
      patch_size=r.int(sw + "PATCH_SIZE", minimum=1),
      mlp_ratio=r.float(sw + "MLP_RATIO"),
      qkv_bias=r.bool(sw + "QKV_BIAS"),
      qk_scale=qk_scale,
      ape=r.bool(sw + "APE"),
      patch_norm=r.bool(sw + "PATCH_NORM"),
      pretrain_img_size=r.int(sw + "PRETRAIN_IMG_SIZE", minimum=1),
      out_features=out_features,
      drop_path_rate=r.float(sw + "DROP_PATH_RATE"),
  )

  # ---- pixel decoder (MODEL.ENCODER; its transformer uses DECODER.* sizes)
  enc, dec = "MODEL.ENCODER.", "MODEL.DECODER."
  norm = r.str(enc + "NORM")
  if norm != "GN":
    raise ValueError(f"{enc}NORM = {norm!r} is not supported (only 'GN')")
  conv_dim = r.int(enc + "CONVS_DIM", minimum=1)
  if conv_dim % GROUPNORM_GROUPS:
    raise ValueError(f"{enc}CONVS_DIM = {conv_dim} must be a multiple of {GROUPNORM_GROUPS} "
                     "(GroupNorm groups)")
  enc_heads = r.int(dec + "NHEADS", minimum=1)
  if conv_dim % enc_heads:
    raise ValueError(f"{dec}NHEADS = {enc_heads} (heads of the pixel decoder's encoder) "
                     f"does not divide {enc}CONVS_DIM = {conv_dim}")
  in_features = r.strs(enc + "IN_FEATURES")
  missing = [f for f in in_features if f not in out_features]
  if missing:
    raise ValueError(f"{enc}IN_FEATURES {list(in_features)} includes {missing}, which "
                     f"{sw}OUT_FEATURES {list(out_features)} does not produce")
  tr_features = r.strs(enc + "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES")
  missing = [f for f in tr_features if f not in in_features]
  if missing:
    raise ValueError(f"{enc}DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES includes {missing}, "
                     f"not in {enc}IN_FEATURES {list(in_features)}")
  feature_order = r.str(enc + "FEATURE_ORDER")
  if feature_order not in ("low2high", "high2low"):
    raise ValueError(f"{enc}FEATURE_ORDER = {feature_order!r} is not supported "
                     "('low2high' or 'high2low')")
  enc_levels = r.int(enc + "TOTAL_NUM_FEATURE_LEVELS", minimum=1)
  if enc_levels < len(tr_features):
    raise ValueError(f"{enc}TOTAL_NUM_FEATURE_LEVELS = {enc_levels} is smaller than the "
                     f"{len(tr_features)} DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES")
  dropout = r.float(dec + "DROPOUT")
  dim_feedforward = r.int(dec + "DIM_FEEDFORWARD", minimum=1)
  mask_dim = r.int(enc + "MASK_DIM", minimum=1)
  pixel_decoder = dict(
      conv_dim=conv_dim,
      mask_dim=mask_dim,
      norm=norm,
      num_groups=GROUPNORM_GROUPS,
      num_heads=enc_heads,
      dim_feedforward=dim_feedforward,
      dropout=dropout,
      num_encoder_layers=r.int(enc + "TRANSFORMER_ENC_LAYERS", minimum=0),
      n_points=N_POINTS,
      in_features=in_features,
      transformer_in_features=tr_features,
      num_feature_levels=r.int(enc + "NUM_FEATURE_LEVELS", minimum=1),
      total_num_feature_levels=enc_levels,
      common_stride=r.int(enc + "COMMON_STRIDE", minimum=1),
      feature_order=feature_order,
  )

  # ---- granularity decoder
  if r.bool(dec + "TWO_STAGE"):
    raise ValueError(f"{dec}TWO_STAGE = true is not supported (interactive decoding only)")
  dn = r.raw(dec + "DN")
  if dn not in ("seg", "standard"):
    raise ValueError(f"{dec}DN = {dn!r} is not supported: the prompt (demo) path needs "
                     "'seg' or 'standard'")
  hidden_dim = r.int(dec + "HIDDEN_DIM", minimum=1)
  if hidden_dim % DECODER_NUM_HEADS:
    raise ValueError(f"{dec}HIDDEN_DIM = {hidden_dim} must be a multiple of "
                     f"{DECODER_NUM_HEADS} (the decoder layers' fixed head count)")
  if r.bool(dec + "ENFORCE_INPUT_PROJ") or conv_dim != hidden_dim:
    raise ValueError(
        f"input projections in the decoder ({dec}ENFORCE_INPUT_PROJ = true, or "
        f"{enc}CONVS_DIM = {conv_dim} != {dec}HIDDEN_DIM = {hidden_dim}) are not supported")
  dec_levels = r.int(dec + "TOTAL_NUM_FEATURE_LEVELS", minimum=1)
  if dec_levels != enc_levels:
    raise ValueError(f"{dec}TOTAL_NUM_FEATURE_LEVELS = {dec_levels} must equal "
                     f"{enc}TOTAL_NUM_FEATURE_LEVELS = {enc_levels} (the decoder reads "
                     "every level the pixel decoder produces)")
  decoder = dict(
      hidden_dim=hidden_dim,
      num_heads=DECODER_NUM_HEADS,
      dim_feedforward=dim_feedforward,
      num_layers=r.int(dec + "DEC_LAYERS", minimum=1),
      num_mask_tokens=r.int(dec + "NUM_INTERACTIVE_TOKENS", 3, minimum=1),
      n_points=N_POINTS,
      total_num_feature_levels=dec_levels,
      mask_dim=mask_dim,
      dim_proj=r.int("MODEL.DIM_PROJ", minimum=1),
      # The reference builds its decoder layers with dropout 0.0 whatever
      # MODEL.DECODER.DROPOUT says (only the pixel decoder's encoder reads it).
      dropout=0.0,
  )

  size_div = r.int(dec + "SIZE_DIVISIBILITY")
  if size_div < 0:
    size_div = BACKBONE_SIZE_DIVISIBILITY

  # Start from the schema so fields not driven by the YAML (dtype, msda_impl,
  # anything added later) keep their defaults.
  cfg = model_config("swin_t").to_dict()
  cfg["backbone"].update(backbone)
  cfg["pixel_decoder"].update(pixel_decoder)
  cfg["decoder"].update(decoder)
  cfg.update(
      pixel_mean=r.floats("INPUT.PIXEL_MEAN", 3),
      pixel_std=r.floats("INPUT.PIXEL_STD", 3),
      size_divisibility=size_div,
  )
  return ml_collections.ConfigDict(cfg)


def optim_config_from_reference_yaml(source) -> ml_collections.ConfigDict:
  """``config.optim`` (semsam_jax.training.config schema) from a YAML's SOLVER section.

  Only AdamW with full-model L2 clipping and ``WarmupMultiStepLR`` (the
  SA-1B recipe) is supported; anything else raises ``ValueError``.
  """
  from semsam_jax.training.config import optim_config
  r = _Reader(load_reference_yaml(source))
  s = "SOLVER."
  if r.str(s + "OPTIMIZER") != "ADAMW":
    raise ValueError(f"{s}OPTIMIZER = {r.raw(s + 'OPTIMIZER')!r} is not supported (only 'ADAMW')")
  if r.str(s + "LR_SCHEDULER_NAME") != "WarmupMultiStepLR":
    raise ValueError(f"{s}LR_SCHEDULER_NAME = {r.raw(s + 'LR_SCHEDULER_NAME')!r} is not "
                     "supported (only 'WarmupMultiStepLR')")
  clip = 0.0
  if r.bool(s + "CLIP_GRADIENTS.ENABLED", False):
    if r.str(s + "CLIP_GRADIENTS.CLIP_TYPE") != "full_model" or \
        r.float(s + "CLIP_GRADIENTS.NORM_TYPE", 2.0) != 2.0:
      raise ValueError(f"{s}CLIP_GRADIENTS: only CLIP_TYPE full_model with NORM_TYPE 2.0 is supported")
    clip = r.float(s + "CLIP_GRADIENTS.CLIP_VALUE")
  mult = r.raw(s + "LR_MULTIPLIER", {}) or {}
  if not isinstance(mult, Mapping):
    raise ValueError(f"{s}LR_MULTIPLIER must be a mapping, got {mult!r}")
  c = optim_config()
  c.base_lr = r.float(s + "BASE_LR")
  c.weight_decay = r.float(s + "WEIGHT_DECAY")
  c.weight_decay_norm = r.float(s + "WEIGHT_DECAY_NORM", 0.0)
  c.weight_decay_embed = r.float(s + "WEIGHT_DECAY_EMBED", 0.0)
  c.lr_multiplier = tuple((str(k), float(v)) for k, v in mult.items())
  c.clip_norm = clip
  c.steps = r.ints(s + "STEPS")
  c.gamma = r.float(s + "GAMMA")
  c.warmup_factor = r.float(s + "WARMUP_FACTOR")
  c.warmup_iters = r.int(s + "WARMUP_ITERS", minimum=0)
  c.warmup_method = r.str(s + "WARMUP_METHOD")
  c.max_iter = r.int(s + "MAX_ITER", minimum=1)
  return c
