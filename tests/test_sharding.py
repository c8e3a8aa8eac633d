"""Sharded execution over 8 virtual CPU devices equals the unsharded model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsam_jax import sharding as sh
from semsam_jax.convert.reference_config import config_from_reference_yaml
from semsam_jax.models import semantic_sam as ss
from tests import golden


@pytest.fixture(scope="module")
def tiny():
  dirs = golden.model_dirs()
  if not dirs:
    golden.require_golden()
    pytest.fail("no tiny_* model folder in the golden data")
  config = config_from_reference_yaml(dirs[0] / "config.yaml")
  params = ss.init_params(config, jax.random.PRNGKey(0))
  return config, params


def test_spec_replicates_indivisible_dims():
  mesh = sh.make_mesh({"data": 2, "fsdp": 4})
  rules = sh.RULES["fsdp"]
  assert sh.spec_for(("embed", "mlp"), (96, 384), mesh, rules) == jax.P("fsdp", None)
  assert sh.spec_for(("embed", "mlp"), (6, 384), mesh, rules) == jax.P(None, None)
  assert sh.spec_for((None, None, "conv_in", "conv_out"), (3, 3, 3, 64), mesh, rules) == \
      jax.P(None, None, None, "fsdp")


@pytest.mark.parametrize("mode", ["data_parallel", "fsdp"])
def test_sharded_forward_equals_unsharded(tiny, mode):
  assert jax.device_count() >= 8, "tests/conftest.py should provide 8 CPU devices"
  config, params = tiny
  mesh = sh.make_mesh({"data": 2, "fsdp": 4}, jax.devices()[:8])
  rules = sh.RULES[mode]
  shardings = sh.param_shardings(config, mesh, rules)
  assert jax.tree.structure(shardings) == jax.tree.structure(params)
  sharded = jax.device_put(params, shardings)
  if mode == "fsdp":
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    assert any("fsdp" in tuple(s) for s in specs), "FSDP rules should shard some params"

  model = ss.SemanticSAM(ss.freeze_config(config))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((8, 64, 96, 3)), jnp.float32)
  boxes = jnp.asarray(rng.uniform(0.2, 0.8, (8, 2, 4)) * [1, 1, 0.1, 0.1], jnp.float32)
  pb = jnp.zeros((8, 2), jnp.int32)
  fn = lambda p, x, b, q: model.apply({"params": p}, x, b, q, return_aux=False)
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(fn)(params, images, boxes, pb)
    x_s = jax.device_put(images, sh.data_sharding(mesh, rules))
    b_s = jax.device_put(boxes, sh.data_sharding(mesh, rules, ndim=3))
    q_s = jax.device_put(pb, sh.data_sharding(mesh, rules, ndim=2))
    out = jax.jit(fn)(sharded, x_s, b_s, q_s)
  assert len(out["pred_masks"].sharding.device_set) == 8
  for k in ("pred_masks", "pred_boxes", "pred_ious"):
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-4, atol=1e-5)
