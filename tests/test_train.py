"""The training loop: sharded step == one device, exact resume, non-finite guard, init, train.py.

Everything runs a "micro" variant of configs/tiny.py (1 Swin block per stage,
1 encoder and 2 decoder layers, 64² crops, 2 prompts, 64 loss points) so the
step compiles fast; the compiled executables are shared between the tests
through a persistent compilation cache in a temporary directory.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from semsam_jax.training import init as init_lib
from semsam_jax.training import loop
from semsam_jax.training import state as state_lib
from semsam_jax.training.config import complete_config
from tests import golden, torch_writer

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("train_cache")
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(d / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield d
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def micro_overrides(data_cache) -> dict:
  return {
      "model.backbone.depths": (1, 1, 1, 1), "model.pixel_decoder.num_encoder_layers": 1,
      "model.decoder.num_layers": 2, "data.image_size": 64, "data.max_num_instance": 2,
      "data.max_masks_per_image": 8, "data.synthetic.image_size": 64,
      "data.synthetic.num_train_images": 16, "data.synthetic.num_heldout_images": 2,
      "data.synthetic.cache_dir": str(data_cache), "loss.train_num_points": 64,
      # Uniform mask-loss points only: the uncertainty top-k is discontinuous,
      # so float noise between meshes (~1e-7) can pick different points; the
      # sharded arithmetic is what the mesh test compares.
      "loss.importance_sample_ratio": 0.0, "optim.eps": 1.0,
      "batch_size": 8, "total_steps": 4, "checkpoint_every": 2, "progress_bar": False,
      "log_every": 1,
  }


def micro_config(data_cache, **extra):
  c = tiny.get_config()
  for k, v in {**micro_overrides(data_cache), **extra}.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    with node.unlocked():
      node[leaf] = v
  return complete_config(c)


def _flat(tree):
  return traverse_util.flatten_dict(dict(jax.device_get(tree)))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _fixed_match(pred_logits, tgt_labels, pred_boxes, tgt_boxes, target_valid, cfg):
  """Target t -> token t: the matcher without its discrete choice (see below)."""
  b, k, t = target_valid.shape
  return {"token": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, k, t))}


def _one_step(config, devices, batch, fixed_match=False):
  mesh, tx, abstract, shardings, step_fn = loop.build(config, devices)
  if fixed_match:
    from semsam_jax.losses import make_loss_fn
    from semsam_jax.training.step import make_step_fn
    step_fn = make_step_fn(make_loss_fn(config, matcher=_fixed_match), tx)
  state = loop.initial_state(config, tx, shardings, log=lambda m: None)
  bsh = state_lib.batch_shardings(mesh, state_lib.rules_of(config), batch)
  step = loop.jit_step(step_fn, shardings, bsh, mesh)
  gb = state_lib.global_batch(batch, bsh, config.batch_size)
  new_state, metrics = step(state, gb, np.float32(config.optim.base_lr))
  return new_state, jax.device_get(metrics), step, shardings, bsh


def test_fsdp_step_equals_single_device(cache_dir):
  if jax.device_count() < 8:
    pytest.skip("needs --xla_force_host_platform_device_count=8 (tests/conftest.py)")
  from semsam_jax.data import make_train_loader
  one = micro_config(cache_dir, **{"mesh.data": 1, "mesh.fsdp": 1})
  many = micro_config(cache_dir, **{"mesh.data": 2, "mesh.fsdp": 4})
  batch = next(iter(make_train_loader(one, process_index=0, process_count=1)))
  # The Hungarian matching of a random-init model is full of near-ties (its
  # six tokens predict almost the same masks), so float noise between meshes
  # (~1e-7) can flip assignments and move the loss by ~1e-3; the mesh
  # comparison therefore fixes the assignment (and uses uniform loss points).
  s1, m1, *_ = _one_step(one, jax.devices()[:1], batch, fixed_match=True)
  s8, m8, _, shardings, _ = _one_step(many, jax.devices()[:8], batch, fixed_match=True)
  assert np.isfinite(m1["loss"]) and bool(m1["finite"])
  assert _rel(m8["loss"], m1["loss"]) <= 1e-5
  # The loss agrees to ~1e-7 and the updated params (what issue 11 bounds at
  # 1e-5) to ~2e-9.  The gradient itself differs by ~2e-5 relative (measured
  # 2.2e-5 norm, 5.2e-5 update, 2026-12-03): float32 sums over the batch in
  # another order (the all-reduce of the sharded backward).  With XLA's
  # scatter-add backward of the point reads this was 2.7e-4; the native
  # point kernels' backward is deterministic per map.
  assert _rel(m8["grad_norm"], m1["grad_norm"]) <= 1e-4
  p1, p8 = _flat(s1.params), _flat(s8.params)
  p0 = _flat(loop.initial_state(one, *loop.build(one, jax.devices()[:1])[1:4:2],
                                log=lambda m: None).params)
  cat = lambda d, keys: np.concatenate([np.ravel(d[k]) for k in keys])
  keys = sorted(p1)
  # Updated params as a whole, and the updates themselves (optim.eps = 1 in
  # these tests keeps Adam's first step linear in the gradient, so float noise
  # in near-zero gradients is not blown up to +-lr).
  assert _rel(cat(p8, keys), cat(p1, keys)) <= 1e-5
  u1 = cat(p1, keys) - cat(p0, keys)
  u8 = cat(p8, keys) - cat(p0, keys)
  assert np.linalg.norm(u1) > 0
  assert _rel(u8, u1) <= 2e-4, _rel(u8, u1)   # the gradient's float32 noise, see above
  sharded = [k for k, v in traverse_util.flatten_dict(dict(s8.params)).items()
             if v.addressable_shards[0].data.shape != v.shape]
  assert len(sharded) > len(p8) // 3, len(sharded)
  for k in sharded:
    assert "fsdp" in jax.tree.leaves(tuple(traverse_util.flatten_dict(
        dict(shardings.params))[k].spec)), k
  # Adam moments follow their parameters' shardings.
  mu = s8.opt_state.inner_state[1].mu
  k = sharded[0]
  assert traverse_util.flatten_dict(dict(mu))[k].sharding == traverse_util.flatten_dict(
      dict(s8.params))[k].sharding


def test_resume_equals_uninterrupted_and_restores_on_other_mesh(cache_dir, tmp_path):
  mesh = {"mesh.data": 2, "mesh.fsdp": 4} if jax.device_count() >= 8 else {}
  config = micro_config(cache_dir, **mesh)
  full = loop.train(config, tmp_path / "full", log=lambda m: None)
  part1 = loop.train(config, tmp_path / "cut", stop_after=3, log=lambda m: None)
  assert part1.step == 3 and not part1.preempted
  part2 = loop.train(config, tmp_path / "cut", log=lambda m: None)
  assert part2.resumed_from == 3 and part2.step == 4
  hist = part1.history + part2.history
  assert [h["step"] for h in hist] == [1, 2, 3, 4]
  for a, b in zip(full.history, hist):
    assert a["example_ids"] == b["example_ids"]           # same data order
    for key in ("loss", "grad_norm", "loss_mask_dice_0", "loss_bbox_1"):
      assert _rel(b[key], a[key]) <= 1e-6, (a["step"], key, a[key], b[key])
  pf, pc = _flat(full.state.params), _flat(part2.state.params)
  assert max(_rel(pc[k], pf[k]) for k in pf) <= 1e-6
  # The JSON log of the resumed run has each step once.
  recs = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs] == [1, 2, 3, 4]
  # Every example of the 16-image epoch seen once in the first two steps.
  ids = sum((h["example_ids"] for h in full.history[:2]), [])
  assert sorted(ids) == list(range(16))
  # The step-4 checkpoint restores bit-exactly onto a one-device mesh.
  from semsam_jax.training.checkpoint import TrainCheckpointer
  from semsam_jax.data import make_train_loader
  one = micro_config(cache_dir, **{"mesh.data": 1, "mesh.fsdp": 1})
  m1, _, abstract, sh1, _ = loop.build(one, jax.devices()[:1])
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract, sh1)
  ck = TrainCheckpointer(tmp_path / "cut" / loop.CHECKPOINT_DIR, every=2, keep=3)
  restored, meta = ck.restore(4, target, iter(make_train_loader(one, process_index=0,
                                                                process_count=1)))
  ck.close()
  assert meta["batch_size"] == 8
  pr = _flat(restored.params)
  assert all(np.array_equal(pr[k], pc[k]) for k in pc)
  assert int(restored.step) == 4
  # The export loads with the predictor's loader.
  from semsam_jax.convert.checkpoint import load_checkpoint
  cfg, exported = load_checkpoint(tmp_path / "full" / loop.EXPORT_DIR)
  assert cfg.backbone.depths == (1, 1, 1, 1)
  pe = _flat(exported)
  assert all(np.array_equal(pe[k], pf[k]) for k in pf)


def test_nonfinite_step_skipped_counted_and_k_in_a_row_stop(cache_dir, tmp_path):
  from semsam_jax.data import make_train_loader
  config = micro_config(cache_dir, **{"mesh.data": 1, "mesh.fsdp": 1})
  batch = next(iter(make_train_loader(config, process_index=0, process_count=1)))
  mesh, tx, abstract, shardings, step_fn = loop.build(config, jax.devices()[:1])
  state = loop.initial_state(config, tx, shardings, log=lambda m: None)
  before = _flat(state.params), jax.tree.leaves(jax.device_get(state.opt_state))
  bsh = state_lib.batch_shardings(mesh, state_lib.rules_of(config), batch)
  step = loop.jit_step(step_fn, shardings, bsh, mesh)
  gb = state_lib.global_batch(loop.inject_nan(batch), bsh, config.batch_size)
  state, m = step(state, gb, np.float32(1e-3))
  assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
  assert int(state.skipped_steps) == 1 and int(state.bad_steps) == 1 and int(state.step) == 1
  after = _flat(state.params)
  assert all(np.array_equal(after[k], before[0][k]) for k in after)
  opt_after = jax.tree.leaves(jax.device_get(state.opt_state))
  assert all(np.array_equal(a, b) for a, b in zip(opt_after, before[1]))

  # In the loop: one bad step is skipped, counted and logged; the run goes on.
  c1 = micro_config(cache_dir, **{"mesh.data": 1, "mesh.fsdp": 1, "total_steps": 3,
                                  "max_consecutive_bad_steps": 2})
  with c1.unlocked():
    c1.debug = {"nan_steps": (1,)}
  r = loop.train(c1, tmp_path / "one_bad", devices=jax.devices()[:1], log=lambda m: None)
  assert [h["finite"] for h in r.history] == [True, False, True]
  assert int(r.state.skipped_steps) == 1 and int(r.state.bad_steps) == 0
  recs = [json.loads(l) for l in (tmp_path / "one_bad" / "metrics.jsonl").read_text().splitlines()]
  assert recs[1]["finite"] is False and recs[1]["skipped_steps"] == 1.0
  # K = 2 in a row: a clear error.
  with c1.unlocked():
    c1.debug = {"nan_steps": (0, 1)}
  with pytest.raises(loop.NonFiniteError, match="2 consecutive steps"):
    loop.train(c1, tmp_path / "two_bad", devices=jax.devices()[:1], log=lambda m: None)


def _tiny_a_config(cache_dir):
  from semsam_jax.convert.reference_config import config_from_reference_yaml
  d = golden.require_golden() / "tiny_a"
  c = micro_config(cache_dir)
  c.model = config_from_reference_yaml(str(d / "config.yaml"))
  return c, d


def test_init_from_converted_pth_and_orbax_dir(cache_dir, tmp_path):
  from semsam_jax.convert import convert_checkpoint, save_checkpoint
  c, d = _tiny_a_config(cache_dir)
  _, expected = convert_checkpoint(str(d / "model.pth"), reference_config=str(d / "config.yaml"))
  with c.unlocked():
    c.init.checkpoint = str(d / "model.pth")
    c.init.reference_config = str(d / "config.yaml")
  got = init_lib.initial_params(c, jax.random.PRNGKey(0), log=lambda m: None)
  fe, fg = _flat(expected), _flat(got)
  assert set(fe) == set(fg) and all(np.array_equal(fg[k], fe[k]) for k in fe)
  save_checkpoint(tmp_path / "conv", expected, c.model)
  c.init.reference_config = None
  c.init.checkpoint = str(tmp_path / "conv")
  fo = _flat(init_lib.initial_params(c, jax.random.PRNGKey(0), log=lambda m: None))
  assert all(np.array_equal(fo[k], fe[k]) for k in fe)
  # A model that does not fit: every offending parameter is named.
  c.model.decoder.dim_feedforward = 96
  with pytest.raises(init_lib.InitError, match="shape mismatch") as e:
    init_lib.initial_params(c, jax.random.PRNGKey(0), log=lambda m: None)
  assert "linear1/kernel" in str(e.value)


def _imagenet_state_dict(d):
  """The tiny_a backbone in the ImageNet Swin release layout (swin_tiny_patch4_window7_224)."""
  from semsam_jax.convert import load_state_dict
  sd = load_state_dict(str(d / "model.pth"))
  out = {}
  rng = np.random.default_rng(0)
  for k, v in sd.items():
    if not k.startswith("model.backbone."):
      continue
    k = k[len("model.backbone."):]
    if k.split(".")[0] in ("norm0", "norm1", "norm2", "norm3"):
      continue
    out[k] = np.asarray(v)
  c = out["layers.3.blocks.0.norm1.weight"].shape[0]
  out["norm.weight"] = rng.normal(size=(c,)).astype(np.float32)
  out["norm.bias"] = rng.normal(size=(c,)).astype(np.float32)
  out["head.weight"] = rng.normal(size=(1000, c)).astype(np.float32)
  out["head.bias"] = np.zeros((1000,), np.float32)
  out["layers.0.blocks.1.attn_mask"] = np.zeros((4, 49, 49), np.float32)
  return out


def test_init_backbone_from_imagenet_swin(cache_dir, tmp_path):
  from semsam_jax.convert import convert_checkpoint
  c, d = _tiny_a_config(cache_dir)
  sd = _imagenet_state_dict(d)
  assert any(k.endswith("relative_position_index") for k in sd)
  path = tmp_path / "swin_tiny_imagenet.pth"
  torch_writer.save_zip({"model": sd}, path)
  with c.unlocked():
    c.init.backbone = str(path)
  got = _flat(init_lib.initial_params(c, jax.random.PRNGKey(0), log=lambda m: None))
  _, conv = convert_checkpoint(str(d / "model.pth"), reference_config=str(d / "config.yaml"))
  conv = _flat(conv)
  scratch = _flat(init_lib.initial_params(
      micro_config(cache_dir, model=c.model), jax.random.PRNGKey(0), log=lambda m: None))
  bb = [k for k in conv if k[0] == "backbone" and not k[1].startswith("norm")]
  assert len(bb) > 40
  assert all(np.array_equal(got[k], conv[k]) for k in bb)       # every ImageNet tensor used
  rest = [k for k in conv if k not in bb]
  assert all(np.array_equal(got[k], scratch[k]) for k in rest)  # the rest from scratch
  # Strict: an unknown key and a missing key are both named.
  bad = dict(sd)
  bad["layers.0.blocks.0.extra.weight"] = np.zeros((3,), np.float32)
  del bad["layers.1.blocks.0.mlp.fc1.weight"]
  torch_writer.save_zip({"model": bad}, tmp_path / "bad.pth")
  c.init.backbone = str(tmp_path / "bad.pth")
  with pytest.raises(init_lib.InitError) as e:
    init_lib.initial_params(c, jax.random.PRNGKey(0), log=lambda m: None)
  msg = str(e.value)
  assert "layers.0.blocks.0.extra.weight" in msg and "layers_1/blocks_0/mlp/fc1/kernel" in msg


def test_train_py_end_to_end_and_resume(cache_dir, tmp_path):
  work = tmp_path / "run"
  flags = [f"--config.{k}={v}" for k, v in micro_overrides(cache_dir).items()
           if k not in ("total_steps", "data.synthetic.cache_dir")]
  env = dict(os.environ, SEMSAM_DATA_CACHE=str(cache_dir), JAX_COMPILATION_CACHE_DIR=str(cache_dir / "xla"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=2")

  def run(steps):
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny.py"),
           "--workdir", str(work), f"--config.total_steps={steps}", *flags,
           "--config.mesh.data=1", "--config.mesh.fsdp=2"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == 0, p.stderr[-4000:]
    return p

  run(2)
  assert (work / "checkpoints" / "2" / "state").is_dir()
  assert list((work / "tensorboard").glob("events.out.tfevents.*"))
  recs = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs] == [1, 2] and all(np.isfinite(r["loss"]) for r in recs)
  assert {"loss_mask_bce_0", "grad_norm", "images_per_s", "data_wait_s",
          "skipped_steps", "lr"} <= set(recs[0])
  assert (work / "export" / "config.json").is_file()
  p = run(3)
  assert "resumed from" in p.stdout + p.stderr
  recs = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs] == [1, 2, 3]
  assert sorted(int(s.name) for s in (work / "checkpoints").iterdir() if s.name.isdigit()) == [2, 3]


def _count_primitive(jaxpr, name: str) -> int:
  from jax._src import core
  n = 0
  for e in jaxpr.eqns:
    n += e.primitive.name == name
    n += sum(_count_primitive(sub, name) for sub in core.jaxprs_in_params(e.params))
  return n


def test_remat_choices_same_loss_and_gradients_and_in_the_jaxpr(cache_dir):
  """model.remat at each granularity: the jaxpr of loss + gradient holds one
  remat region (primitive ``remat2``, jax.checkpoint) per rematerialised
  module, and the loss and gradients equal those without remat."""
  from semsam_jax.config import remat_granularities
  from semsam_jax.data import make_train_loader
  from semsam_jax.losses import make_loss_fn
  from semsam_jax.models import semantic_sam as ss
  over = {"mesh.data": 1, "mesh.fsdp": 1, "batch_size": 2,
          "model.pixel_decoder.num_encoder_layers": 2}
  base = micro_config(cache_dir, **over)
  batch = next(iter(make_train_loader(base, process_index=0, process_count=1)))
  params = ss.init_params(base.model, jax.random.PRNGKey(0))
  # micro model: 4 Swin stages of 1 block, 2 encoder layers, 2 decoder layers.
  expected = {"none": 0, "block": 4, "stage": 4, "encoder_layer": 2, "decoder_layer": 2,
              # Nested: 4 stages + 4 blocks in the forward pass + the 4 blocks
              # again in the stages' recomputation for the backward pass.
              "block+stage": 12, "stage,encoder_layer,decoder_layer": 8,
              "block+encoder_layer": 6}

  def value_and_grad(remat):
    c = micro_config(cache_dir, **over, **{"model.remat": remat})
    loss_fn = make_loss_fn(c)
    return c, jax.value_and_grad(
        lambda p: loss_fn(p, batch, jax.random.PRNGKey(1), deterministic=False)[0])

  for remat, n in expected.items():
    c, fn = value_and_grad(remat)
    assert _count_primitive(jax.make_jaxpr(fn)(params).jaxpr, "remat2") == n, remat
    # Same parameter tree (remat adds no scope).
    assert jax.tree.structure(ss.param_shapes(c.model)) == jax.tree.structure(params)
  # Gradients (drop path active: deterministic=False, rate 0.1).
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
  loss0, g0 = jax.jit(value_and_grad("none")[1])(params)
  g0 = flat(g0)
  assert np.isfinite(float(loss0)) and np.linalg.norm(g0) > 0
  for remat in ("block", "stage", "encoder_layer+decoder_layer"):
    loss, g = jax.jit(value_and_grad(remat)[1])(params)
    assert abs(float(loss) - float(loss0)) <= 1e-6 * abs(float(loss0)), remat
    assert _rel(flat(g), g0) <= 1e-6, (remat, _rel(flat(g), g0))
  # The legacy spelling and bad values.
  legacy = micro_config(cache_dir, **over, **{"model.backbone.remat": True})
  assert remat_granularities(legacy.model) == {"block"}
  with pytest.raises(ValueError, match="unknown granularity"):
    remat_granularities(micro_config(cache_dir, **over, **{"model.remat": "layer"}).model)
  with pytest.raises(ValueError, match="remat_policy"):
    ss.init_params(micro_config(cache_dir, **over, **{"model.remat": "block",
                                                      "model.remat_policy": "all"}).model,
                   jax.random.PRNGKey(0))
