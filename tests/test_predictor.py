"""Interactive predictor: golden end-to-end parity, embedding reuse, no
recompilation within a size bucket, input validation."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from semsam_jax.inference import predictor as pr
from tests import golden

CASES = golden.cases_or_missing("case_*.npz")


@functools.lru_cache(maxsize=None)
def _predictor(model_dir: str) -> pr.SemanticSAMPredictor:
  import pathlib
  d = pathlib.Path(model_dir)
  return pr.SemanticSAMPredictor.from_torch(d / "model.pth", d / "config.yaml")


@pytest.mark.parametrize("path", CASES, ids=golden.param_ids([c for c in CASES if c]))
def test_predict_matches_reference_final_outputs(path):
  data = golden.load_npz(path)
  p = _predictor(str(path.parent))
  with jax.default_matmul_precision("highest"):
    p.set_image(data["image_u8"])
    kw = {"boxes" if bool(data["prompt_is_box"]) else "points": data["points"]}
    res = p.predict(tokens=data["levels"], coords="relative", **kw)
  h, w = data["image_u8"].shape[:2]
  n = len(data["points"])
  assert res.logits.shape == (n, len(data["levels"]), h, w)
  err = golden.rel_l2(res.logits.reshape(data["final_masks"].shape), data["final_masks"])
  assert err <= 1e-5, err
  assert golden.rel_l2(res.ious[None], data["final_ious"]) <= 1e-5
  np.testing.assert_array_equal(res.masks, res.logits > 0)
  # Boxes are pixel XYXY inside a sane range.
  assert np.all(res.boxes[..., 2] >= res.boxes[..., 0])


@pytest.fixture(scope="module")
def tiny_predictor():
  dirs = golden.model_dirs()
  if not dirs:
    golden.require_golden()
    pytest.fail("no tiny_* model folder")
  return _predictor(str(dirs[0]))


def test_pixel_and_relative_coords_agree(tiny_predictor):
  p = tiny_predictor
  img = np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8)
  p.set_image(img)
  a = p.predict(points=[[30.0, 40.0]], coords="pixels")
  b = p.predict(points=[[30.0 / 90, 40.0 / 60]], coords="relative")
  np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
  # A pixel box x0,y0,x1,y1 equals the relative cx,cy,w,h box.
  c = p.predict(boxes=[[15, 20, 75, 60]], coords="pixels")
  d = p.predict(boxes=[[45 / 90, 40 / 60, 60 / 90, 40 / 60]], coords="relative")
  np.testing.assert_allclose(c.logits, d.logits, rtol=1e-5, atol=1e-5)


class CompileCounter:
  """Counts XLA backend compilations (jitted functions and eager ops alike)."""

  def __init__(self):
    self.count = 0

  def _listener(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def test_embedding_is_reused_and_nothing_recompiles(tiny_predictor):
  p = tiny_predictor
  rng = np.random.default_rng(1)
  p.set_image(rng.integers(0, 255, (200, 290, 3), np.uint8))  # pads to 224 x 320
  assert p.padded_image_size == (224, 320)
  p.predict(points=[[10, 10]])
  p.predict(points=[[10, 10], [50, 60]])
  p.predict(boxes=[[10, 10, 50, 60]], tokens=[5, 1, 0, 2, 3, 4])
  calls = p.embedding_calls
  with CompileCounter() as cc:
    for i in range(5):
      p.predict(points=rng.uniform(0, 190, (1 + i % 2, 2)))
    assert p.embedding_calls == calls, "predict must not recompute the image embedding"
    # Another image of a different size in the same padded bucket: no new compile.
    p.set_image(rng.integers(0, 255, (210, 300, 3), np.uint8))
    p.predict(points=[[5, 5]])
    p.predict(points=[[5, 5], [100, 100], [7, 9]], boxes=[[0, 0, 40, 30]])
    # Another selection of the same number of tokens: same compiled decoder.
    p.predict(points=[[5, 5]], tokens=[0, 1, 2, 3, 4, 5])
  assert p.embedding_calls == calls + 1
  assert cc.count == 0, f"{cc.count} compilation(s) in steady state"


def test_size_buckets_share_compilation_and_differ_slightly(tiny_predictor):
  config, params = tiny_predictor.config, tiny_predictor.params
  p = pr.SemanticSAMPredictor(config, params, size_buckets=(128, 256))
  rng = np.random.default_rng(2)
  img = rng.integers(0, 255, (60, 90, 3), np.uint8)
  p.set_image(img)
  assert p.padded_image_size == (128, 128)
  bucketed = p.predict(points=[[40, 30]])
  with CompileCounter() as cc:
    p.set_image(rng.integers(0, 255, (120, 100, 3), np.uint8))
    res = p.predict(points=[[1, 1]])
  assert cc.count == 0
  assert res.logits.shape == (1, 6, 120, 100)
  # Padding beyond the multiple of 32 is not bit-exact (docs/differences.md).
  exact = tiny_predictor
  exact.set_image(img)
  assert exact.padded_image_size == (64, 96)
  ref = exact.predict(points=[[40, 30]])
  assert np.isfinite(bucketed.logits).all() and bucketed.logits.shape == ref.logits.shape
  assert golden.rel_l2(bucketed.logits, ref.logits) > 1e-6
  # Above the last bucket: falls back to the multiple of 32.
  assert p.padded_size(300, 40) == (320, 128)
  with pytest.raises(ValueError, match="multiples of 32"):
    pr.SemanticSAMPredictor(config, params, size_buckets=(100,))


def test_prompt_buckets(tiny_predictor):
  # That padding slots do not change the results is checked in
  # test_automatic.py (6-slot batches equal predict() in 8-slot buckets).
  p = tiny_predictor
  assert p.prompt_bucket(1) == 1 and p.prompt_bucket(2) == 8 and p.prompt_bucket(9) == 32
  assert p.prompt_bucket(128) == 128 and p.prompt_bucket(300) == 384
  with pytest.raises(ValueError, match="positive"):
    pr.SemanticSAMPredictor(p.config, p.params, prompt_buckets=(0, 4))


def test_independent_prompts_equal_single_prompt_calls(tiny_predictor):
  config, params = tiny_predictor.config, tiny_predictor.params
  p = pr.SemanticSAMPredictor(config, params, independent_prompts=True)
  img = np.random.default_rng(3).integers(0, 255, (64, 96, 3), np.uint8)
  p.set_image(img)
  both = p.predict(points=[[20, 20], [70, 60]])
  one = p.predict(points=[[70, 60]])
  np.testing.assert_allclose(both.logits[1], one.logits[0], rtol=1e-4, atol=1e-4)
  shared = tiny_predictor
  shared.set_image(img)
  joint = shared.predict(points=[[20, 20], [70, 60]])
  assert not np.allclose(joint.logits[1], one.logits[0], atol=1e-4)


def test_image_conversion_and_errors():
  g = np.zeros((5, 6), np.uint8)
  assert pr.to_rgb_uint8(g).shape == (5, 6, 3)
  rgba = np.zeros((5, 6, 4), np.uint8)
  rgba[..., 3] = 9
  assert pr.to_rgb_uint8(rgba).shape == (5, 6, 3)
  with pytest.raises(ValueError, match="uint8"):
    pr.to_rgb_uint8(np.zeros((5, 6, 3), np.float32))
  with pytest.raises(ValueError, match="shape"):
    pr.to_rgb_uint8(np.zeros((5, 6, 2), np.uint8))
  with pytest.raises(ValueError, match="empty"):
    pr.to_rgb_uint8(np.zeros((0, 6, 3), np.uint8))
  with pytest.raises(ValueError, match="levels are 1..6"):
    pr.user_levels_to_tokens([7])
  with pytest.raises(ValueError, match="tokens are 0..5"):
    pr.levels_to_tokens([6])
  assert pr.user_levels_to_tokens([1, 2, 3, 4, 5, 6]) == (3, 2, 0, 4, 1, 5)


def test_prompt_errors(tiny_predictor):
  p = tiny_predictor
  p.set_image(np.zeros((50, 80, 3), np.uint8))
  with pytest.raises(ValueError, match="outside"):
    p.predict(points=[[80, 10]])
  with pytest.raises(ValueError, match="outside"):
    p.predict(points=[[0.5, 1.5]], coords="relative")
  with pytest.raises(ValueError, match="outside"):
    p.predict(boxes=[[10, 10, 90, 40]])
  with pytest.raises(ValueError, match="at least one"):
    p.predict()
  with pytest.raises(ValueError, match="granularity level"):
    p.predict(points=[[1, 1]], levels=[0, 9])
  with pytest.raises(ValueError, match="granularity token"):
    p.predict(points=[[1, 1]], tokens=[0, 9])
  with pytest.raises(ValueError, match="empty"):
    p.predict(boxes=[[10, 10, 10, 40]])
  with pytest.raises(ValueError, match="shape"):
    p.predict(points=[[1, 2, 3]])
  with pytest.raises(ValueError, match="coords"):
    p.predict(points=[[1, 1]], coords="percent")
  with pytest.raises(ValueError, match="uint8"):
    p.set_image(np.zeros((5, 5, 3), np.float64))
  fresh = pr.SemanticSAMPredictor(p.config, p.params)
  with pytest.raises(RuntimeError, match="set_image"):
    fresh.predict(points=[[1, 1]])


def test_levels_and_tokens_keywords(tiny_predictor):
  """levels= takes the user levels 1..6 (as the CLI and the generator),
  tokens= the decoder tokens 0..5; each rejects the other's range clearly."""
  from semsam_jax.models import semantic_sam as ss
  p = tiny_predictor
  p.set_image(np.random.default_rng(4).integers(0, 255, (40, 50, 3), np.uint8))
  by_token = p.predict(points=[[20, 10]], tokens=[3, 5, 0])   # levels 1, 6, 3
  by_level = p.predict(points=[[20, 10]], levels=[1, 6, 3])
  np.testing.assert_array_equal(by_level.logits, by_token.logits)
  assert by_level.levels == by_token.levels == (1, 6, 3)
  assert by_level.tokens == by_token.tokens == (3, 5, 0)
  default = p.predict(points=[[20, 10]])
  assert default.levels == (1, 2, 3, 4, 5, 6) and default.tokens == (3, 2, 0, 4, 1, 5)
  np.testing.assert_array_equal(default.logits[:, [0, 5, 2]], by_level.logits)
  with pytest.raises(ValueError, match="levels are 1..6.*tokens="):
    p.predict(points=[[20, 10]], levels=[0, 1])
  with pytest.raises(ValueError, match="tokens are 0..5.*levels="):
    p.predict(points=[[20, 10]], tokens=[6])
  with pytest.raises(ValueError, match="not both"):
    p.predict(points=[[20, 10]], levels=[1], tokens=[3])
  with pytest.raises(ValueError, match="levels are 1..6"):
    p.predict(points=[[20, 10]], levels=[2.5])
  with pytest.raises(ValueError, match="tokens are 0..5"):
    p.decode_points(np.full((1, 2), 0.5), tokens=(7,))
  # The jitted forward function takes the same two keywords (checked before tracing).
  with pytest.raises(ValueError, match="levels are 1..6"):
    ss.forward_fn(p.config, levels=[0])
  with pytest.raises(ValueError, match="not both"):
    ss.forward_fn(p.config, levels=[1], tokens=[3])
