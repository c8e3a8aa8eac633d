"""Parity of the granularity decoder with the original PyTorch predictor.

For every golden case the converted ``tiny_*`` predictor weights decode the
recorded pixel-decoder outputs and prompt boxes; final and auxiliary masks,
boxes and IoUs must match the reference.  Further checks: padding prompts
(``valid=False``) leave the real prompts untouched, ``independent_prompts``
equals decoding every prompt alone, the cached-memory path equals the plain
call, and the parameter tree accepts every predictor key of the released
SwinT / SwinL checkpoints (tied aliases included).
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsam_jax import config as config_lib
from semsam_jax.convert.mapping import convert_state_dict
from semsam_jax.convert.reference_config import config_from_reference_yaml
from semsam_jax.convert.torch_pth import load_state_dict
from semsam_jax.models.granularity_decoder import (GranularityDecoder, sine_box_embedding,
                                                   self_attention_mask)
from tests import golden

TOL = 1e-5
PREFIX = "model.sem_seg_head.predictor."
CASES = golden.cases_or_missing("case_*.npz")
CASE_IDS = golden.param_ids([c for c in CASES if c]) or ["missing"]


def _dummy_features(cfg, batch=1, size=4):
  """Smallest valid inputs for ``init`` (finest level first)."""
  c = cfg.hidden_dim
  feats = [jnp.zeros((batch, size * 2 ** (3 - i), size * 2 ** (3 - i), c), jnp.float32)
           for i in range(cfg.total_num_feature_levels)]
  mask_features = jnp.zeros((batch, 8, 8, cfg.mask_dim), jnp.float32)
  return feats, mask_features


def _param_shapes(cfg):
  model = GranularityDecoder.from_config(cfg)
  feats, mf = _dummy_features(cfg)
  boxes = jnp.full((1, 2, 4), 0.5, jnp.float32)
  pb = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda r: model.init(r, feats, mf, boxes, pb), jax.random.PRNGKey(0))
  return model, shapes["params"]


@functools.lru_cache(maxsize=None)
def _loaded(model_dir: str):
  d = pathlib.Path(model_dir)
  cfg = config_from_reference_yaml(d / "config.yaml").decoder
  model, shapes = _param_shapes(cfg)
  params = convert_state_dict(load_state_dict(d / "model.pth"), shapes, prefix=PREFIX)
  params = jax.tree.map(jnp.asarray, params)

  @functools.partial(jax.jit, static_argnames=("independent_prompts", "return_aux"))
  def run(params, feats, mask_features, boxes, pb, valid=None, independent_prompts=False,
          return_aux=True):
    with jax.default_matmul_precision("highest"):
      return model.apply({"params": params}, feats, mask_features, boxes, pb, valid,
                         independent_prompts=independent_prompts, return_aux=return_aux)

  return cfg, model, params, run


def _inputs(data):
  feats = [jnp.asarray(golden.nchw_to_nhwc(data[f"multi_scale_{i}"])) for i in range(4)]
  mask_features = jnp.asarray(golden.nchw_to_nhwc(data["mask_features"]))
  boxes = jnp.asarray(data["decoder_points"])[None]
  pb = jnp.full(boxes.shape[:2], int(bool(data["prompt_is_box"])), jnp.int32)
  return feats, mask_features, boxes, pb


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request):
  data = golden.load_npz(request.param)
  cfg, model, params, run = _loaded(str(request.param.parent))
  return data, cfg, model, params, run


def _check(name, actual, expected, sign=False):
  err = golden.rel_l2(actual, expected)
  assert err <= TOL, f"{name}: relative L2 error {err:.3g} > {TOL}"
  if sign:
    agree = np.mean((np.asarray(actual) > 0) == (np.asarray(expected) > 0))
    assert agree >= 0.9999, f"{name}: mask-logit signs agree on only {agree:.6f}"


def _flat(out):
  """Our (B, N, T, ...) layout -> the golden (B, N*T, ...) layout."""
  m, b = np.asarray(out["pred_masks"]), np.asarray(out["pred_boxes"])
  return (m.reshape((m.shape[0], -1) + m.shape[3:]), b.reshape(b.shape[0], -1, 4),
          np.asarray(out["pred_ious"]))


def test_matches_reference(case):
  data, cfg, _, params, run = case
  feats, mask_features, boxes, pb = _inputs(data)
  out = run(params, feats, mask_features, boxes, pb)
  n, t = data["pred_ious"].shape[1:]
  assert t == cfg.num_mask_tokens
  assert out["pred_masks"].shape == (1, n, t) + data["pred_masks"].shape[2:]
  assert out["pred_boxes"].shape == (1, n, t, 4)
  assert out["pred_ious"].shape == (1, n, t)
  assert len(out["aux_outputs"]) == cfg.num_layers - 1
  outs = [("", out)] + [(f"aux{k}_", a) for k, a in enumerate(out["aux_outputs"])]
  for prefix, o in outs:
    masks, bxs, ious = _flat(o)
    _check(prefix + "pred_masks", masks, data[prefix + "pred_masks"], sign=True)
    _check(prefix + "pred_boxes", bxs, data[prefix + "pred_boxes"])
    _check(prefix + "pred_ious", ious, data[prefix + "pred_ious"])


PAD_CASES = [c for c in CASES if c is not None and c.stem in ("case_multi", "case_box")] or [None]


@pytest.mark.parametrize("case_file", PAD_CASES, ids=golden.param_ids([c for c in PAD_CASES if c])
                         or ["missing"])
def test_padding_prompts_do_not_change_real_prompts(case_file):
  data = golden.load_npz(case_file)
  _, _, params, run = _loaded(str(case_file.parent))
  feats, mask_features, boxes, pb = _inputs(data)
  n = boxes.shape[1]
  ref = run(params, feats, mask_features, boxes, pb)
  # Padding prompts before and after the real ones, with arbitrary boxes/kinds.
  pad_boxes = jnp.asarray([[[0.3, 0.6, 0.2, 0.1]], [[0.0, 0.0, 0.0, 0.0]], [[0.9, 0.1, 0.5, 0.5]]],
                          jnp.float32).reshape(1, 3, 4)
  boxes_p = jnp.concatenate([pad_boxes[:, :1], boxes, pad_boxes[:, 1:]], axis=1)
  pb_p = jnp.concatenate([jnp.ones((1, 1), jnp.int32), pb, jnp.asarray([[0, 1]], jnp.int32)], 1)
  valid = jnp.asarray([[False] + [True] * n + [False, False]])
  out = run(params, feats, mask_features, boxes_p, pb_p, valid)
  for o_ref, o_pad in [(ref, out)] + list(zip(ref["aux_outputs"], out["aux_outputs"])):
    for k in ("pred_masks", "pred_boxes", "pred_ious"):
      real = np.asarray(o_pad[k])[:, 1:1 + n]
      err = golden.rel_l2(real, o_ref[k])
      assert err <= 1e-6, f"{k}: padding changed the real prompts (rel. L2 {err:.3g})"
      assert np.all(np.isfinite(np.asarray(o_pad[k]))), f"{k}: non-finite padded outputs"
  # Every prompt invalid (an all-padding batch): still finite, no NaN.
  out = run(params, feats, mask_features, boxes_p, pb_p, jnp.zeros_like(valid))
  for k in ("pred_masks", "pred_boxes", "pred_ious"):
    assert np.all(np.isfinite(np.asarray(out[k]))), k


def test_independent_prompts_equal_single_prompts():
  files = golden.case_files("case_multi.npz")
  if not files:
    golden.require_golden()
    pytest.skip("no case_multi.npz")
  for f in files:
    data = golden.load_npz(f)
    _, _, params, run = _loaded(str(f.parent))
    feats, mask_features, boxes, pb = _inputs(data)
    n = boxes.shape[1]
    assert n > 1
    joint = run(params, feats, mask_features, boxes, pb, independent_prompts=True)
    shared = run(params, feats, mask_features, boxes, pb)
    # The default (all queries interact) must really differ, or the test is vacuous.
    assert golden.rel_l2(joint["pred_ious"], shared["pred_ious"]) > 1e-4
    for i in range(n):
      alone = run(params, feats, mask_features, boxes[:, i:i + 1], pb[:, i:i + 1])
      for o_j, o_a in [(joint, alone)] + list(zip(joint["aux_outputs"], alone["aux_outputs"])):
        for k in ("pred_masks", "pred_boxes", "pred_ious"):
          err = golden.rel_l2(np.asarray(o_j[k])[:, i:i + 1], o_a[k])
          assert err <= 1e-6, f"prompt {i} {k}: rel. L2 {err:.3g}"


def test_cached_memory_path_matches_call():
  files = golden.case_files("case_box.npz") or golden.case_files()
  if not files:
    golden.require_golden()
  data = golden.load_npz(files[0])
  cfg, model, params, run = _loaded(str(files[0].parent))
  feats, mask_features, boxes, pb = _inputs(data)

  @jax.jit
  def cached(params, feats, mask_features, boxes, pb):
    with jax.default_matmul_precision("highest"):
      mem = model.apply({"params": params}, feats, method=GranularityDecoder.project_memory)
      assert len(mem.values) == cfg.num_layers
      return model.apply({"params": params}, mem, mask_features, boxes, pb,
                         return_aux=False, method=GranularityDecoder.decode)

  a = cached(params, feats, mask_features, boxes, pb)
  assert "aux_outputs" not in a
  b = run(params, feats, mask_features, boxes, pb)
  for k in ("pred_masks", "pred_boxes", "pred_ious"):
    assert golden.rel_l2(a[k], b[k]) <= 1e-6, k


def test_sine_embedding_layout():
  boxes = jnp.asarray([[0.1, 0.2, 0.3, 0.4]], jnp.float32)
  emb = np.asarray(sine_box_embedding(boxes, 4))
  dim_t = 10000.0 ** (2 * (np.arange(4) // 2) / 4)
  def one(v):
    a = v * 2 * np.pi / dim_t
    return np.array([np.sin(a[0]), np.cos(a[1]), np.sin(a[2]), np.cos(a[3])])
  expected = np.concatenate([one(0.2), one(0.1), one(0.3), one(0.4)])  # y, x, w, h
  np.testing.assert_allclose(emb[0], expected, rtol=1e-6, atol=1e-6)


def test_self_attention_mask():
  valid = jnp.asarray([[True, False, True]])
  m = np.asarray(self_attention_mask(3, 2, valid, independent_prompts=True))
  assert m.shape == (1, 6, 6)
  expected = np.zeros((6, 6), bool)
  expected[0:2, 0:2] = expected[4:6, 4:6] = True  # prompt 1 is hidden, even from itself
  np.testing.assert_array_equal(m[0], expected)
  assert self_attention_mask(3, 2, None, independent_prompts=False) is None


@pytest.mark.parametrize("backbone,manifest", [("swin_t", "manifest_swinT.json"),
                                               ("swin_l", "manifest_swinL.json")])
def test_param_tree_matches_released_checkpoint(backbone, manifest):
  path = golden.require_golden() / manifest
  if not path.is_file():
    golden.require_golden()
    pytest.fail(f"{path} missing")
  keys = json.loads(path.read_text())["keys"]
  state = {k: np.zeros(v["shape"], np.float32) for k, v in keys.items()
           if k.startswith(PREFIX)}
  assert any("_bbox_embed" in k for k in state) and any("decoder.norm." in k for k in state)
  cfg = config_lib.model_config(backbone).decoder
  _, shapes = _param_shapes(cfg)
  params = convert_state_dict(state, shapes, prefix=PREFIX)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert n_params == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
