"""Map a PyTorch Semantic-SAM state dict onto the Flax parameter tree.

The Flax modules mirror the PyTorch attribute paths (see
:mod:`semsam_jax.models.layers`), so the mapping is mechanical:

* ``model.`` / ``module.`` prefixes are dropped; ``backbone.*``,
  ``sem_seg_head.pixel_decoder.*`` and ``sem_seg_head.predictor.*`` become the
  top-level collections ``backbone``, ``pixel_decoder`` and ``predictor``;
* a numeric path segment is merged into the previous one (``layers.0`` ->
  ``layers_0``);
* ``weight`` becomes ``kernel`` (Linear: transposed; Conv: OIHW -> HWIO),
  ``scale`` (norms) or ``embedding`` (nn.Embedding), whichever the target has;
  ``in_proj_weight``/``in_proj_bias`` of ``nn.MultiheadAttention`` become
  ``in_proj/kernel`` / ``in_proj/bias``;
* tensors saved under several names (modules shared between layers) must be
  identical and map onto one parameter;
* buffers that the JAX code recomputes (Swin's ``relative_position_index``)
  are checked against the recomputed value and dropped.

Any key left over, any target parameter left unfilled and any shape mismatch is
collected and reported together in one :class:`ConversionError` -- nothing is
dropped silently (the original loader's ``strict=False`` would hide such bugs).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

TOP_LEVEL = (
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    ("sem_seg_head.predictor.", "predictor."),
    ("backbone.", "backbone."),
)

# Several checkpoint names for one shared module: (pattern, canonical replacement).
# Patterns apply to keys after prefix normalisation and TOP_LEVEL renaming.
TIED_ALIASES = (
    (re.compile(r"^predictor\.(?:_bbox_embed|bbox_embed\.\d+|decoder\.bbox_embed\.\d+)\."),
     "predictor.bbox_embed."),
    (re.compile(r"^predictor\.decoder\.norm\."), "predictor.decoder_norm."),
)


class ConversionError(ValueError):
  """A state dict does not fit the target parameter tree."""

  def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
    super().__init__(message)
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)


def _strip_wrappers(key: str) -> str:
  for p in ("module.", "model."):
    if key.startswith(p):
      key = key[len(p):]
  return key


def normalize_key(key: str) -> str:
  """Torch key -> dotted key relative to our top level, aliases resolved."""
  key = _strip_wrappers(key)
  for src, dst in TOP_LEVEL:
    if key.startswith(src):
      key = dst + key[len(src):]
      break
  for pattern, repl in TIED_ALIASES:
    key = pattern.sub(repl, key)
  return key


def _relative_position_index(window: int) -> np.ndarray:
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
  flat = coords.reshape(2, -1)
  rel = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _check_buffer(key: str, value: np.ndarray) -> str | None:
  """Returns None for a known, correct buffer; an error message if it is wrong."""
  n = value.shape[0] if value.ndim == 2 else -1
  window = int(round(np.sqrt(n))) if n > 0 else -1
  if value.ndim != 2 or value.shape[0] != value.shape[1] or window * window != n:
    return f"{key}: buffer of unexpected shape {value.shape}"
  if not np.array_equal(value, _relative_position_index(window)):
    return f"{key}: relative_position_index differs from the standard Swin index"
  return None


BUFFER_SUFFIXES = (".relative_position_index",)


def _path_parts(key: str) -> list[str]:
  parts: list[str] = []
  for seg in key.split("."):
    if seg.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{seg}"
    else:
      parts.append(seg)
  if parts and parts[-1] in ("in_proj_weight", "in_proj_bias"):
    leaf = parts.pop()
    parts += ["in_proj", leaf[len("in_proj_"):]]
  return parts


def _to_leaf(parts: list[str], value: np.ndarray, target_flat: Mapping[tuple, Any]):
  """Resolves the Flax leaf name and layout for one tensor; None if no target."""
  module, leaf = tuple(parts[:-1]), parts[-1]
  if leaf == "weight":
    for name in ("kernel", "scale", "embedding", "weight"):
      if module + (name,) in target_flat:
        leaf = name
        break
  path = module + (leaf,)
  if path not in target_flat:
    return None, None
  if leaf == "kernel":
    if value.ndim == 2:
      value = value.T
    elif value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 3:
      value = value.transpose(2, 1, 0)
  return path, value


def convert_state_dict(state_dict: Mapping[str, np.ndarray], target: Any,
                       prefix: str = "") -> dict:
  """Converts ``state_dict`` onto the structure of ``target``.

  Args:
    state_dict: flat ``{torch_key: array}`` (as from :func:`load_state_dict`).
    target: the Flax params pytree (arrays or ``jax.ShapeDtypeStruct``) to fill.
    prefix: only keys starting with this torch prefix are converted, relative
      to it (e.g. ``"model.backbone."`` with ``target`` = the backbone params).

  Returns:
    A nested dict of numpy arrays with exactly ``target``'s structure, shapes
    and dtypes.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  target_flat = traverse_util.flatten_dict(_unfreeze(target))
  norm_prefix = normalize_key(prefix) if prefix else ""

  groups: dict[str, list[tuple[str, np.ndarray]]] = {}
  for key, value in state_dict.items():
    nk = normalize_key(key)
    if norm_prefix:
      if not nk.startswith(norm_prefix):
        continue
      nk = nk[len(norm_prefix):]
    groups.setdefault(nk, []).append((key, np.asarray(value)))

  out: dict[tuple, np.ndarray] = {}
  unexpected, mismatched, errors = [], [], []
  mismatched_paths = set()
  for nk, entries in groups.items():
    first_key, value = entries[0]
    for other_key, other in entries[1:]:
      if other.shape != value.shape or not np.array_equal(other, value):
        errors.append(f"tied tensors differ: {first_key} vs {other_key}")
    if nk.endswith(BUFFER_SUFFIXES):
      msg = _check_buffer(first_key, value)
      if msg:
        errors.append(msg)
      continue
    path, leaf_value = _to_leaf(_path_parts(nk), value, target_flat)
    if path is None:
      unexpected.append(first_key)
      continue
    want = target_flat[path]
    if tuple(leaf_value.shape) != tuple(want.shape):
      mismatched.append(f"{first_key}: checkpoint {tuple(value.shape)} -> "
                        f"{'/'.join(path)} expects {tuple(want.shape)}")
      mismatched_paths.add(path)
      continue
    out[path] = np.asarray(leaf_value, dtype=np.dtype(want.dtype))

  # A mis-shaped tensor is reported once, as mis-shaped, not also as missing.
  missing = ["/".join(p) for p in target_flat if p not in out and p not in mismatched_paths]
  if missing or unexpected or mismatched or errors:
    lines = []
    if missing:
      lines.append(f"{len(missing)} parameter(s) missing from the checkpoint:")
      lines += [f"  {m}" for m in sorted(missing)]
    if unexpected:
      lines.append(f"{len(unexpected)} unexpected checkpoint key(s):")
      lines += [f"  {u}" for u in sorted(unexpected)]
    if mismatched:
      lines.append(f"{len(mismatched)} shape mismatch(es):")
      lines += [f"  {m}" for m in mismatched]
    if errors:
      lines += errors
    raise ConversionError("checkpoint does not match the model:\n" + "\n".join(lines),
                          missing, unexpected, mismatched)
  return traverse_util.unflatten_dict(out)


def _unfreeze(tree):
  if hasattr(tree, "unfreeze"):
    tree = tree.unfreeze()
  if isinstance(tree, Mapping) and "params" in tree and len(tree) == 1:
    tree = tree["params"]
  return _plain(tree)


def _plain(tree):
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  if hasattr(tree, "unbox"):  # nn.Partitioned / LogicallyPartitioned boxes
    return tree.unbox()
  return tree
