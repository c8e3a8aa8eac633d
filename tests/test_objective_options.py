"""Options of the objective beyond the reference defaults: native vs XLA point
reads inside the whole objective, the jax.random point draws, bf16 compute with
a float32 loss, the detached IoU target, pb without the quirk and box prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsam_jax.kernels import native
from semsam_jax.losses import criterion as crit
from semsam_jax.losses import make_loss_fn
from semsam_jax.losses import prompts as prompts_lib
from semsam_jax.losses.config import loss_config
from tests.test_objective import micro_config, synthetic_image


@pytest.fixture(scope="module")
def setup():
  from semsam_jax.models import semantic_sam as ss
  config = micro_config()
  params = ss.init_params(config.model, jax.random.PRNGKey(0))
  batch = jax.tree.map(lambda *xs: np.concatenate(xs, 0), synthetic_image(1, 4, 2),
                       synthetic_image(2, 3, 0))
  return config, params, batch


def _value_and_grad(config, params, batch):
  f = jax.jit(jax.value_and_grad(make_loss_fn(config), has_aux=True))
  with jax.default_matmul_precision("highest"):
    (loss, metrics), grads = f(params, batch, jax.random.PRNGKey(3))
  return float(loss), metrics, grads


def _rel(a, b):
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_native_and_xla_point_reads_give_the_same_step(setup):
  config, params, batch = setup
  out = {}
  for impl in ("native", "xla"):
    c = config.copy_and_resolve_references()
    c.loss.point_impl = impl
    out[impl] = _value_and_grad(c, params, batch)
  assert out["native"][0] == out["xla"][0]          # forward reads are bit-identical
  assert _rel(out["native"][2], out["xla"][2]) < 1e-5  # backward: addition order only


def test_point_draws_jax_and_hash_are_different_samples_of_one_loss(setup):
  config, params, batch = setup
  c = config.copy_and_resolve_references()
  c.loss.point_draws = "jax"
  lj, mj, _ = _value_and_grad(c, params, batch)
  lh, mh, _ = _value_and_grad(config, params, batch)
  assert np.isfinite(lj) and np.isfinite(lh) and lj != lh
  # Point-sampled terms differ by sampling noise only; box terms not at all.
  assert abs(lj - lh) < 0.1 * lh
  for name in ("loss_bbox_0", "loss_giou_0"):
    assert float(mj[name]) == pytest.approx(float(mh[name]), rel=1e-6)


def test_bfloat16_compute_keeps_a_float32_loss_and_gradients(setup):
  config, params, batch = setup
  c = config.copy_and_resolve_references()
  c.model.dtype = "bfloat16"
  l16, m16, g16 = _value_and_grad(c, params, batch)
  l32, _, g32 = _value_and_grad(config, params, batch)
  assert np.isfinite(l16) and abs(l16 - l32) < 0.05 * l32, (l16, l32)
  assert all(v.dtype == jnp.float32 for v in m16.values())
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  # The gradients themselves are not compared: on a random-init model bf16
  # rounding flips near-tie matchings and top-k points, which moves them a lot.
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(g16))
  del g32


def test_detached_iou_target_removes_the_iou_terms_mask_gradient():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 50)).astype(np.float32))
  t = jnp.asarray((rng.random((3, 50)) > 0.5).astype(np.float32))
  iou = jnp.asarray([0.2, 0.5, 0.9], jnp.float32)

  def grad_of_iou_term(detach):
    return jax.grad(lambda x, i: crit.mask_terms(x, t, i, detach)["iou_score_loss"].sum(),
                    argnums=(0, 1))(x, iou)

  gx_d, gi_d = grad_of_iou_term(True)
  gx, gi = grad_of_iou_term(False)
  assert not np.any(np.asarray(gx_d)) and np.any(np.asarray(gx))
  # d/d iou of (iou - (1 - dice))^2 = 2 (iou - 1 + dice), either way.
  dice = np.asarray(crit.dice_loss(x, t))
  np.testing.assert_allclose(gi_d, 2 * (np.asarray(iou) - 1 + dice), rtol=1e-5)
  np.testing.assert_allclose(gi, gi_d, rtol=1e-6)


@pytest.mark.parametrize("mode", ["none", "all", "reference_split"])
@pytest.mark.parametrize("quirk", [True, False])
def test_prompt_modes_and_pb(mode, quirk):
  batch = synthetic_image(5, 4)
  cfg = loss_config()
  cfg.pb_quirk = quirk
  is_box = np.asarray(prompts_lib.box_prompt_flags(jax.random.PRNGKey(1), batch, mode))
  k = batch["prompt_valid"].shape[1]
  if mode == "none":
    assert not is_box.any()
  elif mode == "all":
    assert is_box.all()
  else:   # a suffix of the prompts, starting in [(K-1)//2, K-1]
    start = int(np.argmax(is_box[0])) if is_box[0].any() else k
    assert (k - 1) // 2 <= start <= k - 1 and is_box[0, start:].all() and not is_box[0, :start].any()
  boxes, pb = prompts_lib.prompt_boxes(batch, jnp.asarray(is_box), cfg)
  boxes, pb = np.asarray(boxes), np.asarray(pb)
  h, w = batch["image_size"][0]
  for i in range(k):
    if is_box[0, i]:
      x0, y0, x1, y1 = batch["mask_boxes"][0, batch["prompt_mask"][0, i]]
    else:
      cx, cy = batch["click_xy"][0, i]
      x0, y0, x1, y1 = cx - 3, cy - 3, cx + 3, cy + 3
    want = [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]
    np.testing.assert_allclose(boxes[0, i], want, rtol=1e-6)
    # Reference training: clicks pb = 1, boxes 0; without the quirk as at inference.
    assert pb[0, i] == (int(not is_box[0, i]) if quirk else int(is_box[0, i]))
