"""The reference optimisation recipe (train_net.py build_optimizer + WarmupMultiStepLR)."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from semsam_jax.config import model_config
from semsam_jax.convert import mapping
from semsam_jax.convert.reference_config import config_from_reference_yaml
from semsam_jax.models import semantic_sam as ss
from semsam_jax.training import optim
from semsam_jax.training.config import optim_config
from tests import golden


def _torch_no_decay(key: str) -> bool:
  """No-decay rule of the reference, from the state-dict key and the module types
  of the original code: norm modules (LayerNorm: ``norm*``, ``decoder_norm``,
  ``decoder.norm``; GroupNorm: ``adapter_1.norm``, ``layer_1.norm`` and the second
  entry of each ``input_proj.i`` Sequential), nn.Embedding tables (``mask_tokens``,
  ``pb_embedding``, ``label_enc``) and the two Swin names."""
  module, name = key.rsplit(".", 1)
  last = module.rsplit(".", 1)[-1]
  if "relative_position_bias_table" in name or "absolute_pos_embed" in name:
    return True
  if re.fullmatch(r"norm\d*|decoder_norm", last):
    return True
  if re.search(r"pixel_decoder\.input_proj\.\d+\.1$", module):
    return True
  return last in ("mask_tokens", "pb_embedding", "label_enc")


def test_no_decay_groups_match_reference_manifest():
  manifest = golden.require_golden() / "manifest_swinT.json"
  keys = json.loads(manifest.read_text())["keys"]
  params = ss.param_shapes(model_config("swin_t"))
  flat = traverse_util.flatten_dict(params)
  wd = traverse_util.flatten_dict(optim.weight_decay_mask(params, optim_config()))
  expected = {}
  for key in keys:
    if key.endswith(mapping.BUFFER_SUFFIXES):
      continue
    parts = mapping._path_parts(mapping.normalize_key(key))
    path, _ = mapping._to_leaf(parts, np.zeros((1,)), flat)
    assert path is not None, key
    expected[path] = 0.0 if _torch_no_decay(key) else 0.05
  assert set(expected) == set(flat)
  wrong = {"/".join(k): (wd[k], v) for k, v in expected.items() if wd[k] != v}
  assert not wrong
  assert sum(v == 0.0 for v in expected.values()) > 100   # really exercised


def test_backbone_lr_is_a_tenth():
  params = ss.param_shapes(model_config("swin_t"))
  mult = traverse_util.flatten_dict(optim.lr_multipliers(params, optim_config()))
  for k, m in mult.items():
    assert m == (0.1 if k[0] == "backbone" else 1.0), k


def test_schedule_values():
  c = optim_config()
  assert optim.lr_factor(0, c) == 1.0                 # WARMUP_FACTOR 1.0: no warm-up
  assert optim.lr_factor(c.warmup_iters, c) == 1.0
  assert optim.lr_factor(327777, c) == 1.0
  assert optim.lr_factor(327778, c) == pytest.approx(0.1)
  assert optim.lr_factor(355091, c) == pytest.approx(0.1)
  assert optim.lr_factor(355092, c) == pytest.approx(0.01)
  c2 = optim_config()
  c2.warmup_factor = 0.001
  assert optim.lr_factor(0, c2) == pytest.approx(0.001)
  assert optim.lr_factor(5, c2) == pytest.approx(0.001 * 0.5 + 0.5)
  assert optim.lr_factor(10, c2) == 1.0


def test_clipping_at_global_norm():
  g = {"a": jnp.full((4,), 3.0), "b": jnp.full((2, 2), 4.0)}
  tx = optim.clip_by_global_norm_torch(0.01)
  out, _ = tx.update(g, tx.init(g))
  norm = float(optax_norm(out))
  assert norm == pytest.approx(0.01 * 10.0 / (10.0 + 1e-6), rel=1e-6)
  small = jax.tree.map(lambda x: x * 1e-4, g)
  out, _ = tx.update(small, tx.init(small))
  np.testing.assert_array_equal(out["a"], small["a"])


def optax_norm(t):
  return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(t)))


def _torch_adamw_step(p, g, lr, wd, b1=0.9, b2=0.999, eps=1e-8, step=1):
  """torch.optim.AdamW's update rule (first step, zero moments), numpy float64."""
  p = p * (1 - lr * wd)
  m = (1 - b1) * g
  v = (1 - b2) * g * g
  denom = np.sqrt(v) / np.sqrt(1 - b2 ** step) + eps
  return p - (lr / (1 - b1 ** step)) * m / denom


_GRAD_FILES = golden.train_grad_files() or [None]


@pytest.mark.parametrize("grads_file", _GRAD_FILES, ids=lambda p: (
    "missing" if p is None else f"{p.parent.name}/{p.name.removesuffix('_grads.npz')}"))
def test_one_adamw_step_equals_torch_rule_on_golden_grads(grads_file):
  if grads_file is None:
    golden._missing(f"{golden.golden_dir()}/train_*/*_grads.npz")
  model_dir = golden.model_dir_of(grads_file.parent)
  config = config_from_reference_yaml(model_dir / "config.yaml")
  from semsam_jax.convert import convert_checkpoint
  _, params = convert_checkpoint(model_dir / "model.pth", config=config)
  with np.load(grads_file) as z:
    grads = mapping.convert_state_dict({k: z[k] for k in z.files}, params)
  c = optim_config()
  tx = optim.make_optimizer(params, c)
  state = tx.init(params)
  upd, _ = jax.jit(tx.update)(grads, state, params)
  new = traverse_util.flatten_dict(jax.tree.map(lambda p, u: np.asarray(p + u), params, upd))
  # clip as torch (full model), then AdamW per group
  gflat = {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(grads).items()}
  total = np.sqrt(sum(np.sum(v * v) for v in gflat.values()))
  coef = min(1.0, 0.01 / (total + 1e-6))
  assert coef < 1.0
  pflat = traverse_util.flatten_dict(params)
  for k, p in pflat.items():
    key = "/".join(k)
    lr = 1e-4 * (0.1 if k[0] == "backbone" else 1.0)
    mod = k[:-1]
    no_decay = (mod + ("scale",) in pflat or k[-1] == "embedding"
                or "relative_position_bias_table" in key or "absolute_pos_embed" in key)
    ref = _torch_adamw_step(np.asarray(p, np.float64), gflat[k] * coef, lr,
                            0.0 if no_decay else 0.05)
    np.testing.assert_allclose(new[k], ref, rtol=1e-6, atol=1e-9, err_msg=key)


@pytest.mark.parametrize("name", ["swinT", "swinL"])
def test_solver_section_of_reference_yaml(name):
  from semsam_jax.convert.reference_config import optim_config_from_reference_yaml
  path = golden.REPO_ROOT / "tests" / "data" / f"semantic_sam_only_sa-1b_{name}.yaml"
  c = optim_config_from_reference_yaml(path)
  d = optim_config()
  for field in ("base_lr", "weight_decay", "weight_decay_norm", "weight_decay_embed", "clip_norm",
                "steps", "gamma", "warmup_factor", "warmup_iters", "warmup_method", "max_iter"):
    assert c[field] == d[field], field
  assert dict(c.lr_multiplier)["backbone"] == 0.1
