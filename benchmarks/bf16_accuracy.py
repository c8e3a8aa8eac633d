"""Accuracy cost of bfloat16 compute (``config.dtype = "bfloat16"``) against float32.

    python benchmarks/bf16_accuracy.py [--golden DIR] [--size 1024] [--clicks 64]
                                       [--skip-full] [--max-cases N]

Two measurements, each printed as a table:

1. The golden tiny model (``$SEMSAM_GOLDEN_DIR`` or ``../shared/golden``):
   every case through ``forward_fn``, in float32 and in bfloat16, against the
   original PyTorch outputs (``final_masks``, ``final_ious``).
2. The full SwinT architecture (random parameters, a random 1024² image,
   ``--clicks`` clicks decoded together): bfloat16 against float32.

Columns: relative L2 error of the mask logits, the share of pixels whose mask
(logit > 0) differs, the mean IoU between the bfloat16 and the reference
binary masks, and the largest absolute error of the predicted IoU scores.
Parameters stay float32 (``param_dtype``); activations and matrix products
run in bfloat16, normalisation statistics, softmax and deformable sampling
in float32.  The golden model has random weights too: these numbers measure
numerical drift, not a change in segmentation quality of a trained model.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from semsam_jax.config import model_config  # noqa: E402
from semsam_jax.models import semantic_sam as ss  # noqa: E402

HEADERS = ["model / case", "compute", "mask logits rel. L2", "pixels flipped %",
           "mean mask IoU", "max |IoU score err|"]


def compare(masks, ref_masks, ious, ref_ious) -> list:
  m = np.asarray(masks, np.float64).reshape(-1, *np.shape(ref_masks)[-2:])
  r = np.asarray(ref_masks, np.float64).reshape(m.shape)
  rel = float(np.linalg.norm(m - r) / max(np.linalg.norm(r), 1e-30))
  a, b = m > 0, r > 0
  flipped = float(np.mean(a != b) * 100)
  inter = (a & b).sum((-1, -2))
  union = (a | b).sum((-1, -2))
  iou = float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))
  err = float(np.max(np.abs(np.asarray(ious, np.float64).reshape(-1)
                            - np.asarray(ref_ious, np.float64).reshape(-1))))
  return [rel, flipped, iou, err]


def golden_rows(golden: pathlib.Path, rows: list, max_cases: int | None = None) -> None:
  from semsam_jax.convert import convert_checkpoint
  for model_dir in sorted(p for p in golden.glob("tiny_*") if p.is_dir()):
    config, params = convert_checkpoint(model_dir / "model.pth",
                                        reference_config=model_dir / "config.yaml")
    for case in sorted(model_dir.glob("case_*.npz"))[:max_cases]:
      data = np.load(case)
      levels = tuple(int(l) for l in data["levels"])
      for dtype in ("float32", "bfloat16"):
        cfg = config.copy_and_resolve_references()
        cfg.dtype = dtype
        fwd = ss.forward_fn(cfg, tokens=levels, return_aux=False)
        with jax.default_matmul_precision("highest"):
          out = fwd(params, jnp.asarray(data["image_u8"]), jnp.asarray(data["points"]),
                    bool(data["prompt_is_box"]))
        h, w = data["image_u8"].shape[:2]
        masks = np.asarray(out["masks"], np.float32).reshape(-1, h, w)
        rows.append([f"{model_dir.name}/{case.stem} vs PyTorch", dtype,
                     *compare(masks, data["final_masks"], out["ious"], data["final_ious"])])


def full_rows(size: int, clicks: int, rows: list) -> None:
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  points = rng.uniform(0.05, 0.95, (clicks, 2)).astype(np.float32)
  base = model_config("swin_t")
  params = ss.init_params(base, jax.random.PRNGKey(0))
  outs = {}
  for dtype in ("float32", "bfloat16"):
    cfg = base.copy_and_resolve_references()
    cfg.dtype = dtype
    fwd = ss.forward_fn(cfg, return_aux=False)
    out = fwd(params, jnp.asarray(image), jnp.asarray(points), False)
    outs[dtype] = (np.asarray(out["pred_masks"], np.float32), np.asarray(out["ious"]))
  rows.append([f"swin_t random, {size}², {clicks} clicks vs float32", "bfloat16",
               *compare(outs["bfloat16"][0], outs["float32"][0], outs["bfloat16"][1],
                        outs["float32"][1])])


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  here = pathlib.Path(__file__).resolve().parents[1]
  ap.add_argument("--golden", default=os.environ.get(
      "SEMSAM_GOLDEN_DIR", str(here.parent / "shared" / "golden")))
  ap.add_argument("--size", type=int, default=1024)
  ap.add_argument("--clicks", type=int, default=64)
  ap.add_argument("--skip-full", action="store_true", help="only the golden model")
  ap.add_argument("--max-cases", type=int, default=None, help="golden cases per model")
  args = ap.parse_args()
  print(common.machine_line())
  rows: list = []
  golden = pathlib.Path(args.golden)
  if golden.is_dir():
    golden_rows(golden, rows, args.max_cases)
  else:
    print(f"golden folder {golden} not found: skipping the golden rows")
  if not args.skip_full:
    full_rows(args.size, args.clicks, rows)
  common.print_table(HEADERS, rows)


if __name__ == "__main__":
  main()
