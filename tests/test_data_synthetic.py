"""The synthetic generator: deterministic in the seed, SA-1B layout, nested
masks (a pixel lies in several levels), through the CLI."""

import json
import os

import numpy as np
from pycocotools import mask as mask_utils

from semsam_jax.data import __main__ as cli


def _files(d):
  return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def test_synth_cli_deterministic_and_nested(tmp_path, capsys):
  a, b, c = (str(tmp_path / n) for n in "abc")
  for out, seed in ((a, 3), (b, 3), (c, 4)):
    assert cli.main(["synth", "--num-images", "3", "--seed", str(seed), "--output", out,
                     "--image-size", "48", "64", "--no-progress"]) == 0
  assert "wrote 3 images" in capsys.readouterr().out
  fa, fb, fc = _files(a), _files(b), _files(c)
  assert sorted(fa) == [f"sa_{i}.{e}" for i in (1, 2, 3) for e in ("jpg", "json")]
  assert fa == fb and fa != fc
  depths, cover = [], []
  for i in (1, 2, 3):
    rec = json.loads(fa[f"sa_{i}.json"])
    assert rec["image"] == {"image_id": i, "width": 64, "height": 48, "file_name": f"sa_{i}.jpg"}
    anns = rec["annotations"]
    masks = mask_utils.decode([{"size": a_["segmentation"]["size"],
                                "counts": a_["segmentation"]["counts"].encode()} for a_ in anns])
    masks = np.moveaxis(masks, -1, 0).astype(bool)
    for a_, m in zip(anns, masks):
      ys, xs = np.nonzero(m)
      assert a_["area"] == m.sum() >= 4
      assert a_["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
      x, y = a_["point_coords"][0]
      assert m[int(y), int(x)]
    cover.append(masks.any(0).mean())
    # Clicks as training draws them (a random pixel of a random mask): the
    # number of masks containing each.
    depth = masks.sum(0)
    rng = np.random.default_rng(i)
    for m in masks:
      ys, xs = np.nonzero(m)
      j = rng.integers(len(ys), size=20)
      depths.append(depth[ys[j], xs[j]])
  assert min(cover) > 0.99                 # (almost) every pixel is annotated
  d = np.concatenate(depths)
  assert d.max() >= 4 and (d >= 2).mean() > 0.5 and (d >= 3).mean() > 0.1
