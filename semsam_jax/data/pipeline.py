"""grain input pipeline: TFDS ArrayRecord source -> static-shape training batches.

The batch format is the contract in ``docs/training.md``.  Every random draw of
an example is made with ``np.random.default_rng([seed, example_index, epoch])``,
so a global batch depends only on the seed and the step -- not on the process count,
the worker count, the prefetching or the machine.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import numpy as np

from semsam_jax.data import transforms as T


@dataclasses.dataclass(frozen=True)
class ExampleOptions:
  image_size: int = 1024
  max_num_instance: int = 60
  num_tokens: int = 6
  max_masks_per_image: int = 256
  min_scale: float = 0.99
  max_scale: float = 1.01
  random_flip: str = "horizontal"
  image_pad_value: int = 128
  mask_pad_value: int = 255

  @classmethod
  def from_config(cls, config) -> "ExampleOptions":
    d = config.data
    return cls(image_size=int(d.image_size), max_num_instance=int(d.max_num_instance),
               num_tokens=int(config.model.decoder.num_mask_tokens),
               max_masks_per_image=int(d.max_masks_per_image),
               min_scale=float(d.min_scale), max_scale=float(d.max_scale),
               random_flip=str(d.random_flip), image_pad_value=int(d.image_pad_value),
               mask_pad_value=int(d.mask_pad_value))


def _rles(example) -> list:
  seg = example["annotations"]["segmentation"]
  return list(seg["counts"])


def empty_example(opt: ExampleOptions) -> dict[str, np.ndarray]:
  """All-invalid example of the batch format (``example_id`` = -1)."""
  S, M, K, T_ = opt.image_size, opt.max_masks_per_image, opt.max_num_instance, opt.num_tokens
  return {
      "image": np.full((S, S, 3), opt.image_pad_value, np.uint8),
      "image_size": np.array([S, S], np.int32),
      "masks": np.zeros((M, S, S // 8), np.uint8),
      "mask_valid": np.zeros((M,), bool),
      "mask_boxes": np.zeros((M, 4), np.float32),
      "click_xy": np.zeros((K, 2), np.int32),
      "prompt_mask": np.zeros((K,), np.int32),
      "prompt_valid": np.zeros((K,), bool),
      "target_index": np.zeros((K, T_), np.int32),
      "target_valid": np.zeros((K, T_), bool),
      "example_id": np.array(-1, np.int32),
      "num_dropped_prompts": np.array(0, np.int32),
  }


def prepare_example(image: np.ndarray, rles, rng: np.random.Generator,
                    opt: ExampleOptions, example_id: int = -1,
                    return_debug: bool = False):
  """One training example (docs/training.md, without the batch dimension).

  Args:
    image: (H, W, 3) uint8 source image.
    rles: compressed COCO RLE counts (bytes/str) of the masks, all (H, W).
    rng: the example's generator; draws, in order: flip, scale, crop, prompt
      permutation, then per prompt its click and (if needed) target shuffle.
    opt: sizes and augmentation.
    example_id: stored in ``example_id``.
    return_debug: also return a dict with the geometry and kept mask indices.
  """
  S, K, T_, M = opt.image_size, opt.max_num_instance, opt.num_tokens, opt.max_masks_per_image
  if S % 8:
    raise ValueError(f"image_size {S} must be a multiple of 8")
  h, w = image.shape[:2]
  g = T.draw_geometry(rng, h, w, S, opt.min_scale, opt.max_scale, opt.random_flip)
  out = empty_example(opt)
  out["image"] = T.transform_image(image, g, opt.image_pad_value)
  out["example_id"] = np.array(example_id, np.int32)
  pad = opt.mask_pad_value != 0
  pieces = T.mask_pieces(rles, g)
  total = pieces.count + (T.pad_pixel_count(g) if pad else 0)
  kept = np.flatnonzero(total > 0)  # filter_empty_instances
  debug = {"geometry": g, "kept": kept}
  n = len(kept)
  if n == 0:
    return (out, debug) if return_debug else out
  # Restrict the pieces to the kept masks, renumbered in GT order.
  if n != len(rles):
    remap = np.full(len(rles), -1, np.int64)
    remap[kept] = np.arange(n)
    sel = remap[pieces.mask] >= 0
    pieces = T.MaskPieces(remap[pieces.mask[sel]], pieces.x[sel], pieces.y0[sel],
                          pieces.y1[sel], pieces.count[kept],
                          [pieces.starts[i] for i in kept], [pieces.ends[i] for i in kept])
  index = rng.permutation(n)
  if K > n:
    index = np.tile(index, K // n + 1)
  index = index[:K]
  clicks = T.sample_pixels(rng, pieces, index, g, pad)
  inside = T.contains(pieces, g, clicks, pad)
  targets = []
  for k in range(K):
    tgt = np.flatnonzero(inside[k])
    if len(tgt) > T_:
      tgt = rng.permutation(tgt)[:T_]
    targets.append(tgt)
  # Slots: the masks some prompt refers to, in GT order; drop prompts from the
  # end while more than M are referenced.
  used = np.zeros(n, bool)
  n_keep = 0
  for k in range(K):
    new = used.copy()
    new[targets[k]] = True
    new[index[k]] = True
    if new.sum() > M:
      break
    used = new
    n_keep = k + 1
  slots = np.flatnonzero(used)
  slot_of = np.full(n, -1, np.int64)
  slot_of[slots] = np.arange(len(slots))
  out["masks"][:len(slots)] = T.packed_canvas(pieces, slots, g, pad)
  out["mask_valid"][:len(slots)] = True
  out["mask_boxes"][:len(slots)] = T.boxes_of(pieces, slots, g, pad)
  out["click_xy"][:n_keep] = clicks[:n_keep]
  out["prompt_mask"][:n_keep] = slot_of[index[:n_keep]]
  out["prompt_valid"][:n_keep] = True
  for k in range(n_keep):
    t = slot_of[targets[k]]
    out["target_index"][k, :len(t)] = t
    out["target_valid"][k, :len(t)] = True
  out["num_dropped_prompts"] = np.array(K - n_keep, np.int32)
  debug.update(index=index, targets=targets, slots=slots, clicks=clicks)
  return (out, debug) if return_debug else out


# ----------------------------------------------------------------------------
# TFDS sources.


def dataset_dir(data_dir: str) -> str:
  """The TFDS dataset folder inside a data dir built by this package."""
  from semsam_jax.data import builder as B
  d = os.path.join(data_dir, B.BUILDER_NAME, B.VERSION)
  if os.path.exists(os.path.join(d, "dataset_info.json")):
    return d
  if os.path.exists(os.path.join(data_dir, "dataset_info.json")):
    return data_dir
  raise FileNotFoundError(
      f"{data_dir}: no dataset (expected {d}/dataset_info.json); build one with "
      "`python -m semsam_jax.data build-sa1b|build-coco|build-masks ... --output DATA_DIR`")


def raw_source(data_dir: str, split: str):
  """Random-access TFDS source; the image content stays JPEG bytes."""
  import tensorflow_datasets as tfds
  b = tfds.builder_from_directory(dataset_dir(data_dir))
  if split not in b.info.splits:
    raise KeyError(f"{data_dir}: no split {split!r} (has {sorted(b.info.splits)})")
  return b.as_data_source(split, decoders={"image": {"content": tfds.decode.SkipDecoding()}})


class DecodedSplit:
  """Random-access decoded examples of a split, for evaluation and ``show``.

  ``split[i]`` is a dict: ``image`` (H, W, 3) uint8 RGB, ``masks`` (N, H, W)
  bool (decoded from the RLEs, annotation order), ``boxes`` (N, 4) float32
  XYXY pixels (the annotation boxes, de-normalised), ``point_coords`` (N, 2)
  float32 pixels, ``image_id`` int, ``file_name`` str, ``index`` int.
  """

  def __init__(self, data_dir: str, split: str):
    self._src = raw_source(data_dir, split)

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils
    ex = self._src[int(i)]
    img = T.decode_image(ex["image"]["content"])
    h, w = img.shape[:2]
    counts = _rles(ex)
    if counts:
      masks = mask_utils.decode([{"size": [h, w], "counts": c} for c in counts])
      masks = np.moveaxis(masks, -1, 0).astype(bool)
      b = np.asarray(ex["annotations"]["bbox"], np.float32).reshape(-1, 4)
      boxes = np.stack([b[:, 1] * w, b[:, 0] * h, b[:, 3] * w, b[:, 2] * h], -1)
      pts = np.asarray(ex["annotations"]["point_coords"], np.float32).reshape(-1, 2)
    else:
      masks = np.zeros((0, h, w), bool)
      boxes = np.zeros((0, 4), np.float32)
      pts = np.zeros((0, 2), np.float32)
    fn = ex["image"]["file_name"]
    return {"image": img, "masks": masks, "boxes": boxes.astype(np.float32),
            "point_coords": pts, "image_id": int(ex["image"]["image_id"]),
            "file_name": fn.decode() if isinstance(fn, bytes) else str(fn), "index": int(i)}


def read_split(data_dir: str, split: str) -> DecodedSplit:
  """Random-access source of decoded examples (see :class:`DecodedSplit`)."""
  return DecodedSplit(data_dir, split)


# ----------------------------------------------------------------------------
# grain.


class _PrepareFn:
  """(epoch, example index) -> training example; picklable for grain workers."""

  def __init__(self, data_dir, split, seed, opt):
    self.data_dir, self.split, self.seed, self.opt = data_dir, split, int(seed), opt
    self._src = None
    self._lock = threading.Lock()

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_src", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._src = None
    self._lock = threading.Lock()

  def __call__(self, item):
    if self._src is None:
      with self._lock:  # grain calls this from several reader threads
        if self._src is None:
          self._src = raw_source(self.data_dir, self.split)
    epoch, index = (int(v) for v in item)
    if index < 0:
      return empty_example(self.opt)
    ex = self._src[index]
    image = T.decode_image(ex["image"]["content"])
    rng = np.random.default_rng([self.seed, index, epoch])
    return prepare_example(image, _rles(ex), rng, self.opt, example_id=index)


def _stack(items):
  return {k: np.stack([it[k] for it in items]) for k in items[0]}


def _shard(process_index, process_count):
  import grain
  if process_index is None and process_count is None:
    return grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if process_index is None or process_count is None:
    raise ValueError("give both process_index and process_count, or neither")
  if not 0 <= int(process_index) < int(process_count):
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return grain.sharding.ShardOptions(shard_index=int(process_index),
                                     shard_count=int(process_count), drop_remainder=True)


def make_train_loader(config, *, process_index: int | None = None,
                      process_count: int | None = None, data_dir: str | None = None):
  """Infinite iterable of per-host training batches (docs/training.md).

  The global order does not depend on the process count: a seeded
  permutation of the split per epoch (grain's ``shuffle(seed).repeat()``, a
  new order every epoch), cut into global batches of ``config.batch_size``
  consecutive examples (a batch may span an epoch boundary; nothing is
  dropped).  Process ``p`` of ``P`` (grain ``ShardOptions``, by default those
  of ``grain.sharding.ShardByJaxProcess``: the JAX process index/count) yields
  rows ``[p * B/P, (p + 1) * B/P)`` of each global batch, so
  ``jax.make_array_from_process_local_data`` assembles the same global batch
  for any ``P``.  ``iter(loader)`` is a grain ``DatasetIterator``: checkpoint
  it with ``grain.checkpoint.CheckpointSave(iterator)`` inside
  ``ocp.args.Composite`` (see docs/data.md).
  """
  import grain
  from semsam_jax.data import ensure_dataset
  d = config.data
  data_dir = data_dir or ensure_dataset(d)
  split = d.train_split
  seed = int(config.seed if d.get("seed", None) is None else d.seed)
  shard = _shard(process_index, process_count)
  P = shard.shard_count
  if config.batch_size % P:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by "
                     f"{P} processes")
  per_host = config.batch_size // P
  n = len(raw_source(data_dir, split))
  if n == 0:
    raise ValueError(f"{data_dir}/{split}: no examples")
  opt = ExampleOptions.from_config(config)
  # The global stream: element g is example order_e[g % n] of epoch e = g // n.
  ds = grain.MapDataset.range(n)
  if d.shuffle:
    ds = ds.shuffle(seed=seed % 2**32)
  ds = ds.repeat(None)
  ds = ds.map_with_index(lambda g, index: (g // n, int(index)))
  ds = ds.map(_PrepareFn(data_dir, split, seed, opt))
  # Blocks of B/P consecutive examples; global batch t is blocks t*P .. t*P+P-1,
  # and this process takes block t*P + p.  Each block is made whole by one
  # worker, so the stream of batches does not depend on the worker count.  The
  # datasets are lazy: only this process's examples are read and prepared.
  ds = ds.batch(per_host, drop_remainder=True, batch_fn=_stack)
  if P > 1:
    ds = ds.slice(slice(shard.shard_index, None, P))
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=int(d.get("read_threads", 1)),
      prefetch_buffer_size=int(d.get("read_prefetch", 2))))
  workers = int(d.get("worker_count", 0))
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags (their defaults outside an absl app).
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(d.get("worker_buffer_size", 2))))
  return it
