"""The command line end to end on the converted tiny golden model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from semsam_jax.inference import postprocess as pp
from tests import golden


@pytest.fixture(scope="module")
def tiny_files():
  dirs = golden.model_dirs()
  if not dirs:
    golden.require_golden()
    pytest.fail("no tiny_* model folder")
  return dirs[0] / "model.pth", dirs[0] / "config.yaml"


def _run(*args):
  r = subprocess.run([sys.executable, "-m", "semsam_jax", *map(str, args)],
                     capture_output=True, text=True, timeout=600)
  return r


def test_predict_and_auto(tmp_path, tiny_files):
  pth, yaml = tiny_files
  img = np.random.default_rng(0).integers(0, 255, (70, 90, 3), np.uint8)
  Image.fromarray(img).save(tmp_path / "im.png")
  ckpt = tmp_path / "ckpt"
  r = subprocess.run([sys.executable, "-m", "semsam_jax.convert", "--torch-checkpoint", pth,
                      "--reference-config", yaml, "--output", ckpt],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  r = _run("predict", "--image", tmp_path / "im.png", "--checkpoint", ckpt,
           "--points", "10,20;50,40", "--boxes", "5,5,60,50", "--levels", "1", "3", "6",
           "--output-dir", tmp_path / "pred")
  assert r.returncode == 0, r.stderr
  rep = json.loads((tmp_path / "pred" / "predictions.json").read_text())
  assert [list(p)[0] for p in rep["prompts"]] == ["point", "point", "box"]
  assert [m["level"] for m in rep["prompts"][0]["masks"]] == [1, 3, 6]
  assert [m["token"] for m in rep["prompts"][0]["masks"]] == [3, 0, 5]
  for i in range(3):
    for kind in ("by_iou", "by_area"):
      im = Image.open(tmp_path / "pred" / f"prompt{i}_{kind}.png")
      assert im.height == 70 and im.width % 90 == 0

  r = _run("auto", "--image", tmp_path / "im.png", "--torch-checkpoint", pth,
           "--reference-config", yaml, "--points-per-side", "4", "--points-per-batch", "8",
           "--pred-iou-thresh", "-100", "--stability-score-thresh", "0",
           "--levels", "2", "--output-dir", tmp_path / "auto")
  assert r.returncode == 0, r.stderr
  out = json.loads((tmp_path / "auto" / "masks.json").read_text())
  assert out["annotations"], "no masks generated"
  for a in out["annotations"]:
    assert a["level"] == 2
    assert pp.decode_rle(a["segmentation"]).sum() == a["area"]
  assert Image.open(tmp_path / "auto" / "masks.png").size == (90, 70)


def test_errors_are_reported(tmp_path, tiny_files):
  pth, yaml = tiny_files
  r = _run("predict", "--image", tmp_path / "missing.png", "--torch-checkpoint", pth,
           "--reference-config", yaml, "--points", "1,1", "--output-dir", tmp_path)
  assert r.returncode != 0 and "image not found" in r.stderr
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "im.png")
  r = _run("predict", "--image", tmp_path / "im.png", "--torch-checkpoint", pth,
           "--reference-config", yaml, "--points", "30,1", "--output-dir", tmp_path / "o")
  assert r.returncode == 1 and "outside" in r.stderr and "Traceback" not in r.stderr
  r = _run("predict", "--image", tmp_path / "im.png", "--torch-checkpoint", pth,
           "--reference-config", yaml, "--points", "1,1", "--levels", "7",
           "--output-dir", tmp_path / "o")
  assert r.returncode == 1 and "levels are 1..6" in r.stderr
