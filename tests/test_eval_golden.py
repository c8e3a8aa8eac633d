"""Golden parity of the COCO interactive protocol with the original
(``evaluate_interactive`` + ``JointBoxPointInteractiveEvaluator``) on every
``eval_*`` folder of the golden data (ids like ``eval_a/img0``)."""

from __future__ import annotations

import functools
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from semsam_jax.convert import convert_checkpoint
from semsam_jax.evaluation import clicks, metrics, scoring
from semsam_jax.models import semantic_sam as ss
from tests import golden


def _eval_cases():
  d = golden.golden_dir()
  if not d.is_dir():
    return []
  return sorted(f for e in sorted(d.glob("eval_*")) if e.is_dir() for f in e.glob("img*.npz"))


def _eval_dirs():
  d = golden.golden_dir()
  return sorted(e for e in d.glob("eval_*") if e.is_dir()) if d.is_dir() else []


def _missing(what):
  msg = f"golden evaluation data not found: {what} (set SEMSAM_GOLDEN_DIR)"
  if os.environ.get("CI"):
    pytest.fail(msg)
  pytest.skip(msg)


CASES = _eval_cases() or [None]
DIRS = _eval_dirs() or [None]


@functools.lru_cache(maxsize=None)
def _model(eval_dir: str):
  meta = json.loads((pathlib.Path(eval_dir) / "meta.json").read_text())
  m = (pathlib.Path(eval_dir) / meta["model_dir"]).resolve()
  return convert_checkpoint(m / "model.pth", reference_config=m / "config.yaml")


@pytest.mark.parametrize("case", CASES, ids=golden.param_ids([c for c in CASES if c]))
def test_interactive_golden(case):
  if case is None:
    _missing(f"{golden.golden_dir()}/eval_*/img*.npz")
  z = golden.load_npz(case)
  meta = json.loads((case.parent / "meta.json").read_text())["images"][case.stem]
  config, params = _model(str(case.parent))
  order = z["prompt_index"]
  gt = z["gt_masks"][order]                      # the recorded random prompt order
  np.testing.assert_array_equal(gt, z["eval_gt_masks"])
  h, w = z["image_u8"].shape[:2]
  hp, wp = ss.padded_size(h, w, config.size_divisibility)
  # Clicks: the distance maps bit for bit, the clicks exactly.
  for j in range(len(gt)):
    np.testing.assert_array_equal(clicks.kornia_distance_transform(gt[j]),
                                  z["distance_transform"][j])
  xy = clicks.center_clicks(gt)
  np.testing.assert_array_equal(xy, z["click_xy"])
  np.testing.assert_array_equal(xy, np.asarray(meta["click_xy"]))
  boxes = clicks.click_boxes(xy, (h, w), (hp, wp))
  np.testing.assert_array_equal(boxes, z["decoder_points"])
  assert (z["pb"] == 0).all()

  n = len(gt)
  canvas = np.zeros((1, hp, wp, 3), np.uint8)
  canvas[0, :h, :w] = z["image_u8"]
  gt_pad = np.zeros((1, n, hp, wp), bool)
  gt_pad[0, :, :h, :w] = gt
  fn = scoring.make_score_fn(config, return_raw=True)
  with jax.default_matmul_precision("highest"):
    out = jax.device_get(fn(params, {
        "image": canvas, "image_hw": np.asarray([[h, w]], np.int32), "boxes": boxes[None],
        "prompt_valid": np.ones((1, n), bool), "gt_masks": gt_pad}))
  t = config.decoder.num_mask_tokens
  np.testing.assert_allclose(out["reference_boxes"][0].reshape(n * t, 4),
                             z["decoder_refpoint"][0], atol=1e-6)
  pm = out["pred_masks"][0].reshape((n * t,) + out["pred_masks"].shape[-2:])
  assert golden.rel_l2(pm, z["pred_masks"][0]) <= 1e-5
  assert golden.rel_l2(out["pred_ious"][0], z["pred_ious"][0]) <= 1e-5
  # Post-processing: upsample, crop, (identity) bicubic resize == final_masks.
  final = np.asarray(scoring._upsample(z["pred_masks"][0], (hp, wp)))[:, :h, :w]
  assert golden.rel_l2(final, z["final_masks"]) <= 1e-6
  iou_max, iou_oracle = metrics.select_max_oracle(out["ious"][0], out["pred_ious"][0])
  np.testing.assert_array_equal(np.argmax(out["pred_ious"][0], -1), z["max_token"])
  np.testing.assert_allclose(iou_max, z["iou_max"], atol=1e-5)
  np.testing.assert_allclose(iou_oracle, z["iou_oracle"], atol=1e-5)
  np.testing.assert_allclose(iou_max, meta["iou_max"], atol=1e-5)
  np.testing.assert_allclose(iou_oracle, meta["iou_oracle"], atol=1e-5)


@pytest.mark.parametrize("eval_dir", DIRS, ids=[d.name for d in DIRS if d])
def test_aggregation_golden(eval_dir):
  """The evaluator's numbers from the recorded per-instance IoUs."""
  if eval_dir is None:
    _missing(f"{golden.golden_dir()}/eval_*")
  meta = json.loads((eval_dir / "meta.json").read_text())
  for sel, key in (("iou_max", "results_max"), ("iou_oracle", "results_oracle")):
    ious = np.concatenate([np.float32(v[sel]) for v in meta["images"].values()])
    s = metrics.summarize(ious)
    ref = meta[key]
    for t in metrics.NOC_THRESHOLDS:
      assert s[f"noc@{t}"] == pytest.approx(ref[str(t)], abs=1e-12)
    assert s["miou@iter1"] == pytest.approx(ref["iou_max_iter"], abs=1e-7)
