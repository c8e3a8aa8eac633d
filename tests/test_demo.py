"""The demo's own logic (its stages are the project's CLIs, tested elsewhere):
the clicks it chooses and the loss summary it reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from semsam_jax import demo


def test_clicks_land_in_a_part_and_in_its_whole():
  masks = np.zeros((4, 40, 40), bool)
  masks[0, 5:35, 5:35] = True          # object
  masks[1, 5:35, 5:15] = True          # a part of it (left strip)
  masks[2, 8:11, 8:11] = True          # a sub-part of the part: the smallest mask
  masks[3, 0:4, 30:40] = True          # an unrelated mask
  clicks = demo.pick_clicks(masks)
  (k0, x0, y0), (k1, x1, y1) = clicks
  assert (k0, k1) == ("part", "object")
  assert masks[2][y0, x0] and (x0, y0) == (9, 9)        # the sub-part's centre
  assert masks[0][y1, x1] and not masks[2][y1, x1]      # in the whole, outside the part
  # A lone mask gives one click; no mask is an error.
  assert len(demo.pick_clicks(masks[3:4])) == 1
  with pytest.raises(demo.DemoError):
    demo.pick_clicks(np.zeros((2, 8, 8), bool))


def test_loss_stats(tmp_path):
  rows = [{"step": s, "loss": 30.0 / (1 + s / 50), "finite": True} for s in range(0, 500, 10)]
  rows.insert(3, {"step": 25, "loss": float("nan"), "finite": False})   # a skipped step
  f = tmp_path / "metrics.jsonl"
  f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  stats = demo.loss_stats(f)
  finite = [r["loss"] for r in rows if r["finite"]]
  assert stats["logged_points"] == 50
  assert stats["first_steps_mean_loss"] == pytest.approx(np.mean(finite[:5]))
  assert stats["last_steps_mean_loss"] == pytest.approx(np.mean(finite[-5:]))
  f.write_text(json.dumps({"step": 1, "loss": float("nan"), "finite": False}) + "\n")
  with pytest.raises(demo.DemoError):
    demo.loss_stats(f)
