"""Fuzzed SA-1B inputs (random bytes, wrong sizes, empty masks, boxes outside the image,
huge mask counts): the build never crashes, every input is either built or reported as
skipped exactly once, what is built reads back equal to its source, nothing is half-written."""

import json
import os
import random

import numpy as np
from pycocotools import mask as mask_utils

from semsam_jax.data import __main__ as cli
from semsam_jax.data import synthetic
from tests.test_data_build import _check_against_source, _leftovers, _source


def _fuzz(d, rng):
  """Damages the pairs of ``d`` in place; returns {stem: kind}."""
  stems = sorted(os.path.splitext(n)[0] for n in os.listdir(d) if n.endswith(".json"))
  kinds = ["json_random_bytes", "jpg_random_bytes", "json_cut", "wrong_size", "empty_mask",
           "box_outside", "huge_mask_count", "counts_wrong_type", "negative_size",
           "annotations_not_list", "image_empty_file", "none"]
  done = {}
  for stem, kind in zip(stems, kinds):
    js, jpg = d / f"{stem}.json", d / f"{stem}.jpg"
    rec = json.loads(js.read_text())
    a0 = rec["annotations"][0]
    h, w = rec["image"]["height"], rec["image"]["width"]
    if kind == "json_random_bytes":
      js.write_bytes(bytes(rng.getrandbits(8) for _ in range(300)))
    elif kind == "jpg_random_bytes":
      jpg.write_bytes(bytes(rng.getrandbits(8) for _ in range(500)))
    elif kind == "json_cut":
      js.write_text(js.read_text()[: rng.randrange(1, 60)])
    elif kind == "wrong_size":
      a0["segmentation"]["size"] = [h * 2, w + 3]
    elif kind == "empty_mask":
      empty = mask_utils.encode(np.zeros((h, w, 1), np.uint8, order="F"))[0]
      a0["segmentation"]["counts"] = empty["counts"].decode()  # only background
      a0["area"] = 0
    elif kind == "box_outside":
      a0["bbox"] = [w * 3.0, -h * 2.0, w * 10.0, h * 5.0]
    elif kind == "huge_mask_count":
      rec["annotations"] = [dict(a0, id=int(a0["id"]) * 10000 + i) for i in range(3000)]
    elif kind == "counts_wrong_type":
      a0["segmentation"]["counts"] = [1, 2, 3]
    elif kind == "negative_size":
      a0["segmentation"]["size"] = [-h, w]
    elif kind == "annotations_not_list":
      rec["annotations"] = {"oops": 1}
    elif kind == "image_empty_file":
      jpg.write_bytes(b"")
    if kind not in ("json_random_bytes", "json_cut"):
      js.write_text(json.dumps(rec))
    done[stem] = kind
  return done


def test_fuzzed_sources_never_crash_and_nothing_is_lost(tmp_path, capsys):
  src = tmp_path / "src"
  synthetic.generate(str(src), 12, seed=5, image_size=32, objects_per_image=(1, 2),
                     progress=False)
  kinds = _fuzz(src, random.Random(1234))
  out = tmp_path / "data"
  rc = cli.main(["build-sa1b", str(src), "--output", str(out), "--workers", "2",
                 "--no-progress"])
  cap = capsys.readouterr()
  assert rc == 0, cap.err
  skipped = {}
  for line in cap.err.splitlines():
    if line.startswith("skip "):
      path = line[len("skip "):].split(": ", 1)[0]
      stem = os.path.splitext(os.path.basename(path))[0]
      assert stem not in skipped, (stem, cap.err)
      skipped[stem] = line
  b, ds = _source(out)
  built = []
  for i in range(len(ds)):
    ex = ds[i]
    stem = os.path.splitext(ex["image"]["file_name"].decode()
                            if isinstance(ex["image"]["file_name"], bytes)
                            else ex["image"]["file_name"])[0]
    if kinds.get(stem) == "box_outside":
      # Kept, with the box clipped to the image (normalised y0, x0, y1, x1 in [0, 1]).
      np.testing.assert_array_equal(np.asarray(ex["annotations"]["bbox"])[0], [0, 1, 1, 1])
      built.append(stem)
    else:
      built.append(_check_against_source(ex, src))
  # Every input accounted for exactly once.
  assert sorted(built + list(skipped)) == sorted(kinds), (built, skipped)
  assert not set(built) & set(skipped)
  # Undecodable or inconsistent inputs are skipped with a reason; the untouched one is built.
  for stem, kind in kinds.items():
    if kind in ("json_random_bytes", "jpg_random_bytes", "json_cut", "wrong_size",
                "counts_wrong_type", "negative_size", "annotations_not_list",
                "image_empty_file"):
      assert stem in skipped, (kind, cap.err)
  assert any(kinds[s] == "none" for s in built)
  assert f"built {len(built)} examples, skipped {len(skipped)} " in cap.out
  assert _leftovers(out) == []
  print({kinds[s]: "built" for s in built} | {kinds[s]: v for s, v in skipped.items()})
