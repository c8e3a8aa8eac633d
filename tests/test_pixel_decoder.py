"""Parity of the deformable pixel decoder with the original PyTorch encoder.

For every golden case the converted ``tiny_*`` pixel-decoder weights process
the recorded backbone features; ``mask_features`` and the four multi-scale
maps must match.  Also: the parameter tree accepts every pixel-decoder key of
the released SwinT / SwinL checkpoints, and the small numeric helpers (sine
position encoding, bilinear resize, encoder reference points) agree with
independent formulas.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsam_jax import config as config_lib
from semsam_jax.convert.mapping import convert_state_dict
from semsam_jax.convert.reference_config import config_from_reference_yaml
from semsam_jax.convert.torch_pth import load_state_dict
from semsam_jax.models import pixel_decoder as pd
from tests import golden

PREFIX = "model.sem_seg_head.pixel_decoder."
TOL = 1e-5
RES = ("res2", "res3", "res4", "res5")

CASES = golden.cases_or_missing("case_*.npz")
CASE_IDS = golden.param_ids([c for c in CASES if c]) or ["missing"]


def _in_channels(backbone_cfg) -> dict[str, int]:
  e = backbone_cfg.embed_dim
  return {f"res{i + 2}": e * 2 ** i for i in range(4)}


@functools.lru_cache(maxsize=None)
def _tiny_model(model_dir: str):
  cfg = config_from_reference_yaml(f"{model_dir}/config.yaml")
  module = pd.DeformablePixelDecoder.from_config(cfg.pixel_decoder, _in_channels(cfg.backbone))
  state = load_state_dict(f"{model_dir}/model.pth")
  return cfg, module, state


@functools.lru_cache(maxsize=None)
def _jitted_apply(module):
  return jax.jit(module.apply)


def _features(z) -> dict[str, jnp.ndarray]:
  return {k: jnp.asarray(golden.nchw_to_nhwc(z[f"backbone_{k}"])) for k in RES}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pixel_decoder_matches_golden(case):
  z = golden.load_npz(case)
  _, module, state = _tiny_model(str(case.parent))
  feats = _features(z)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), feats)["params"]
  params = convert_state_dict(state, shapes, prefix=PREFIX)
  with jax.default_matmul_precision("highest"):
    mask_features, multi_scale = _jitted_apply(module)({"params": params}, feats)
  assert len(multi_scale) == 4
  errs = {"mask_features": golden.rel_l2(mask_features, golden.nchw_to_nhwc(z["mask_features"]))}
  for i, m in enumerate(multi_scale):
    errs[f"multi_scale_{i}"] = golden.rel_l2(m, golden.nchw_to_nhwc(z[f"multi_scale_{i}"]))
  assert all(e <= TOL for e in errs.values()), errs
  # Strides 8, 16, 32, 64 of the padded image, and mask features at stride 4.
  hp, wp = z["image_normalized_padded"].shape[2:]
  assert mask_features.shape[1:3] == (hp // 4, wp // 4)
  for i, m in enumerate(multi_scale):
    s = 8 * 2 ** i
    assert m.shape[1:3] == (-(-hp // s), -(-wp // s))


@pytest.mark.parametrize("backbone,manifest", [("swin_t", "manifest_swinT.json"),
                                               ("swin_l", "manifest_swinL.json")])
def test_param_tree_matches_released_checkpoint(backbone, manifest):
  path = golden.require_golden() / manifest
  if not path.is_file():
    pytest.fail(f"{path} missing")
  keys = json.loads(path.read_text())["keys"]
  state = {k: np.zeros(v["shape"], np.float32) for k, v in keys.items() if k.startswith(PREFIX)}
  assert state, f"no {PREFIX}* keys in {manifest}"
  cfg = config_lib.model_config(backbone)
  module = pd.DeformablePixelDecoder.from_config(cfg.pixel_decoder, _in_channels(cfg.backbone))
  feats = {f"res{i + 2}": jax.ShapeDtypeStruct((1, 64 >> i, 64 >> i, c), jnp.float32)
           for i, c in enumerate(_in_channels(cfg.backbone).values())}
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), feats)["params"]
  params = convert_state_dict(state, shapes, prefix=PREFIX)
  n_ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == n_ours
  assert n_ours == sum(int(np.prod(v.shape)) for v in state.values())


def test_sine_position_embedding_formula():
  h, w, n = 3, 5, 8
  pe = np.asarray(pd.sine_position_embedding(h, w, n))
  assert pe.shape == (h, w, 2 * n)

  def enc(i, size):
    v = i / (size + 1e-6) * 2 * math.pi
    out = []
    for k in range(n):
      a = v / 10000 ** (2 * (k // 2) / n)
      out.append(math.sin(a) if k % 2 == 0 else math.cos(a))
    return out

  for r in range(h):
    for c in range(w):
      np.testing.assert_allclose(pe[r, c], enc(r + 1, h) + enc(c + 1, w), atol=1e-6)


@pytest.mark.parametrize("src,dst", [((4, 5), (8, 10)), ((3, 7), (6, 14)), ((4, 4), (9, 5))])
def test_resize_bilinear_half_pixel(src, dst):
  """Upsampling matches jax.image.resize (half-pixel centres, edge clamp);
  the 1-d matrices match PyTorch's formula, incl. the clamp at 0 when shrinking."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2,) + src + (3,)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    ours = pd.resize_bilinear(jnp.asarray(x), dst)
  if dst[0] >= src[0] and dst[1] >= src[1]:
    ref = jax.image.resize(x, (2,) + dst + (3,), method="linear", antialias=False)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
  for o_size, i_size in zip(dst, src):
    m = pd._linear_resize_matrix(o_size, i_size)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    for o in range(o_size):
      s = max((o + 0.5) * i_size / o_size - 0.5, 0.0)
      i0 = min(int(math.floor(s)), i_size - 1)
      i1 = min(i0 + 1, i_size - 1)
      row = np.zeros(i_size)
      row[i0] += 1 - (s - i0)
      row[i1] += s - i0
      np.testing.assert_allclose(m[o], row, atol=1e-6)


def test_encoder_reference_points():
  ref = np.asarray(pd.encoder_reference_points(((2, 3), (1, 2))))
  expected = [[x / 6, y / 4] for y in (1, 3) for x in (1, 3, 5)] + [[0.25, 0.5], [0.75, 0.5]]
  np.testing.assert_allclose(ref, expected, atol=1e-7)


def test_bfloat16_compute_runs_close():
  golden.require_golden()
  case = CASES[0]
  z = golden.load_npz(case)
  cfg, module, state = _tiny_model(str(case.parent))
  feats = _features(z)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), feats)["params"]
  params = convert_state_dict(state, shapes, prefix=PREFIX)
  m16 = pd.DeformablePixelDecoder.from_config(cfg.pixel_decoder, _in_channels(cfg.backbone),
                                              dtype=jnp.bfloat16)
  mf, ms = jax.jit(m16.apply)({"params": params}, feats)
  assert mf.dtype == jnp.bfloat16 and all(m.dtype == jnp.bfloat16 for m in ms)
  assert golden.rel_l2(mf.astype(jnp.float32), golden.nchw_to_nhwc(z["mask_features"])) < 0.05


def test_dropout_needs_rng_and_changes_output():
  cfg = config_lib.model_config("swin_t").pixel_decoder.to_dict()
  cfg.update(conv_dim=32, mask_dim=16, num_heads=2, dim_feedforward=32, num_encoder_layers=1,
             dropout=0.5)
  module = pd.DeformablePixelDecoder.from_config(cfg, {"res2": 8, "res3": 16, "res4": 32,
                                                       "res5": 64})
  rng = np.random.default_rng(0)
  feats = {f"res{i + 2}": jnp.asarray(rng.normal(size=(1, 16 >> i, 16 >> i, 8 << i)),
                                      jnp.float32) for i in range(4)}
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), feats)
  det = jax.jit(module.apply)(variables, feats)
  train = jax.jit(functools.partial(module.apply, deterministic=False))(
      variables, feats, rngs={"dropout": jax.random.PRNGKey(1)})
  assert det[0].shape == train[0].shape == (1, 16, 16, 16)
  assert not np.allclose(np.asarray(det[0]), np.asarray(train[0]))
