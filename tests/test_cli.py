"""The command line end to end on the converted tiny golden model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from semsam_jax.__main__ import main as cli_main
from semsam_jax.__main__ import resize_short_side
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
  return subprocess.run([sys.executable, "-m", "semsam_jax", *map(str, args)],
                        capture_output=True, text=True, timeout=600)


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
           "--short-side", "0", "--iou-thresh", "0", "--output-dir", tmp_path / "pred")
  assert r.returncode == 0, r.stderr
  rep = json.loads((tmp_path / "pred" / "predictions.json").read_text())
  assert rep["processed_size"] == [70, 90] and rep["levels"] == [1, 3, 6]
  assert rep["tokens"] == [3, 0, 5] and rep["independent_prompts"] is False
  assert [list(p)[0] for p in rep["prompts"]] == ["point", "point", "box"]
  assert rep["prompts"][0]["point"] == [10.0, 20.0]
  assert rep["prompts"][2]["box"] == pytest.approx([5.0, 5.0, 60.0, 50.0])
  for p in rep["prompts"]:
    assert [m["level"] for m in p["masks"]] == [1, 3, 6]
    assert [m["token"] for m in p["masks"]] == [3, 0, 5]
    for m in p["masks"]:
      assert 0 <= m["area"] <= 70 * 90 and len(m["box_xyxy"]) == 4
      assert isinstance(m["predicted_iou"], float) and isinstance(m["kept"], bool)
    # iou-thresh 0: every mask is kept unless it duplicates a better one.
    assert sorted(p["kept_by_iou"]) == sorted(p["kept_by_area"])
    assert set(p["kept_by_iou"]) == {m["level"] for m in p["masks"] if m["kept"]}
    ious = {m["level"]: m["predicted_iou"] for m in p["masks"]}
    assert [ious[l] for l in p["kept_by_iou"]] == sorted(ious[l] for l in p["kept_by_iou"])[::-1]
  for i, p in enumerate(rep["prompts"]):
    k = len(p["kept_by_iou"])
    for kind in ("by_iou", "by_area"):
      im = Image.open(tmp_path / "pred" / f"prompt{i}_{kind}.png")
      assert im.size == (90 * k + 4 * (k - 1), 70)

  r = _run("auto", "--image", tmp_path / "im.png", "--torch-checkpoint", pth,
           "--reference-config", yaml, "--points-per-side", "4", "--points-per-batch", "8",
           "--pred-iou-thresh", "-100", "--stability-score-thresh", "0", "--short-side", "35",
           "--levels", "2", "--output-dir", tmp_path / "auto")
  assert r.returncode == 0, r.stderr
  out = json.loads((tmp_path / "auto" / "masks.json").read_text())
  assert out["processed_size"] == [35, 45] and out["input_size"] == [70, 90]
  assert out["annotations"], "no masks generated"
  for a in out["annotations"]:
    assert a["level"] == 2 and a["crop_box"] == [0.0, 0.0, 45.0, 35.0]
    assert a["segmentation"]["size"] == [35, 45]
    assert pp.decode_rle(a["segmentation"]).sum() == a["area"]
    assert set(a) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords",
                      "stability_score", "crop_box", "level"}
  assert Image.open(tmp_path / "auto" / "masks.png").size == (45, 35)


def test_errors_are_reported(tmp_path, tiny_files, capsys):
  """Clear messages and exit status 1, no traceback (run in-process for speed)."""
  pth, yaml = tiny_files
  model = ["--torch-checkpoint", str(pth), "--reference-config", str(yaml)]

  def run(*args):
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    return code, capsys.readouterr().err

  code, err = run("predict", "--image", tmp_path / "missing.png", *model, "--points", "1,1",
                  "--output-dir", tmp_path)
  assert code == 1 and "image not found" in err
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "im.png")
  code, err = run("predict", "--image", tmp_path / "im.png", *model, "--points", "30,1",
                  "--output-dir", tmp_path / "o")
  assert code == 1 and "outside the 20x20 image" in err
  code, err = run("predict", "--image", tmp_path / "im.png", *model, "--boxes", "1,1,30,5",
                  "--output-dir", tmp_path / "o")
  assert code == 1 and "outside the 20x20 image" in err
  code, err = run("predict", "--image", tmp_path / "im.png", *model, "--points", "1,1",
                  "--levels", "7", "--output-dir", tmp_path / "o")
  assert code == 1 and "levels are 1..6" in err
  code, err = run("predict", "--image", tmp_path / "im.png", *model, "--points", "1;2",
                  "--output-dir", tmp_path / "o")
  assert code == 1 and "groups of 2" in err
  code, err = run("predict", "--image", tmp_path / "im.png", *model, "--output-dir", tmp_path)
  assert code == 1 and "--points and/or --boxes" in err
  code, err = run("predict", "--image", tmp_path / "im.png", "--checkpoint", tmp_path / "nope",
                  "--points", "1,1", "--output-dir", tmp_path / "o")
  assert code == 1 and "checkpoint directory not found" in err
  code, err = run("predict", "--image", tmp_path / "im.png", "--points", "1,1",
                  "--output-dir", tmp_path / "o")
  assert code == 1 and "--checkpoint" in err
  code, err = run("predict", "--image", tmp_path / "im.png", *model, "--points", "1,1",
                  "--size-buckets", "big", "--output-dir", tmp_path / "o")
  assert code == 1 and "--size-buckets" in err
  # A relative point outside [0, 1] is caught by the predictor (after loading).
  code, err = run("predict", "--image", tmp_path / "im.png", *model, "--points", "0.5,1.5",
                  "--coords", "relative", "--short-side", "0", "--output-dir", tmp_path / "o")
  assert code == 1 and "outside" in err
  code, err = run("auto", "--image", tmp_path / "im.png", *model, "--levels", "0",
                  "--output-dir", tmp_path / "o")
  assert code == 1 and "levels are 1..6" in err
  with pytest.raises(SystemExit) as e:
    cli_main(["frobnicate"])
  assert e.value.code == 2
  r = _run("predict", "--image", tmp_path / "missing.png", "--points", "1,1",
           "--output-dir", tmp_path / "o")
  assert r.returncode == 1 and "image not found" in r.stderr and "Traceback" not in r.stderr


def test_resize_short_side_matches_torchvision_rule():
  img = np.zeros((70, 90, 3), np.uint8)
  assert resize_short_side(img, 0) is img
  assert resize_short_side(img, 35).shape == (35, 45, 3)
  assert resize_short_side(img, 640).shape == (640, 822, 3)     # int(640 * 90 / 70)
  assert resize_short_side(np.zeros((90, 70, 3), np.uint8), 640).shape == (822, 640, 3)
