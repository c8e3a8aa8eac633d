"""eval.py end to end in a subprocess: a tiny synthetic dataset built by
semsam_jax.data, the golden tiny_a model converted on the fly from its .pth.

Checks the files it writes against each other and against the dataset
(every instance evaluated once, its click inside its own mask, the reported
means equal to the per-instance IoUs), and that user errors are one line on
stderr with exit status 1 and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.golden import REPO_ROOT, model_dirs, require_golden


def _run(args, tmp_path, timeout=900):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, str(REPO_ROOT / "eval.py"), *args], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
  from semsam_jax.data import sa1b, synthetic
  root = tmp_path_factory.mktemp("evaldata")
  src = root / "src"
  synthetic.generate(str(src), 2, seed=7, image_size=64, objects_per_image=(2, 3),
                     progress=False)
  sa1b.build([str(src)], str(root / "data"), split="heldout", progress=False,
             log=lambda m: None)
  return root / "data"


@pytest.fixture(scope="module")
def tiny_model():
  require_golden()
  dirs = model_dirs()
  assert dirs, "no tiny_* model folder in the golden data"
  return dirs[0]


def test_eval_py_end_to_end(tiny_dataset, tiny_model, tmp_path):
  from semsam_jax.data import read_split
  out = tmp_path / "out"
  res = _run(["--torch-checkpoint", str(tiny_model / "model.pth"),
              "--reference-config", str(tiny_model / "config.yaml"),
              "--dataset", str(tiny_dataset), "--output", str(out), "--no-progress"], tmp_path)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  report = json.loads((out / "metrics.json").read_text())
  table = (out / "metrics.md").read_text()
  records = json.loads((out / "instances.json").read_text())
  m = report["metrics"]
  assert report["dataset"]["split"] == "heldout"      # the synthetic held-out split by default

  # Every non-empty mask of the split is one evaluated instance, clicked inside itself.
  split = read_split(str(tiny_dataset), "heldout")
  masks = {str(split[i]["image_id"]): split[i]["masks"] for i in range(len(split))}
  expected = sum(int((mk.reshape(len(mk), -1).any(1)).sum()) for mk in masks.values())
  assert m["coco_interactive.num_instances"] == expected == len(records) > 0
  for r in records:
    x, y = r["click_xy"]
    assert masks[r["image_id"]][int(r["ann_id"])][y, x], r
    assert 0.0 <= r["iou_max"] <= r["iou_oracle"] <= 1.0

  # The reported means are the per-instance numbers' means (float32 sums, as the original).
  iou_max = np.array([r["iou_max"] for r in records], np.float32)
  iou_oracle = np.array([r["iou_oracle"] for r in records], np.float32)
  np.testing.assert_allclose(m["coco_interactive.miou_max"], iou_max.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["coco_interactive.miou_oracle"], iou_oracle.mean(), rtol=1e-6)
  assert 0.0 <= m["multi_granularity.miou"] <= 1.0 and m["multi_granularity.num_pairs"] > 0

  # The table shows the same numbers, and stdout printed it.
  assert f"{m['coco_interactive.miou_max']:.4f}"[:5] in table or \
      f"{m['coco_interactive.miou_max']:.3f}" in table
  assert table.strip().splitlines()[0] in res.stdout


def test_eval_py_user_errors(tiny_dataset, tiny_model, tmp_path):
  out = tmp_path / "out"
  base = ["--torch-checkpoint", str(tiny_model / "model.pth"),
          "--reference-config", str(tiny_model / "config.yaml"), "--no-progress"]
  cases = [
      (["--dataset", str(tiny_dataset), "--split", "nosuchsplit"], "nosuchsplit"),
      (["--dataset", str(tmp_path / "missing")], "missing"),
      (["--dataset", str(tiny_dataset), "--num-images", "0"], "--num-images"),
  ]
  for extra, needle in cases:
    res = _run(base + extra + ["--output", str(out)], tmp_path)
    assert res.returncode == 1, (extra, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert lines and needle in lines[0], res.stderr[-2000:]
    assert not out.exists()
