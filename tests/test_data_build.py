"""SA-1B builder: damaged inputs are reported and skipped, the dataset read back
through plain TFDS holds exactly the good images with bit-exact masks, nothing
partial is left on failure, several sources / splits, resume and extend."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils

from semsam_jax.data import __main__ as cli
from semsam_jax.data import builder as B
from semsam_jax.data import sa1b, synthetic

GOOD = [f"sa_{i}" for i in (1, 2, 3, 4)]
# stem -> (file reported, words of the reason)
DAMAGED = {
    "sa_5": ("sa_5.jpg", "unreadable or truncated image"),
    "sa_6": ("sa_6.json", "JSON does not parse"),
    "sa_7": ("sa_7.json", "RLE does not decode"),   # invalid characters
    "sa_8": ("sa_8.json", "RLE does not decode"),   # valid characters, too few pixels
    "sa_9": ("sa_9.json", "RLE size [33, 32] != image size [32, 32]"),
    "sa_10": ("sa_10.jpg", "image without JSON"),
    "sa_11": ("sa_11.json", "JSON without image"),
}


def _edit_json(path, fn):
  with open(path) as f:
    rec = json.load(f)
  fn(rec)
  with open(path, "w") as f:
    json.dump(rec, f)


def _damaged_source(d):
  synthetic.generate(str(d), 11, seed=3, image_size=32, objects_per_image=(1, 2),
                     progress=False)
  jpg = d / "sa_5.jpg"
  data = jpg.read_bytes()
  jpg.write_bytes(data[: len(data) // 2])
  (d / "sa_6.json").write_text('{"image": {"image_id": 6, "width": 32, "height": 32}, "annot')

  def seg(k, **kw):
    def fn(rec):
      rec["annotations"][k]["segmentation"].update(kw)
    return fn

  _edit_json(d / "sa_7.json", seg(1, counts="!!~~ not an RLE"))
  _edit_json(d / "sa_8.json", seg(0, counts="31"))   # 3 + 1 pixels of 32 * 32
  _edit_json(d / "sa_9.json", seg(0, size=[33, 32]))
  os.remove(d / "sa_10.json")
  os.remove(d / "sa_11.jpg")
  return d


def _leftovers(root):
  bad = []
  for dirpath, dirnames, filenames in os.walk(root):
    for n in dirnames + filenames:
      if any(t in n for t in (".tmp-", ".assemble-", ".old-", "incomplete")):
        bad.append(os.path.join(dirpath, n))
  return bad


def _source(data_dir, split="train"):
  b = tfds.builder_from_directory(os.path.join(str(data_dir), B.BUILDER_NAME, B.VERSION))
  return b, b.as_data_source(split)


def _check_against_source(ex, src_dir):
  """One example read back through TFDS equals its sa_N.jpg + sa_N.json."""
  name = ex["image"]["file_name"]
  name = name.decode() if isinstance(name, bytes) else name
  stem = os.path.splitext(name)[0]
  with open(os.path.join(src_dir, stem + ".json")) as f:
    rec = json.load(f)
  with open(os.path.join(src_dir, stem + ".jpg"), "rb") as f:
    jpg = f.read()
  img = ex["image"]["content"]
  # TFDS decodes the image by default; compare with PIL's decode of the source.
  from PIL import Image
  import io
  np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")))
  h, w = rec["image"]["height"], rec["image"]["width"]
  assert (int(ex["image"]["height"]), int(ex["image"]["width"])) == (h, w)
  assert int(ex["image"]["image_id"]) == rec["image"]["image_id"]
  anns = ex["annotations"]
  src = rec["annotations"]
  assert len(anns["id"]) == len(src)
  got = mask_utils.decode([{"size": [h, w], "counts": c} for c in anns["segmentation"]["counts"]])
  want = mask_utils.decode([{"size": [h, w], "counts": a["segmentation"]["counts"].encode()}
                            for a in src])
  assert got.dtype == want.dtype and got.shape == want.shape
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(anns["segmentation"]["size"]), [[h, w]] * len(src))
  np.testing.assert_array_equal(anns["id"], [a["id"] for a in src])
  np.testing.assert_array_equal(anns["area"], [a["area"] for a in src])
  x, y, bw, bh = np.asarray([a["bbox"] for a in src], np.float32).T
  np.testing.assert_allclose(anns["bbox"], np.stack([y / h, x / w, (y + bh) / h, (x + bw) / w], -1),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(anns["point_coords"], np.float64).reshape(-1, 2),
                             [a["point_coords"][0] for a in src], atol=1e-6)
  np.testing.assert_allclose(anns["predicted_iou"], [a["predicted_iou"] for a in src], rtol=1e-6)
  return stem


def test_damaged_inputs_are_reported_and_skipped(tmp_path, capsys):
  src = _damaged_source(tmp_path / "src")
  out = tmp_path / "data"
  rc = cli.main(["build-sa1b", str(src), "--output", str(out), "--workers", "2",
                 "--no-progress"])
  cap = capsys.readouterr()
  assert rc == 0, cap.err
  # Each damaged file is named with its reason, and nothing else is skipped.
  skips = [l for l in cap.err.splitlines() if l.startswith("skip ")]
  assert len(skips) == len(DAMAGED), cap.err
  for stem, (fname, reason) in DAMAGED.items():
    hits = [l for l in skips if l.startswith(f"skip {src / fname}: ")]
    assert len(hits) == 1 and reason in hits[0], (stem, skips)
  assert f"train: built {len(GOOD)} examples, skipped {len(DAMAGED)} " in cap.out
  b, ds = _source(out)
  assert list(b.info.splits) == ["train"]
  assert len(ds) == len(GOOD) == b.info.splits["train"].num_examples
  assert sorted(_check_against_source(ds[i], src) for i in range(len(ds))) == sorted(GOOD)
  assert _leftovers(out) == []


def test_failure_leaves_nothing_partial(tmp_path, monkeypatch):
  src = tmp_path / "src"
  synthetic.generate(str(src), 3, seed=0, image_size=32, objects_per_image=(1, 1), progress=False)
  out = tmp_path / "data"
  sa1b.build([str(src)], str(out), progress=False, log=lambda m: None)
  info = (out / B.BUILDER_NAME / B.VERSION / "dataset_info.json").read_bytes()
  src2 = tmp_path / "src2"
  synthetic.generate(str(src2), 3, seed=1, image_size=32, objects_per_image=(1, 1),
                     image_id_offset=100, progress=False)
  real = sa1b.load_pair
  calls = []

  def failing(item):
    calls.append(item)
    if len(calls) == 2:
      raise OSError("disk went away")
    return real(item)

  monkeypatch.setattr(sa1b, "load_pair", failing)
  with pytest.raises(OSError, match="disk went away"):
    sa1b.build([str(src2)], str(out), progress=False, log=lambda m: None)
  # A failure on the very first file is a failure too, not an "empty source".
  calls.clear()
  calls.append(None)
  with pytest.raises(OSError, match="disk went away"):
    sa1b.build([str(src2)], str(out), progress=False, log=lambda m: None)
  assert _leftovers(out) == []
  assert len(os.listdir(out / ".parts" / "train")) == 1   # only the finished part
  assert (out / B.BUILDER_NAME / B.VERSION / "dataset_info.json").read_bytes() == info
  assert len(_source(out)[1]) == 3
  # Once the cause is gone, the same command finishes the build (and removes
  # what a killed earlier build of that source left behind).
  stale = out / ".parts" / "train" / (B.part_key(str(src2), "train", "sa1b") + ".tmp-99999")
  (stale / "x").mkdir(parents=True)
  monkeypatch.setattr(sa1b, "load_pair", real)
  r = sa1b.build([str(src), str(src2)], str(out), progress=False, log=lambda m: None)
  assert (r.built, r.parts_built, r.parts_reused) == (6, 1, 1)
  assert not stale.exists() and _leftovers(out) == []


def test_multi_source_resume_extend_and_splits(tmp_path):
  srcs = []
  for k in range(3):
    d = tmp_path / f"src{k}"
    synthetic.generate(str(d), 2 + k, seed=10 + k, image_size=32, objects_per_image=(1, 2),
                       image_id_offset=100 * k, progress=False)
    srcs.append(d)
  (srcs[1] / "sa_999.jpg").write_bytes(b"not a jpeg")   # a skipped file in a reused part
  (srcs[1] / "sa_999.json").write_text("{}")
  out = tmp_path / "data"
  logs = []
  r = sa1b.build([str(srcs[0]), str(srcs[1])], str(out), progress=False, log=logs.append)
  assert (r.built, len(r.skipped), r.parts_built, r.parts_reused) == (5, 1, 2, 0)
  b, ds = _source(out)
  assert len(b.info.splits["train"].filenames) == 2          # one shard set per source
  assert sorted(_check_against_source(ds[i], srcs[0] if int(ds[i]["image"]["image_id"]) < 100
                                      else srcs[1]) for i in range(len(ds))) == sorted(
      ["sa_1", "sa_2", "sa_101", "sa_102", "sa_103"])
  # Resume: nothing is rebuilt; the skipped file is still reported.
  parts = sorted((out / ".parts" / "train").iterdir())
  mtimes = [os.stat(p / "part.json").st_mtime_ns for p in parts]
  logs.clear()
  r = sa1b.build([str(srcs[0]), str(srcs[1])], str(out), progress=False, log=logs.append)
  assert (r.built, len(r.skipped), r.parts_built, r.parts_reused) == (5, 1, 0, 2)
  assert [os.stat(p / "part.json").st_mtime_ns for p in parts] == mtimes
  assert any("sa_999.jpg" in l and "reported when the part was built" in l for l in logs)
  # Extend with a third source; a held-out split next to it.
  r = sa1b.build([str(s) for s in srcs], str(out), progress=False, log=lambda m: None)
  assert (r.built, r.parts_built, r.parts_reused) == (9, 1, 2)
  h = tmp_path / "heldout"
  synthetic.generate(str(h), 2, seed=99, image_size=32, objects_per_image=(1, 1),
                     image_id_offset=1000, progress=False)
  sa1b.build([str(h)], str(out), split="heldout", progress=False, log=lambda m: None)
  b, ds = _source(out)
  assert sorted(b.info.splits) == ["heldout", "train"]
  assert b.info.splits["train"].num_examples == 9 and len(ds) == 9
  ids = sorted(int(ds[i]["image"]["image_id"]) for i in range(len(ds)))
  assert ids == [1, 2, 101, 102, 103, 201, 202, 203, 204]
  held = b.as_data_source("heldout")
  assert sorted(int(held[i]["image"]["image_id"]) for i in range(len(held))) == [1001, 1002]
  for i in range(len(held)):
    _check_against_source(held[i], h)
  assert _leftovers(out) == []


def test_source_with_only_damaged_files(tmp_path):
  d = tmp_path / "bad"
  d.mkdir()
  (d / "sa_1.jpg").write_bytes(b"\xff\xd8\xff garbage")
  (d / "sa_1.json").write_text("{}")
  out = tmp_path / "data"
  with pytest.raises(ValueError, match="nothing was built"):
    sa1b.build([str(d)], str(out), progress=False, log=lambda m: None)
  assert not (out / B.BUILDER_NAME / B.VERSION).exists()
  assert _leftovers(out) == []


def test_default_synthetic_dataset(tmp_path):
  from semsam_jax.data import data_config, ensure_dataset
  d = data_config()
  d.synthetic.update(dict(cache_dir=str(tmp_path), num_train_images=3, num_heldout_images=2,
                          image_size=32))
  out = ensure_dataset(d, progress=False)
  assert os.path.dirname(out) == str(tmp_path) and os.path.exists(os.path.join(out, "COMPLETE"))
  b = tfds.builder_from_directory(os.path.join(out, B.BUILDER_NAME, B.VERSION))
  assert {s: b.info.splits[s].num_examples for s in b.info.splits} == {"train": 3, "heldout": 2}
  train, held = b.as_data_source("train"), b.as_data_source("heldout")
  ids = {int(train[i]["image"]["image_id"]) for i in range(3)}
  assert ids.isdisjoint(int(held[i]["image"]["image_id"]) for i in range(2))
  # The held-out split comes from its own seed, not a copy of train images.
  assert not np.array_equal(train[0]["image"]["content"], held[0]["image"]["content"])
  mtime = os.stat(os.path.join(out, "COMPLETE")).st_mtime_ns
  assert ensure_dataset(d, progress=False) == out                       # reused
  assert os.stat(os.path.join(out, "COMPLETE")).st_mtime_ns == mtime
  assert _leftovers(str(tmp_path)) == []
  d.data_dir = "/somewhere"
  assert ensure_dataset(d) == "/somewhere"


def test_cli_errors(tmp_path, capsys):
  assert cli.main(["build-sa1b", str(tmp_path / "nope"), "--output", str(tmp_path / "d")]) == 1
  assert "not a folder" in capsys.readouterr().err
