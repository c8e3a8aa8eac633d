"""Properties of the training objective beyond the single recorded step
(tests/test_objective_golden.py anchors that one):

* the exact block matcher equals ``scipy.optimize.linear_sum_assignment`` on
  the reference's full (Q x N) problem (1e6 between prompts), with padded
  target slots and padding prompts;
* the batch rule: the gradient of a batch is ``sum_i N_i g_i / sum_i N_i`` of
  the single-image gradients ``g_i`` (``N_i`` level targets), on one device
  with two images and with eight images sharded over 8 CPU devices;
* no recompilation across steps whose images have different numbers of
  prompts / level targets (static shapes);
* research variants: another point sampler, matcher or loss-term function
  passed to ``make_objective``.

The model is the golden ``tiny_a`` one (first discovered ``train_*`` case);
the images are that case's image and mirrored / re-prompted variants of it.
"""

from __future__ import annotations

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.sharding import NamedSharding, PartitionSpec

from semsam_jax.losses import criterion as crit
from semsam_jax.losses import make_loss_fn, make_objective, matcher, replay
from semsam_jax.sharding import make_mesh
from tests import golden
from tests.test_objective_golden import _model, train_case_files

# --------------------------------------------------------------------- matcher


def _scipy_tokens(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """The reference's way: one assignment over all queries and the valid
  targets of an image, 1e6 between a query and another prompt's target.
  Returns the token (query within its prompt) of every valid slot, -1 else."""
  k, tq, tt = cost.shape
  prompt, slot = np.nonzero(valid)
  full = np.full((k * tq, prompt.shape[0]), 1e6)
  for n, (i, j) in enumerate(zip(prompt, slot)):
    full[i * tq:(i + 1) * tq, n] = cost[i, :, j]
  rows, cols = scipy.optimize.linear_sum_assignment(full)
  out = np.full((k, tt), -1)
  out[prompt[cols], slot[cols]] = rows - prompt[cols] * tq
  assert np.all(rows // tq == prompt[cols])   # never a cross-prompt pair
  return out


@pytest.mark.parametrize("tq,tt", [(6, 6), (6, 4), (3, 3)])
def test_block_matcher_equals_linear_sum_assignment(tq, tt):
  rng = np.random.default_rng(tq * 10 + tt)
  b, k = 4, 9
  cost = rng.normal(size=(b, k, tq, tt)).astype(np.float32) * rng.uniform(0.1, 10)
  valid = rng.uniform(size=(b, k, tt)) < 0.6
  valid[:, 0] = True                    # a full prompt
  valid[:, 1] = False                   # a padding prompt
  valid[0] = False                      # an image without targets
  valid[1, 2, :] = [True] + [False] * (tt - 1)
  token = np.asarray(jax.jit(matcher.solve_blocks)(jnp.asarray(cost), jnp.asarray(valid)))
  for i in range(b):
    # every block's tokens are distinct (padding slots take the leftovers)
    assert all(len(set(row)) == tt for row in token[i])
    if not valid[i].any():
      continue
    want = _scipy_tokens(cost[i].astype(np.float64), valid[i])
    np.testing.assert_array_equal(np.where(valid[i], token[i], -1), want, err_msg=f"image {i}")


def test_match_with_invalid_targets_equals_linear_sum_assignment():
  """The whole default matcher (costs from points and boxes) on random inputs;
  invalid slots carry garbage (huge logits, degenerate boxes) that must not
  change the assignment of the valid ones."""
  rng = np.random.default_rng(0)
  b, k, t, p = 2, 5, 6, 64
  logits = rng.normal(size=(b, k, t, p)).astype(np.float32) * 3
  labels = (rng.uniform(size=(b, k, t, p)) < 0.4).astype(np.float32)
  pboxes = rng.uniform(0.2, 0.8, size=(b, k, t, 4)).astype(np.float32)
  tboxes = rng.uniform(0.2, 0.8, size=(b, k, t, 4)).astype(np.float32)
  valid = rng.uniform(size=(b, k, t)) < 0.5
  valid[:, :, 0] = True
  labels = np.where(valid[..., None], labels, 1e4)
  tboxes = np.where(valid[..., None], tboxes, 0.0)
  from semsam_jax.losses.config import loss_config
  cfg = loss_config()
  out = jax.jit(lambda *a: matcher.match(*a, cfg))(logits, labels, pboxes, tboxes, valid)
  total = np.asarray(out["costs"]["total"], np.float64)
  token = np.asarray(out["token"])
  for i in range(b):
    want = _scipy_tokens(total[i], valid[i])
    np.testing.assert_array_equal(np.where(valid[i], token[i], -1), want)


# --------------------------------------------------------------------- setup
# A micro model (random init; Swin depths (1, 1, 2, 1) so that drop-path is
# active, 2 decoder layers; GroupNorm with 2 channels per group as in tiny_a --
# with 1, a per-channel constant cancels and leaves pure rounding noise as the
# gradient of the norms before it) on synthetic 64 x 64 images keeps the
# compiles of the batch tests short; the golden test anchors the real model.

S, K, M, P = 64, 4, 5, 128


def micro_config():
  from semsam_jax.config import model_config
  from semsam_jax.losses.config import loss_config
  m = model_config("swin_t")
  m.backbone.update(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
  m.pixel_decoder.update(conv_dim=64, mask_dim=32, dim_feedforward=64, num_encoder_layers=1,
                         num_heads=4)
  m.decoder.update(hidden_dim=32, mask_dim=32, dim_feedforward=64, num_layers=2, num_heads=4,
                   dim_proj=32)
  loss = loss_config()
  loss.train_num_points = P
  return ml_collections.ConfigDict({"model": m, "loss": loss})


def synthetic_image(seed: int, num_prompts: int, drop_every: int = 0) -> dict:
  """One image of the training-batch layout (docs/training.md): nested
  rectangles and a disc, prompts / clicks / level targets as the reference
  builds them; ``num_prompts`` < K leaves padding prompts, ``drop_every``
  invalidates every n-th extra level target."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:S, :S]
  masks = np.zeros((M, S, S), bool)
  x0, y0 = rng.integers(0, 16, 2)
  for m in range(3):   # nested: each inside the previous one
    masks[m] = (xx >= x0 + 6 * m) & (xx < S - 4 - 6 * m) & (yy >= y0 + 5 * m) & (yy < S - 5 * m)
  cx, cy, r = rng.integers(10, 54, 2).tolist() + [int(rng.integers(4, 10))]
  masks[3] = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
  masks[4] = (xx < 8) & (yy >= S - 12)
  ys, xs = np.nonzero(masks.any(0))
  boxes = np.zeros((M, 4), np.float32)
  for m in range(M):
    yy_m, xx_m = np.nonzero(masks[m])
    boxes[m] = [xx_m.min(), yy_m.min(), xx_m.max() + 1, yy_m.max() + 1]
  t = 6
  order = np.tile(rng.permutation(M), K // M + 1)[:K]
  click = np.zeros((K, 2), np.int32)
  index = np.zeros((K, t), np.int32)
  valid = np.zeros((K, t), bool)
  for i, m in enumerate(order):
    yy_m, xx_m = np.nonzero(masks[m])
    j = rng.integers(len(yy_m))
    click[i] = [xx_m[j], yy_m[j]]
    tg = np.nonzero(masks[:, yy_m[j], xx_m[j]])[0][:t]
    index[i, :len(tg)] = tg
    valid[i, :len(tg)] = True
  prompt_valid = np.arange(K) < num_prompts
  if drop_every:
    pr, sl = np.nonzero(valid)
    drop = (np.arange(pr.shape[0]) % drop_every == drop_every - 1) & (sl > 0)
    valid[pr[drop], sl[drop]] = False
  valid &= prompt_valid[:, None]
  image = rng.integers(0, 256, (S, S, 3)).astype(np.uint8)
  image[masks[0]] //= 2
  return {
      "image": image[None], "image_size": np.asarray([[S, S]], np.int32),
      "masks": np.packbits(masks, axis=-1, bitorder="little")[None],
      "mask_valid": np.ones((1, M), bool), "mask_boxes": boxes[None],
      "click_xy": click[None], "prompt_mask": order.astype(np.int32)[None],
      "prompt_valid": prompt_valid[None], "target_index": index[None],
      "target_valid": valid[None], "example_id": np.asarray([seed], np.int32),
  }


def synthetic_draws(params_keep_tree, seed: int, t: int, num_layers: int) -> dict:
  """Explicit draws for one image (so that a batch and its single images
  see the same randomness)."""
  from semsam_jax.losses import points as pts
  rng = np.random.default_rng(1000 + seed)
  c = pts.num_oversampled_points(P, 3.0)
  e = P - pts.num_importance_points(P, 0.75)
  keep = jax.tree.map(lambda x: (rng.uniform(size=(1,)) < 0.7).astype(np.float32),
                      params_keep_tree)
  return {"drop_path_keep": keep,
          "dn_uniform": rng.uniform(size=(1, K, 4)).astype(np.float32),
          "matcher_points": rng.uniform(size=(1, P, 2)).astype(np.float32),
          "mask_points": [(rng.uniform(size=(1, K, t, c, 2)).astype(np.float32),
                           rng.uniform(size=(1, K, t, e, 2)).astype(np.float32))
                          for _ in range(num_layers)]}


def keep_tree(config):
  """The ``drop_path_keep`` structure: every Swin block with a non-zero rate."""
  bb = config.model.backbone
  rates = np.linspace(0.0, bb.drop_path_rate, sum(bb.depths))
  tree, n = {}, 0
  for i, depth in enumerate(bb.depths):
    for j in range(depth):
      if rates[n] > 0:
        tree.setdefault(f"layers_{i}", {})[f"blocks_{j}"] = {"attn": 0, "mlp": 0}
      n += 1
  return {"backbone": tree}


# (num_prompts, drop_every) per image: all different level-target counts;
# the last image has no prompt at all (a padding example).
IMAGES = [(4, 0), (3, 2), (2, 0), (4, 3), (1, 0), (3, 0), (4, 2), (0, 0)]


@pytest.fixture(scope="module")
def micro():
  from semsam_jax.models import semantic_sam as ss
  config = micro_config()
  params = jax.tree.map(np.asarray, ss.init_params(config.model, jax.random.PRNGKey(0)))
  t = int(config.model.decoder.num_mask_tokens)
  nl = int(config.model.decoder.num_layers)
  tree = keep_tree(config)
  images = [(synthetic_image(i, n, d), synthetic_draws(tree, i, t, nl))
            for i, (n, d) in enumerate(IMAGES)]
  objective = make_objective(config)

  def f(p, batch, draws):
    loss, det = objective(p, batch, jax.random.PRNGKey(0), draws=draws)
    return loss, det["metrics"]["num_targets"]

  return {"config": config, "params": params, "images": images,
          "grad": jax.jit(jax.value_and_grad(f, has_aux=True))}


@pytest.fixture(scope="module")
def singles(micro):
  with jax.default_matmul_precision("highest"):
    out = [micro["grad"](micro["params"], b, d) for b, d in micro["images"]]
  return jax.tree.map(np.asarray, out)


def _concat(trees):
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *trees)


def _combine(singles):
  """sum_i N_i g_i / sum_i N_i and sum_i N_i."""
  ns = [float(n) for (_, n), _ in singles]
  total = sum(ns)
  grads = jax.tree.map(lambda *gs: sum(n * np.asarray(g, np.float64) for n, g in zip(ns, gs))
                       / total, *[g for _, g in singles])
  loss = sum(float(l) * n for ((l, _), _), n in zip(singles, ns)) / total
  return grads, loss, total


def _assert_grads_close(got, want, total_tol=5e-5):
  """Per tensor rel. L2 <= 1e-4, overall <= ``total_tol``: float32 sums over
  images in another order (random-init gradients are more cancellation-prone
  than the trained tiny_a ones)."""
  num = den = 0.0
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                        jax.tree.leaves(want)):
    a = np.asarray(a, np.float64)
    num += float(np.sum((a - b) ** 2))
    den += float(np.sum(b ** 2))
    if np.any(b):
      err = golden.rel_l2(a, b)
      assert err <= 1e-4, f"{jax.tree_util.keystr(path[0])}: {err:.3g}"
    else:
      assert not np.any(a), jax.tree_util.keystr(path[0])
  assert np.sqrt(num / den) <= total_tol, np.sqrt(num / den)


def test_synthetic_images_exercise_the_rule(micro, singles):
  ns = [float(s[0][1]) for s in singles]
  assert len(set(ns)) >= 6 and ns[-1] == 0.0
  assert all(np.isfinite(float(s[0][0])) for s in singles)
  assert float(singles[-1][0][0]) == 0.0
  assert all(not np.any(g) for g in jax.tree.leaves(singles[-1][1]))
  # drop-path: some block's branch is dropped in some image and kept in another
  keeps = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(d["drop_path_keep"])])
           for _, d in micro["images"]]
  assert np.any(np.std(keeps, axis=0) > 0)


def test_batch_of_two_combines_single_gradients(micro, singles):
  pick = [0, 1]
  images = [micro["images"][i] for i in pick]
  with jax.default_matmul_precision("highest"):
    (loss, n), grads = micro["grad"](micro["params"], _concat([b for b, _ in images]),
                                     _concat([d for _, d in images]))
  want, want_loss, total = _combine([singles[i] for i in pick])
  assert float(singles[0][0][1]) != float(singles[1][0][1])
  assert float(n) == total
  assert abs(float(loss) - want_loss) <= 1e-5 * want_loss
  _assert_grads_close(jax.tree.map(np.asarray, grads), want)


def test_sharded_batch_of_eight_combines_single_gradients(micro, singles):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (fake CPU) devices; tests/conftest.py sets them")
  mesh = make_mesh({"data": 8}, jax.devices()[:8])
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  batch = jax.tree.map(shard, _concat([b for b, _ in micro["images"]]))
  draws = jax.tree.map(shard, _concat([d for _, d in micro["images"]]))
  params = jax.device_put(micro["params"], NamedSharding(mesh, PartitionSpec()))
  with jax.default_matmul_precision("highest"):
    (loss, n), grads = micro["grad"](params, batch, draws)
  assert len(batch["image"].sharding.device_set) == 8
  want, want_loss, total = _combine(singles)
  assert float(n) == total
  assert abs(float(loss) - want_loss) <= 1e-5 * want_loss
  _assert_grads_close(jax.tree.map(np.asarray, grads), want)


def test_no_recompilation_across_prompt_and_target_counts(micro, singles):
  """The eight single-image runs above (0 .. K prompts, different numbers of
  level targets) used one compilation; so does the training path (draws from
  the step key) across steps."""
  grad = micro["grad"]
  before = grad._cache_size()
  with jax.default_matmul_precision("highest"):
    for b, d in micro["images"][:3]:
      grad(micro["params"], b, d)
  assert grad._cache_size() == before
  loss_fn = make_loss_fn(micro["config"])
  step = jax.jit(loss_fn)
  key = jax.random.PRNGKey(3)
  seen = []
  for i, (b, _) in enumerate(micro["images"][:4]):
    loss, metrics = step(micro["params"], b, jax.random.fold_in(key, i))
    assert np.isfinite(float(loss))
    seen.append(float(metrics["num_targets"]))
  assert len(set(seen)) == 4
  assert step._cache_size() == 1


# --------------------------------------------------------------------- variants
# The variants run on a recorded golden step with yet another replaced stage,
# the forward: it returns the recorded decoder outputs (so no model runs).


@pytest.fixture(scope="module")
def base():
  cases = train_case_files()
  if not cases:
    golden._missing(f"{golden.golden_dir()}/train_*/ex*.npz")
  path = cases[0]
  meta, config, _ = _model(str(path.parent))
  data = golden.load_npz(path)
  t = int(config.model.decoder.num_mask_tokens)
  num_layers = int(meta["examples"][path.stem]["num_layers"])
  k = data["level_target_len"].shape[0]
  layers = []
  for j in range(num_layers):
    hq, wq = data[f"L{j}_pred_masks"].shape[-2:]
    layers.append({"pred_masks": data[f"L{j}_pred_masks"].reshape(1, k, t, hq, wq),
                   "pred_boxes": data[f"L{j}_pred_boxes"].reshape(1, k, t, 4),
                   "pred_ious": data[f"L{j}_pred_ious"].reshape(1, k, t)})

  def recorded_forward(model, params, *args):
    del model, params, args
    return [{n: jnp.asarray(v) for n, v in layer.items()} for layer in layers]

  return {"data": data, "config": config, "t": t, "num_layers": num_layers,
          "batch": replay.batch_from_reference(data, t),
          "draws": replay.draws_from_reference(data, t, num_layers),
          "expected": meta["examples"][path.stem], "forward": recorded_forward}


def _run_variant(base, draws, **stages):
  objective = make_objective(base["config"], forward=base["forward"], **stages)
  with jax.default_matmul_precision("highest"):
    loss, det = jax.jit(lambda b, d: objective({}, b, jax.random.PRNGKey(0), draws=d))(
        base["batch"], draws)
  return float(loss), jax.tree.map(np.asarray, det)


def test_variant_forward_reproduces_recorded_losses(base):
  """The recorded outputs through the default matcher, sampler and terms."""
  loss, det = _run_variant(base, base["draws"])
  for name, value in base["expected"]["losses_weighted"].items():
    got = float(det["metrics"][name.removeprefix("sam.")])
    assert abs(got - value) <= 1e-5 * abs(value), (name, got, value)
  assert abs(loss - base["expected"]["loss_total"]) <= 1e-5 * base["expected"]["loss_total"]


def _uniform_sampler(read, candidates, extra, num_points, importance_sample_ratio):
  """A research variant: no importance sampling, the first P candidates."""
  del read, extra, importance_sample_ratio
  return candidates[..., :num_points, :]


def test_variant_point_sampler(base):
  """With the recorded points put in front of otherwise zero candidates, only
  the replacement sampler reproduces the recorded losses (the default one
  would take the most uncertain of the candidates)."""
  data, t = base["data"], base["t"]
  draws = dict(base["draws"])
  pts = []
  for k, (cand, extra) in enumerate(draws["mask_points"]):
    coords = replay.per_pair_to_slots(data[f"note/loss_{k}/masks/point_coords#0"], data, t)
    cand = np.zeros_like(cand)
    cand[..., :coords.shape[-2], :] = coords
    pts.append((cand, np.zeros_like(extra)))
  draws["mask_points"] = pts
  _, det = _run_variant(base, draws, point_sampler=_uniform_sampler)
  for name, value in base["expected"]["losses_weighted"].items():
    got = float(det["metrics"][name.removeprefix("sam.")])
    assert abs(got - value) <= 1e-5 * abs(value), (name, got, value)
  p = data["draw/matcher/rand#0"].shape[1]
  for k in range(base["num_layers"]):
    np.testing.assert_array_equal(det["terms"][k]["point_coords"], pts[k][0][..., :p, :])


def _identity_matcher(pred_logits, tgt_labels, pred_boxes, tgt_boxes, target_valid, cfg):
  """A research variant: target slot j always gets token j (no matching)."""
  del pred_logits, tgt_labels, pred_boxes, tgt_boxes, cfg
  tt = target_valid.shape[-1]
  return {"token": jnp.broadcast_to(jnp.arange(tt, dtype=jnp.int32), target_valid.shape)}


def _terms_without_giou(*args, **kwargs):
  """A research variant of the per-layer terms: the GIoU term removed."""
  terms = crit.layer_terms(*args, **kwargs)
  terms.pop("loss_giou")
  return terms


def test_variant_matcher_and_terms(base):
  data, t, nl = base["data"], base["t"], base["num_layers"]
  loss, det = _run_variant(base, base["draws"], matcher=_identity_matcher,
                           terms_fn=_terms_without_giou)
  metrics = det["metrics"]
  assert not [m for m in metrics if m.startswith("loss_giou")]
  assert len([m for m in metrics if m.startswith("loss_bbox")]) == nl
  tv = base["batch"]["target_valid"][0]
  np.testing.assert_array_equal(det["token"][0][tv], np.broadcast_to(np.arange(t), tv.shape)[tv])
  # Independent numpy check of the box L1 term under the identity assignment,
  # from the recorded decoder boxes and target boxes.
  lens = data["level_target_len"]
  prompt = np.repeat(np.arange(lens.shape[0]), lens)
  slot = np.arange(prompt.shape[0]) - replay.target_offsets(lens)[prompt]
  tgt = data["tgt_ori_boxes"][data["level_target_flat"]].astype(np.float64)
  n = float(data["num_masks"])
  w = float(base["config"].loss.weight_bbox)
  for k in range(nl):
    layer = nl - 1 if k == 0 else k - 1
    boxes = data[f"L{layer}_pred_boxes"][0].astype(np.float64)[prompt * t + slot]
    want = w * np.abs(boxes - tgt).sum() / n
    assert abs(float(metrics[f"loss_bbox_{k}"]) - want) <= 1e-5 * want
  total = sum(float(v) for m, v in metrics.items() if m != "num_targets")
  assert abs(loss - total) <= 1e-6 * total
  assert loss < base["expected"]["loss_total"]
