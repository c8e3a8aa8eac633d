"""The evaluation loop: prompts prepared on the host, batches of images of one
padded size scored by the jitted :func:`scoring.make_score_fn`, metrics
accumulated as the original's evaluator does.

Protocols (see ``docs/evaluation.md``):

``coco_interactive``
  the original's ``evaluate_interactive``: one click per ground-truth mask at
  the argmax of kornia's distance transform of the mask, the 6x6 click box
  with ``pb = 0``, every prompt's 6 tokens attending only to each other;
  Max (token with the highest predicted IoU) and Oracle (best token) IoUs,
  NoC@{0.5,0.8,0.85,0.9} and mIoU after one click.
``multi_granularity``
  defined here (the released original cannot run it): up to
  ``mg_max_clicks`` masks per image sampled with a seeded RNG, one click at
  each one's distance-transform centre, level targets = every mask that
  contains the click (in mask order; a seeded shuffle cut to T when more), the
  training matcher's cost between the T outputs and the targets, an exact
  assignment per click, and the mean IoU over matched (click, target) pairs.

Prompt order does not change any number (prompts are independent under the
block-diagonal attention mask), so prompts follow the mask order instead of
the original's ``randperm``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Iterable, Iterator, Optional

import jax
import numpy as np

from semsam_jax.evaluation import clicks as clicks_lib
from semsam_jax.evaluation import metrics as metrics_lib
from semsam_jax.evaluation import scoring
from semsam_jax.evaluation.datasets import EvalImage
from semsam_jax.models import semantic_sam as ss

PROTOCOLS = ("coco_interactive", "multi_granularity")
PROMPT_BUCKETS = (8, 16, 32, 64, 128, 256, 512)


@dataclasses.dataclass
class EvalOptions:
  protocols: tuple[str, ...] = PROTOCOLS
  click_method: str = "kornia"          # or "euclidean"
  batch_size: int = 1                   # images per step (rounded up to the device count)
  prompt_buckets: tuple[int, ...] = PROMPT_BUCKETS
  mg_max_clicks: int = 60               # the reference's MAX_NUM_INSTANCE
  seed: int = 0
  prompt_chunk: int = 8                 # prompts upsampled at once inside the step
  progress: bool = True
  weights: scoring.MatcherWeights = dataclasses.field(default_factory=scoring.MatcherWeights)

  def __post_init__(self):
    bad = [p for p in self.protocols if p not in PROTOCOLS]
    if bad or not self.protocols:
      raise ValueError(f"unknown protocol(s) {bad}; expected some of {PROTOCOLS}")
    if self.click_method not in clicks_lib.CLICK_METHODS:
      raise ValueError(f"click method must be one of {clicks_lib.CLICK_METHODS}")
    if self.batch_size < 1 or self.mg_max_clicks < 1:
      raise ValueError("batch_size and mg_max_clicks must be >= 1")


def bucket(n: int, buckets: Iterable[int]) -> int:
  """Smallest bucket >= n (beyond the largest: the next multiple of it)."""
  buckets = sorted(buckets)
  for b in buckets:
    if n <= b:
      return b
  return -(-n // buckets[-1]) * buckets[-1]


def mask_boxes_cxcywh(masks: np.ndarray, padded_hw: tuple[int, int]) -> np.ndarray:
  """Boxes of masks as detectron2's ``BitMasks.get_bounding_boxes`` ([x0, y0,
  x1 + 1, y1 + 1] pixels), as cx, cy, w, h relative to the padded image."""
  boxes = np.zeros((len(masks), 4), np.float32)
  for i, m in enumerate(masks):
    ys = np.flatnonzero(m.any(1))
    xs = np.flatnonzero(m.any(0))
    if ys.size:
      boxes[i] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
  hp, wp = padded_hw
  x0, y0, x1, y1 = boxes.T
  return np.stack([(x0 + x1) / 2 / wp, (y0 + y1) / 2 / hp, (x1 - x0) / wp, (y1 - y0) / hp],
                  1).astype(np.float32)


def level_targets(masks: np.ndarray, click_xy, max_targets: int, rng: np.random.Generator):
  """Indices of every mask containing the click, in mask order; when more
  than ``max_targets``, a seeded shuffle cut to ``max_targets`` (as training)."""
  x, y = int(click_xy[0]), int(click_xy[1])
  inds = np.flatnonzero(masks[:, y, x])
  if len(inds) > max_targets:
    inds = rng.permutation(inds)[:max_targets]
  return inds


def image_rng(seed: int, image_id: str) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(str(image_id).encode())])


@dataclasses.dataclass
class Prepared:
  ex: EvalImage
  padded_hw: tuple[int, int]
  clicks: np.ndarray                    # (N, 2) centre click of every mask
  boxes: np.ndarray                     # (N, 4)
  mg_prompts: Optional[np.ndarray] = None     # (K,) mask index of each click
  mg_targets: Optional[list] = None           # K arrays of mask indices
  mg_masks_used: Optional[np.ndarray] = None  # (M,) masks referenced, compacted


def prepare(ex: EvalImage, opts: EvalOptions, num_tokens: int, divisibility: int) -> Prepared:
  h, w = ex.image.shape[:2]
  padded_hw = ss.padded_size(h, w, divisibility)
  pts = clicks_lib.center_clicks(ex.masks, opts.click_method)
  p = Prepared(ex, padded_hw, pts, clicks_lib.click_boxes(pts, (h, w), padded_hw))
  if "multi_granularity" in opts.protocols:
    rng = image_rng(opts.seed, ex.image_id)
    n = len(ex.masks)
    prompts = np.arange(n) if n <= opts.mg_max_clicks else rng.choice(
        n, opts.mg_max_clicks, replace=False)
    targets = [level_targets(ex.masks, pts[k], num_tokens, rng) for k in prompts]
    used = np.unique(np.concatenate(targets))
    remap = {int(m): i for i, m in enumerate(used)}
    p.mg_prompts = prompts
    p.mg_targets = [np.asarray([remap[int(t)] for t in ts], np.int32) for ts in targets]
    p.mg_masks_used = used
  return p


def assemble(items: list[Prepared], batch_size: int, opts: EvalOptions, num_tokens: int) -> dict:
  """Stacks prepared images of one padded size into a padded batch."""
  hp, wp = items[0].padded_hw
  bsz = batch_size
  batch = {"image": np.zeros((bsz, hp, wp, 3), np.uint8),
           "image_hw": np.tile(np.asarray([[hp, wp]], np.int32), (bsz, 1))}
  for i, it in enumerate(items):
    h, w = it.ex.image.shape[:2]
    batch["image"][i, :h, :w] = it.ex.image
    batch["image_hw"][i] = (h, w)
  if "coco_interactive" in opts.protocols:
    n = bucket(max(len(it.ex.masks) for it in items), opts.prompt_buckets)
    batch["boxes"] = np.full((bsz, n, 4), 0.5, np.float32)
    batch["prompt_valid"] = np.zeros((bsz, n), bool)
    batch["gt_masks"] = np.zeros((bsz, n, hp, wp), bool)
    for i, it in enumerate(items):
      k, (h, w) = len(it.ex.masks), it.ex.image.shape[:2]
      batch["boxes"][i, :k] = it.boxes
      batch["prompt_valid"][i, :k] = True
      batch["gt_masks"][i, :k, :h, :w] = it.ex.masks
  if "multi_granularity" in opts.protocols:
    k_b = bucket(max(len(it.mg_prompts) for it in items), opts.prompt_buckets)
    m_b = bucket(max(len(it.mg_masks_used) for it in items), opts.prompt_buckets)
    batch["mg_boxes"] = np.full((bsz, k_b, 4), 0.5, np.float32)
    batch["mg_valid"] = np.zeros((bsz, k_b), bool)
    batch["mg_masks"] = np.zeros((bsz, m_b, hp, wp), bool)
    batch["mg_mask_boxes"] = np.tile(np.asarray([0.5, 0.5, 0.1, 0.1], np.float32),
                                     (bsz, m_b, 1))
    batch["mg_target_index"] = np.zeros((bsz, k_b, num_tokens), np.int32)
    batch["mg_target_valid"] = np.zeros((bsz, k_b, num_tokens), bool)
    for i, it in enumerate(items):
      h, w = it.ex.image.shape[:2]
      used = it.ex.masks[it.mg_masks_used]
      batch["mg_masks"][i, :len(used), :h, :w] = used
      batch["mg_mask_boxes"][i, :len(used)] = mask_boxes_cxcywh(used, (hp, wp))
      batch["mg_boxes"][i, :len(it.mg_prompts)] = it.boxes[it.mg_prompts]
      batch["mg_valid"][i, :len(it.mg_prompts)] = True
      for k, ts in enumerate(it.mg_targets):
        batch["mg_target_index"][i, k, :len(ts)] = ts
        batch["mg_target_valid"][i, k, :len(ts)] = True
  return batch


class Evaluator:
  """Runs the protocols over a stream of :class:`EvalImage`.

  With several devices the image batch is sharded over a 1-D data mesh (the
  batch size is rounded up to a multiple of the device count) and the
  parameters are replicated.  In a multi-process job each process runs its
  own Evaluator on its local devices (the default) over its share of the
  images; :attr:`results` (one JSON-able record per image) of all processes
  merged by :func:`metrics_of` give the numbers of one process.
  """

  def __init__(self, config, params, opts: EvalOptions = EvalOptions(), devices=None):
    self.config = ss.freeze_config(config)
    self.opts = opts
    self.num_tokens = int(self.config.decoder.num_mask_tokens)
    devices = list(jax.local_devices() if devices is None else devices)
    if any(d.process_index != jax.process_index() for d in devices):
      raise ValueError("an Evaluator runs on this process's devices only")
    self.num_devices = len(devices)
    self.batch_size = -(-opts.batch_size // self.num_devices) * self.num_devices
    self.mesh = None
    if self.num_devices > 1:
      from jax.sharding import NamedSharding, PartitionSpec as P
      from semsam_jax.sharding import make_mesh
      self.mesh = make_mesh({"data": self.num_devices}, devices)
      self._data = NamedSharding(self.mesh, P("data"))
      params = jax.device_put(params, NamedSharding(self.mesh, P()))
    self.params = params
    self.score = scoring.make_score_fn(
        self.config, interactive="coco_interactive" in opts.protocols,
        granularity="multi_granularity" in opts.protocols, prompt_chunk=opts.prompt_chunk,
        weights=opts.weights)
    # Running numbers for the progress bar (in batch order); the reported
    # numbers come from ``results`` in dataset order (metrics_of).
    self.interactive = metrics_lib.InteractiveAccumulator()
    self.granularity = metrics_lib.GranularityAccumulator()
    self.results: list[dict] = []
    self.num_images = 0

  def _run(self, items: list[Prepared]) -> None:
    batch = assemble(items, self.batch_size, self.opts, self.num_tokens)
    if self.mesh is not None:
      batch = jax.device_put(batch, self._data)
    out = jax.device_get(self.score(self.params, batch))
    for i, it in enumerate(items):
      ex = it.ex
      rec = {"position": int(ex.position), "seq": len(self.results), "image_id": ex.image_id}
      if "coco_interactive" in self.opts.protocols:
        n = len(ex.masks)
        iou_max, iou_oracle = metrics_lib.select_max_oracle(out["ious"][i, :n],
                                                            out["pred_ious"][i, :n])
        self.interactive.add(ex.image_id, ex.ann_ids, iou_max, iou_oracle, ex.areas, it.clicks)
        rec.update(ann_ids=[str(a) for a in ex.ann_ids], iou_max=iou_max.tolist(),
                   iou_oracle=iou_oracle.tolist(), areas=np.asarray(ex.areas).tolist(),
                   clicks=np.asarray(it.clicks).astype(int).tolist())
      if "multi_granularity" in self.opts.protocols:
        ious, areas = [], []
        for k, ts in enumerate(it.mg_targets):
          ious.extend(out["mg_ious"][i, k, :len(ts)].tolist())
          areas.extend(ex.areas[it.mg_masks_used[ts]].tolist())
        self.granularity.add(ious, areas, len(it.mg_targets))
        rec.update(mg_ious=[float(v) for v in ious], mg_areas=[float(v) for v in areas],
                   mg_clicks=len(it.mg_targets))
      self.results.append(rec)
    self.num_images += len(items)

  def running(self) -> dict[str, str]:
    r = {}
    for k, v in self.interactive.running().items():
      r[k] = f"{v:.3f}"
    for k, v in self.granularity.running().items():
      r["mg_" + k] = f"{v:.3f}"
    return r

  def evaluate(self, images: Iterable[EvalImage], total: Optional[int] = None) -> dict:
    from tqdm.auto import tqdm
    pending: dict[tuple[int, int], list[Prepared]] = {}
    divisibility = int(self.config.size_divisibility)
    with tqdm(total=total, unit="img", disable=not self.opts.progress, desc="evaluating") as bar:
      def flush(key):
        items = pending.pop(key)
        self._run(items)
        bar.update(len(items))
        bar.set_postfix(self.running(), refresh=False)

      for ex in images:
        p = prepare(ex, self.opts, self.num_tokens, divisibility)
        pending.setdefault(p.padded_hw, []).append(p)
        if len(pending[p.padded_hw]) == self.batch_size:
          flush(p.padded_hw)
      for key in list(pending):
        flush(key)
    return self.metrics()

  def metrics(self) -> dict:
    return metrics_of(self.results, self.opts.protocols)[0]


def sorted_results(results: Iterable[dict], num_images: Optional[int] = None) -> list[dict]:
  """Per-image results (of one or several processes) in dataset order, cut to
  the first ``num_images``."""
  out = sorted(results, key=lambda r: (r["position"], r["seq"]))
  return out if num_images is None else out[:num_images]


def metrics_of(results: Iterable[dict], protocols) -> tuple[dict, list[dict]]:
  """(metrics, per-instance records) of per-image results, accumulated in
  dataset order (so the float32 sums do not depend on batching or sharding)."""
  results = sorted_results(results)
  interactive = metrics_lib.InteractiveAccumulator()
  granularity = metrics_lib.GranularityAccumulator()
  for r in results:
    if "coco_interactive" in protocols:
      interactive.add(r["image_id"], r["ann_ids"], r["iou_max"], r["iou_oracle"], r["areas"],
                      r["clicks"])
    if "multi_granularity" in protocols:
      granularity.add(r["mg_ious"], r["mg_areas"], r["mg_clicks"])
  out = {"num_images": len(results)}
  if "coco_interactive" in protocols:
    out.update(interactive.metrics())
  if "multi_granularity" in protocols:
    out.update(granularity.metrics())
  return out, interactive.records


# --------------------------------------------------------------------------
# Reporting

def format_table(metrics: dict) -> str:
  """A Markdown table of the main numbers (4 decimals)."""
  def f(v, d=4):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"

  lines = []
  if "coco_interactive.miou_max" in metrics:
    lines += ["| COCO interactive | instances | 1-IoU Max | 1-IoU Oracle | NoC@0.5 Max | "
              "NoC@0.8 Max | NoC@0.85 Max | NoC@0.9 Max | NoC@0.85 Oracle | NoC@0.9 Oracle |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for scope in ("", ".small", ".medium", ".large"):
      p = "coco_interactive" + scope
      lines.append(
          f"| {scope[1:] or 'all'} | {metrics[p + '.num_instances']} | "
          f"{f(metrics[p + '.miou_max'])} | {f(metrics[p + '.miou_oracle'])} | "
          + " | ".join(f(metrics[f"{p}.noc@{t}_max"], 2) for t in metrics_lib.NOC_THRESHOLDS)
          + f" | {f(metrics[p + '.noc@0.85_oracle'], 2)} | {f(metrics[p + '.noc@0.9_oracle'], 2)} |")
  if "multi_granularity.miou" in metrics:
    if lines:
      lines.append("")
    lines += ["| multi-granularity | clicks | pairs | mIoU |", "|---|---|---|---|"]
    lines.append(f"| all | {metrics['multi_granularity.num_clicks']} | "
                 f"{metrics['multi_granularity.num_pairs']} | "
                 f"{f(metrics['multi_granularity.miou'])} |")
    for r in metrics_lib.AREA_RANGES:
      p = f"multi_granularity.{r}"
      lines.append(f"| {r} | | {metrics[p + '.num_pairs']} | {f(metrics[p + '.miou'])} |")
  return "\n".join(lines)
