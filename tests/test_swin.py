"""Swin backbone: golden outputs of the original model, checkpoint layout of the
released SwinT/SwinL weights, and the static helpers (masks, indices, resize)."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsam_jax.config import model_config
from semsam_jax.convert.mapping import convert_state_dict
from semsam_jax.convert.reference_config import config_from_reference_yaml
from semsam_jax.convert.torch_pth import load_state_dict
from semsam_jax.models import swin
from semsam_jax.models.swin import SwinTransformer
from tests import golden

PREFIX = "model.backbone."
TOL = 1e-5


@functools.lru_cache(maxsize=None)
def _golden_model(model_dir: str):
  cfg = config_from_reference_yaml(f"{model_dir}/config.yaml")
  module = SwinTransformer.from_config(cfg.backbone)
  state_dict = load_state_dict(f"{model_dir}/model.pth")
  return module, state_dict


@pytest.mark.parametrize("case", golden.cases_or_missing(),
                         ids=golden.param_ids(golden.case_files()) or ["missing"])
def test_matches_golden_backbone(case):
  data = golden.load_npz(case)
  module, state_dict = _golden_model(str(case.parent))
  images = golden.nchw_to_nhwc(data["image_normalized_padded"]).astype(np.float32)
  target = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)["params"]
  params = convert_state_dict(state_dict, target, prefix=PREFIX)
  with jax.default_matmul_precision("highest"):
    out = jax.jit(module.apply)({"params": params}, images)
  assert set(out) == set(module.out_features)
  for name in ("res2", "res3", "res4", "res5"):
    expected = golden.nchw_to_nhwc(data[f"backbone_{name}"])
    err = golden.rel_l2(out[name], expected)
    assert err <= TOL, f"{case.name} {name}: rel L2 {err:.3g}"


def _manifest_backbone(path) -> dict[str, np.ndarray]:
  """Zero-filled (zero-stride, no memory) backbone state dict of a manifest;
  the relative-position-index buffers get their true values."""
  keys = json.loads(path.read_text())["keys"]
  out = {}
  for key, spec in keys.items():
    if not key.startswith(PREFIX):
      continue
    shape = tuple(spec["shape"])
    if key.endswith(".relative_position_index"):
      out[key] = swin.relative_position_index(int(round(np.sqrt(shape[0]))))
    else:
      out[key] = np.broadcast_to(np.zeros((), spec["dtype"]), shape)
  return out


@pytest.mark.parametrize("arch,manifest", [("swin_t", "manifest_swinT.json"),
                                           ("swin_l", "manifest_swinL.json")])
def test_param_tree_matches_released_checkpoint(arch, manifest):
  path = golden.require_golden() / manifest
  if not path.exists():
    pytest.skip(f"{path} not found")
  module = SwinTransformer.from_config(model_config(arch).backbone)
  target = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3), jnp.float32))["params"]
  state_dict = _manifest_backbone(path)
  params = convert_state_dict(state_dict, target, prefix=PREFIX)  # raises on any mismatch
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  n_ckpt = sum(v.size for k, v in state_dict.items()
               if not k.endswith(".relative_position_index"))
  assert n_params == n_ckpt


# ---------------------------------------------------------------------------
# Static helpers
# ---------------------------------------------------------------------------

def test_relative_position_index():
  idx = swin.relative_position_index(3)
  assert idx.shape == (9, 9)
  # Token (0,0) vs (2,2): offset (-2,-2) -> (0 * 5 + 0); reverse -> (4 * 5 + 4).
  assert idx[0, 8] == 0 and idx[8, 0] == 24
  assert np.all(np.diag(idx) == 2 * 5 + 2)
  assert sorted(np.unique(idx)) == list(range(25))


def test_shifted_window_mask_regions():
  ws, shift = 4, 2
  mask = swin.shifted_window_mask(8, 8, ws, shift)
  assert mask.shape == (4, 16, 16)
  assert set(np.unique(mask)) <= {0.0, swin.SHIFT_MASK_VALUE}
  assert np.all(mask[0] == 0)                      # top-left window: one region
  # Bottom-right window: 4 regions of 2x2 tokens each.
  br = mask[3] == 0
  assert br.sum() == 16 * 4
  # The mask is symmetric and a token always sees itself.
  assert np.array_equal(mask, mask.transpose(0, 2, 1))
  assert np.all(np.diagonal(mask, axis1=1, axis2=2) == 0)


def test_shifted_window_mask_single_window():
  # Feature map padded to exactly one window: bands [0,0), [0,ws-shift), [ws-shift,ws).
  mask = swin.shifted_window_mask(7, 14, 7, 3)
  assert mask.shape == (2, 49, 49)
  rows = np.arange(49) // 7
  same_band = (rows[:, None] >= 4) == (rows[None, :] >= 4)
  # First window: columns 0..6 are all in the first column band.
  assert np.array_equal(mask[0] == 0, same_band)


def test_bicubic_matrix():
  assert np.allclose(swin.bicubic_resize_matrix(5, 5), np.eye(5))
  for n_in, n_out in ((7, 12), (12, 7), (2, 4)):
    m = swin.bicubic_resize_matrix(n_in, n_out)
    assert m.shape == (n_out, n_in)
    assert np.allclose(m.sum(1), 1.0)
  # [0, 1] -> 4 samples: first output at source -0.25 (taps clamped to the edge),
  # only the tap at index 1 carries the value 1 with weight cubic(1.25), a = -0.75.
  m = swin.bicubic_resize_matrix(2, 4)
  assert np.isclose(m[0] @ np.array([0.0, 1.0]), -0.10546875)
  assert np.allclose(m @ np.array([0.0, 1.0]), 1.0 - (m @ np.array([1.0, 0.0])))


# ---------------------------------------------------------------------------
# Module behaviour on a very small model
# ---------------------------------------------------------------------------

def _small(**kw) -> SwinTransformer:
  base = dict(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=3,
              out_features=("res2", "res3"))
  base.update(kw)
  return SwinTransformer(**base)


def test_output_shapes_for_odd_sizes():
  module = SwinTransformer(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                           window_size=7)
  x = jnp.zeros((2, 99, 61, 3))
  shapes = jax.eval_shape(lambda: module.init_with_output(jax.random.PRNGKey(0), x)[0])
  # Patch padding to 100x64 -> 25x16, then ceil-halving per PatchMerging.
  assert {k: v.shape for k, v in shapes.items()} == {
      "res2": (2, 25, 16, 8), "res3": (2, 13, 8, 16),
      "res4": (2, 7, 4, 32), "res5": (2, 4, 2, 64)}


def _random_params(module: SwinTransformer, x, seed: int = 0):
  """Random parameters without compiling ``init`` (which is slow on CPU)."""
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape).astype(np.float32)), shapes)


def test_drop_path():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 20, 28, 3))
  module = _small(drop_path_rate=0.5)
  params = _random_params(module, x)

  def run(m, deterministic, seed=2):
    fn = functools.partial(m.apply, deterministic=deterministic)
    return jax.jit(fn)({"params": params}, x, rngs={"dropout": jax.random.PRNGKey(seed)})

  ref = run(module, True)
  # Training mode needs the 'dropout' stream and changes the result.
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(functools.partial(module.apply, deterministic=False), {"params": params}, x)
  train = run(module, False)
  assert not np.allclose(train["res3"], ref["res3"])
  # No drop rate: training mode is the identity on the residual branches.
  same = run(_small(), False)
  np.testing.assert_allclose(same["res3"], ref["res3"], rtol=1e-6, atol=1e-6)


def test_remat_same_params_values_and_gradients():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 12, 16, 3))
  kw = dict(depths=(2,), num_heads=(1,), out_features=("res2",), drop_path_rate=0.5)
  plain, remat = _small(**kw), _small(remat=True, **kw)
  params = _random_params(plain, x)
  remat_tree = nn.unbox(jax.eval_shape(remat.init, jax.random.PRNGKey(0), x)["params"])
  assert jax.tree.structure(remat_tree) == jax.tree.structure(params)

  def loss(p, m):
    out = m.apply({"params": p}, x, deterministic=False,
                  rngs={"dropout": jax.random.PRNGKey(3)})
    return jnp.sum(out["res2"] ** 2)

  g_plain = jax.jit(jax.value_and_grad(functools.partial(loss, m=plain)))(params)
  g_remat = jax.jit(jax.value_and_grad(functools.partial(loss, m=remat)))(params)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_absolute_position_embedding_and_bf16():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 24, 40, 3))
  module = _small(ape=True, pretrain_img_size=32)
  variables = {"params": _random_params(module, x)}
  assert variables["params"]["absolute_pos_embed"].shape == (1, 8, 8, 8)
  out = jax.jit(module.apply)(variables, x)
  assert out["res2"].shape == (1, 6, 10, 8)
  half = _small(ape=True, pretrain_img_size=32, dtype=jnp.bfloat16)
  out16 = jax.jit(half.apply)(variables, x)
  assert out16["res3"].dtype == jnp.bfloat16
  assert golden.rel_l2(out16["res3"], out["res3"]) < 5e-2


def test_from_config_reads_backbone_fields():
  cfg = model_config("swin_l").backbone
  module = SwinTransformer.from_config(cfg, drop_path_rate=0.0)
  assert module.embed_dim == 192 and module.depths == (2, 2, 18, 2)
  assert module.num_heads == (6, 12, 24, 48) and module.window_size == 12
  assert module.pretrain_img_size == 384 and module.drop_path_rate == 0.0
  with pytest.raises(ValueError, match="not divisible"):
    _small(num_heads=(3, 2)).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
