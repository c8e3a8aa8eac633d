"""TFDS builder for SA-1B-layout data on local disk (ArrayRecord, no TF, no Beam).

``SegmentAnythingLocal`` subclasses TFDS's own ``segment_anything`` builder and
keeps its features exactly; only the example source changes: instead of
downloading Meta's tars and running Beam, it reads examples that the importers
of this package have already validated (``sa1b`` folders, COCO JSON, mask
folders).

Layout of a data dir (``--output DATA_DIR``)::

  DATA_DIR/segment_anything_local/1.0.0/     the dataset (usual TFDS layout:
      dataset_info.json, features.json,       one ArrayRecord file set per
      segment_anything_local-<split>.array_record-0000i-of-0000n)  split
  DATA_DIR/.parts/<split>/<part key>/         one finished TFDS build per
      segment_anything_local/1.0.0/...        source (folder / JSON file), and
      part.json                               its report (built, skipped)

Each source is built into its own *part* (TFDS writes it into a temporary
folder and renames it when complete), then every finished part is *assembled*
into the dataset: the part shards are hard-linked (copied where links are not
possible) under the dataset's shard names and ``dataset_info.json`` lists them.
A build that stops half way leaves no partial part; running the same command
again skips the parts already built (resume), and running it with new sources
adds them (extend).  The assembled dataset is replaced atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

BUILDER_NAME = "segment_anything_local"
VERSION = "1.0.0"


@dataclasses.dataclass
class Skipped:
  path: str
  reason: str


@dataclasses.dataclass
class BuildReport:
  built: int = 0
  skipped: list = dataclasses.field(default_factory=list)
  parts_built: int = 0
  parts_reused: int = 0

  def summary(self) -> str:
    return (f"built {self.built} examples, skipped {len(self.skipped)} "
            f"({self.parts_built} sources built, {self.parts_reused} reused)")


def _tfds():
  import tensorflow_datasets as tfds
  return tfds


_BUILDER_CLS = None


def builder_class():
  """The ``SegmentAnythingLocal`` TFDS builder class (created on first use)."""
  global _BUILDER_CLS
  if _BUILDER_CLS is not None:
    return _BUILDER_CLS
  tfds = _tfds()
  from tensorflow_datasets.datasets.segment_anything import (
      segment_anything_dataset_builder as sa_builder)

  class SegmentAnythingLocal(sa_builder.Builder):
    """SA-1B features, examples from an iterator of validated examples."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "SA-1B features, built from local files."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = None
    pkg_dir_path = sa_builder.Builder._get_pkg_dir_path()

    def __init__(self, *, examples: Callable[[], Iterator] | None = None,
                 split: str = "train", **kwargs):
      self._examples_fn = examples
      self._split_name = split
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager
      if self._examples_fn is None:
        raise RuntimeError("SegmentAnythingLocal is built through "
                           "semsam_jax.data (build-sa1b / build-coco / build-masks)")
      return {self._split_name: self._generate_examples_local()}

    def _generate_examples_local(self):
      yield from self._examples_fn()

  _BUILDER_CLS = SegmentAnythingLocal
  return SegmentAnythingLocal


# ----------------------------------------------------------------------------
# Validated examples.


def tfds_bbox(xywh, height: int, width: int) -> np.ndarray:
  """COCO [x, y, w, h] pixels -> TFDS [ymin, xmin, ymax, xmax] normalised, clipped."""
  x, y, w, h = (float(v) for v in xywh)
  box = np.array([y / height, x / width, (y + h) / height, (x + w) / width], np.float32)
  return np.clip(box, 0.0, 1.0)


def make_example(image_bytes: bytes, file_name: str, image_id: int, height: int,
                 width: int, annotations: Sequence[dict]) -> dict:
  """An example in the features of TFDS's ``segment_anything``.

  ``annotations``: SA-1B JSON records (``segmentation`` RLE with string
  counts, ``bbox`` / ``crop_box`` XYWH pixels, ``point_coords`` [[x, y]],
  ``area``, ``id``, ``predicted_iou``, ``stability_score``); missing optional
  fields get neutral values (crop_box = whole image, point = box centre,
  scores = 1).
  """
  anns = []
  for a in annotations:
    seg = a["segmentation"]
    counts = seg["counts"]
    if isinstance(counts, bytes):
      counts = counts.decode("ascii")
    bbox = a.get("bbox")
    if bbox is None:
      from pycocotools import mask as mask_utils
      bbox = mask_utils.toBbox({"size": list(seg["size"]), "counts": counts.encode()}).tolist()
    crop = a.get("crop_box", [0, 0, width, height])
    point = a.get("point_coords")
    if point is None:
      point = [[bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2]]
    anns.append({
        "area": np.uint64(int(a.get("area", 0))),
        "bbox": tfds_bbox(bbox, height, width),
        "crop_box": tfds_bbox(crop, height, width),
        "id": np.uint64(int(a.get("id", len(anns)))),
        "point_coords": np.asarray(point, np.float64).reshape(1, 2),
        "predicted_iou": float(a.get("predicted_iou", 1.0)),
        "segmentation": {"counts": counts,
                         "size": np.asarray(seg["size"], np.uint64)},
        "stability_score": float(a.get("stability_score", 1.0)),
    })
  return {
      "image": {"content": image_bytes, "file_name": file_name,
                "height": np.uint64(height), "width": np.uint64(width),
                "image_id": np.uint64(image_id)},
      "annotations": anns,
  }


def check_image(image_bytes: bytes):
  """Decodes the whole image (catches truncation); returns (height, width)."""
  import io

  from PIL import Image
  with Image.open(io.BytesIO(image_bytes)) as im:
    im.load()
    w, h = im.size
  return h, w


def read_image_file(path):
  """The bytes and (height, width) of the image file ``path``, fully decoded
  once to catch truncation; a :class:`Skipped` naming the reason otherwise."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return Skipped(path, f"cannot read image ({e})")
  try:
    h, w = check_image(data)
  except Exception as e:
    return Skipped(path, f"unreadable or truncated image ({type(e).__name__}: {e})")
  return data, h, w


def check_rles(annotations: Sequence[dict], height: int, width: int):
  """Raises ValueError naming the first annotation whose RLE is unusable.

  The RLE is parsed by the training pipeline's own decoder
  (:func:`semsam_jax.data.transforms.rle_intervals`), which rejects invalid
  characters, negative runs and runs that do not cover exactly
  ``height * width`` pixels.  (pycocotools' ``decode`` does not: for a short
  RLE it returns a mask with uninitialised pixels.)
  """
  from semsam_jax.data.transforms import rle_intervals
  for k, a in enumerate(annotations):
    seg = a.get("segmentation") if isinstance(a, dict) else None
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
      raise ValueError(f"annotation {k}: no RLE 'segmentation' {{counts, size}}")
    size = [int(v) for v in seg["size"]]
    if size != [height, width]:
      raise ValueError(f"annotation {k}: RLE size {size} != image size [{height}, {width}]")
    counts = seg["counts"]
    if not isinstance(counts, (str, bytes)):
      raise ValueError(f"annotation {k}: RLE counts is a {type(counts).__name__}, "
                       "not a compressed RLE string")
    try:
      rle_intervals(counts, height, width)
    except (ValueError, UnicodeEncodeError) as e:
      raise ValueError(f"annotation {k}: RLE does not decode ({e})") from None


# ----------------------------------------------------------------------------
# Parts and assembly.


def _dataset_dir(root: str) -> str:
  return os.path.join(root, BUILDER_NAME, VERSION)


def part_key(source: str, split: str, extra: str = "") -> str:
  h = hashlib.sha1(f"{os.path.abspath(source)}|{split}|{extra}".encode()).hexdigest()[:16]
  return h


def _part_root(data_dir: str, split: str, key: str) -> str:
  return os.path.join(data_dir, ".parts", split, key)


def build_part(data_dir: str, split: str, key: str, source: str,
               items: Sequence, load: Callable, *, num_workers: int = 1,
               progress: bool = True, log=print) -> tuple[bool, int, list]:
  """Builds one source into a part unless it exists; returns (built_now, n, skipped).

  ``items``: picklable work items; ``load(item)`` -> ``(key, example)``, or a
  :class:`Skipped` (reported and left out); runs in ``num_workers``
  processes.  Any exception aborts the part and leaves nothing of it.
  """
  root = _part_root(data_dir, split, key)
  info_path = os.path.join(root, "part.json")
  if os.path.exists(info_path):
    with open(info_path) as f:
      info = json.load(f)
    return False, info["built"], [Skipped(**s) for s in info["skipped"]]
  import glob
  for stale in glob.glob(f"{glob.escape(root)}.tmp-*"):  # of a killed earlier build
    shutil.rmtree(stale, ignore_errors=True)
  tmp_root = f"{root}.tmp-{os.getpid()}"
  os.makedirs(tmp_root)
  skipped: list[Skipped] = []
  from tqdm import tqdm

  yielded = [0]
  finished = [False]

  def examples():
    bar = tqdm(total=len(items), desc=f"{split} <- {os.path.basename(source.rstrip('/'))}",
               unit="img", disable=not progress, file=sys.stderr)
    for res in _imap(load, items, num_workers):
      bar.update(1)
      if isinstance(res, Skipped):
        skipped.append(res)
        log(f"skip {res.path}: {res.reason}")
        continue
      yielded[0] += 1
      yield res
    bar.close()
    finished[0] = True

  tfds = _tfds()
  if not progress:
    tfds.disable_progress_bar()
  cls = builder_class()
  try:
    builder = cls(examples=examples, split=split, data_dir=tmp_root,
                  file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=tmp_root, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    n = builder.info.splits[split].num_examples if split in builder.info.splits else 0
  except BaseException:
    shutil.rmtree(tmp_root, ignore_errors=True)
    if yielded[0] or not finished[0]:
      raise  # a real failure: nothing of this part is left
    # Every input of this source was skipped (TFDS refuses an empty split):
    # the part is finished, without a dataset.
    os.makedirs(tmp_root)
    n = 0
  with open(os.path.join(tmp_root, "part.json"), "w") as f:
    json.dump({"source": os.path.abspath(source), "split": split, "built": int(n),
               "skipped": [dataclasses.asdict(s) for s in skipped]}, f, indent=1)
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(os.path.dirname(root), exist_ok=True)
  os.replace(tmp_root, root)
  return True, int(n), skipped


def _imap(fn, items, num_workers):
  if num_workers > 1 and len(items) > 1:
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(num_workers) as pool:
      yield from pool.imap(fn, items, chunksize=4)
  else:
    for it in items:
      yield fn(it)


def assemble(data_dir: str, log=print) -> str:
  """(Re)writes the dataset from every finished part under ``data_dir/.parts``."""
  tfds = _tfds()
  parts_root = os.path.join(data_dir, ".parts")
  splits: dict[str, list[str]] = {}
  for split in sorted(os.listdir(parts_root)) if os.path.isdir(parts_root) else []:
    for key in sorted(os.listdir(os.path.join(parts_root, split))):
      d = os.path.join(parts_root, split, key)
      if ".tmp-" in key or not os.path.exists(os.path.join(d, "part.json")):
        continue
      splits.setdefault(split, []).append(d)
  if not splits:
    raise ValueError(f"{data_dir}: nothing was built (no valid example in the sources)")
  final = _dataset_dir(data_dir)
  tmp = tempfile.mkdtemp(prefix=".assemble-", dir=os.path.dirname(final)
                         if os.path.isdir(os.path.dirname(final)) else _mk(os.path.dirname(final)))
  try:
    template = _assemble_into(tmp, splits, tfds, data_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(final):
    old = f"{final}.old-{os.getpid()}"
    os.replace(final, old)
  os.replace(tmp, final)
  if old:
    shutil.rmtree(old, ignore_errors=True)
  return final


def _assemble_into(tmp, splits, tfds, data_dir):
  """Links the shards of every part into ``tmp`` and writes its dataset_info."""
  template = None
  split_infos = []
  for split, parts in splits.items():
    shard_files, lengths, nbytes = [], [], 0
    for d in parts:
      pdir = _dataset_dir(d)
      if not os.path.exists(os.path.join(pdir, "dataset_info.json")):
        continue  # a source without any valid example
      pb = tfds.builder_from_directory(pdir)
      if template is None:
        template = pdir
      si = pb.info.splits[split]
      files = si.filenames
      for name, length in zip(files, si.shard_lengths):
        shard_files.append(os.path.join(pdir, name))
        lengths.append(int(length))
      nbytes += int(si.num_bytes)
    n = len(shard_files)
    for i, src in enumerate(shard_files):
      dst = os.path.join(tmp, f"{BUILDER_NAME}-{split}.array_record-{i:05d}-of-{n:05d}")
      try:
        os.link(src, dst)
      except OSError:
        shutil.copyfile(src, dst)
    if n:
      split_infos.append(tfds.core.SplitInfo(
          name=split, shard_lengths=lengths, num_bytes=nbytes,
          filename_template=tfds.core.ShardedFileTemplate(
              data_dir=tmp, dataset_name=BUILDER_NAME, split=split,
              filetype_suffix="array_record")))
  if template is None:
    raise ValueError(f"{data_dir}: nothing was built (no valid example in the sources)")
  base = tfds.builder_from_directory(template)
  info = base.info
  info.set_splits(tfds.core.SplitDict(split_infos))
  info.write_to_directory(tmp)
  for extra in ("features.json",):
    if os.path.exists(os.path.join(template, extra)) and not os.path.exists(os.path.join(tmp, extra)):
      shutil.copyfile(os.path.join(template, extra), os.path.join(tmp, extra))
  return template


def _mk(path):
  os.makedirs(path, exist_ok=True)
  return path
