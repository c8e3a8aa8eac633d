"""PyTorch checkpoint -> Flax params: the released architectures (from the key
manifests), the golden tiny model end to end (files, orbax round trip, CLI), and
clear errors for checkpoints that do not fit."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import semsam_swinl, semsam_swint
from semsam_jax.convert import (ConversionError, config_from_reference_yaml, convert_checkpoint,
                                convert_state_dict, load_checkpoint, load_state_dict,
                                save_checkpoint)
from semsam_jax.models import semantic_sam
from tests import golden
from tests import torch_writer as tw

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL_DIRS = golden.model_dirs() or [None]


def _model_dir(d):
  if d is None:
    golden.require_golden()
    pytest.skip("no tiny_* model folders in the golden data")
  return d


_PARAM_SHAPES = semantic_sam.param_shapes


@functools.lru_cache(maxsize=None)
def _shapes(frozen_cfg):
  return _PARAM_SHAPES(frozen_cfg)


@pytest.fixture(autouse=True)
def _cache_param_shapes(monkeypatch):
  """convert_checkpoint evaluates the init shapes each call; share them here."""
  monkeypatch.setattr(semantic_sam, "param_shapes",
                      lambda cfg: _shapes(ml_collections.FrozenConfigDict(cfg)))


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree))


def _assert_matches_init_tree(params, shapes):
  fp, fs = _flat(params), _flat(shapes)
  assert sorted(fp) == sorted(fs)
  for k, s in fs.items():
    assert tuple(fp[k].shape) == tuple(s.shape), k
    assert np.dtype(fp[k].dtype) == np.dtype(s.dtype) == np.float32, k


def _relative_position_index(window):
  """Swin's relative position index, computed independently of the converter."""
  idx = np.empty((window * window, window * window), np.int64)
  for a in range(window * window):
    for b in range(window * window):
      dy = a // window - b // window + window - 1
      dx = a % window - b % window + window - 1
      idx[a, b] = dy * (2 * window - 1) + dx
  return idx


# --------------------------------------------------------------------------
# Released architectures, from the key/shape manifests (no weights needed).

@pytest.mark.parametrize("name,module,window", [("swinT", semsam_swint, 7),
                                                ("swinL", semsam_swinl, 12)])
def test_release_manifest_maps_exactly(name, module, window):
  manifest = json.loads((golden.require_golden() / f"manifest_{name}.json").read_text())
  index = _relative_position_index(window)
  state_dict, buffer_elems = {}, 0
  for key, spec in manifest["keys"].items():
    shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    if key.endswith("relative_position_index"):
      assert shape == index.shape
      state_dict[key] = index.astype(dtype)
      buffer_elems += index.size
    else:  # zero-cost zeros: a broadcast view, never materialised
      state_dict[key] = np.broadcast_to(np.zeros((), dtype), shape)
  assert len(state_dict) == manifest["num_keys"]

  shapes = _shapes(ml_collections.FrozenConfigDict(module.get_config().model))
  params = convert_state_dict(state_dict, shapes)  # raises on any missing/unexpected key
  _assert_matches_init_tree(params, shapes)
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  # The manifest counts tied tensors once and includes the (recomputed) buffers.
  assert n + buffer_elems == manifest["num_params_unique"]
  assert n == {"swinT": 52_980_543, "swinL": 222_799_161}[name]


# --------------------------------------------------------------------------
# The golden tiny model(s).

@pytest.fixture(scope="module", params=MODEL_DIRS,
                ids=[d.name if d else "missing" for d in MODEL_DIRS])
def tiny(request):
  d = _model_dir(request.param)
  cfg = config_from_reference_yaml(d / "config.yaml")
  shapes = _shapes(ml_collections.FrozenConfigDict(cfg))
  state_dict = load_state_dict(d / "model.pth")
  params = convert_state_dict(state_dict, shapes)
  return d, cfg, shapes, state_dict, params


def test_tiny_converts_via_public_entry_point(tiny):
  d, cfg, shapes, sd, expected = tiny
  config, params = convert_checkpoint(d / "model.pth", reference_config=d / "config.yaml")
  assert config == cfg
  _assert_matches_init_tree(params, shapes)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
  # Layouts: Linear weights are transposed, convolutions OIHW -> HWIO.
  w = sd["model.backbone.patch_embed.proj.weight"]
  np.testing.assert_array_equal(params["backbone"]["patch_embed"]["proj"]["kernel"],
                                w.transpose(2, 3, 1, 0))
  w = sd["model.sem_seg_head.predictor.decoder.layers.0.linear1.weight"]
  np.testing.assert_array_equal(
      params["predictor"]["decoder"]["layers_0"]["linear1"]["kernel"], w.T)
  # Same result from one of our configs instead of the YAML.
  full = ml_collections.ConfigDict({"model": cfg.to_dict()})
  config2, params2 = convert_checkpoint(d / "model.pth", config=full)
  assert config2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, expected)
  with pytest.raises(ValueError, match="exactly one"):
    convert_checkpoint(d / "model.pth")


def test_wrapped_unprefixed_and_legacy_files_give_same_params(tiny, tmp_path):
  d, cfg, _, sd, expected = tiny
  files = {
      "wrapped": lambda p: tw.save_zip({"model": sd}, p),
      "unprefixed": lambda p: tw.save_zip({k[len("model."):]: v for k, v in sd.items()}, p),
      "legacy": lambda p: tw.save_legacy(sd, p),
      "legacy_wrapped": lambda p: tw.save_legacy({"model": sd}, p),
  }
  for name, write in files.items():
    path = tmp_path / f"{name}.pth"
    write(path)
    _, params = convert_checkpoint(path, config=cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)


def _convert_edited(tmp_path, cfg, sd, edit):
  sd = dict(sd)
  edit(sd)
  path = tmp_path / "edited.pth"
  tw.save_zip(sd, path)
  with pytest.raises(ConversionError) as info:
    convert_checkpoint(path, config=cfg)
  return info.value, str(info.value)


def test_missing_key_is_named(tiny, tmp_path):
  _, cfg, _, sd, _ = tiny
  err, msg = _convert_edited(
      tmp_path, cfg, sd, lambda s: s.pop("model.sem_seg_head.predictor.mask_tokens.weight"))
  assert err.missing == ["predictor/mask_tokens/embedding"]
  assert "1 parameter(s) missing" in msg and "predictor/mask_tokens/embedding" in msg
  assert not err.unexpected and not err.mismatched


def test_shape_mismatch_names_key_and_both_shapes(tiny, tmp_path):
  _, cfg, _, sd, _ = tiny
  key = "model.sem_seg_head.pixel_decoder.mask_features.weight"
  good = sd[key].shape

  def edit(s):
    s[key] = np.zeros((good[0] + 1,) + good[1:], np.float32)

  err, msg = _convert_edited(tmp_path, cfg, sd, edit)
  assert len(err.mismatched) == 1 and key in err.mismatched[0]
  bad_shape = str((good[0] + 1,) + good[1:])
  want = str(tuple(good[2:]) + (good[1], good[0]))  # HWIO
  assert bad_shape in msg and want in msg
  # Reported once, as mis-shaped (not also as missing); nothing is filled.
  assert "pixel_decoder/mask_features/kernel" not in err.missing and not err.missing
  assert sum("mask_features" in line for line in msg.splitlines()) == 1
  assert "missing" not in msg


def test_unexpected_key_is_named(tiny, tmp_path):
  _, cfg, _, sd, _ = tiny
  key = "model.sem_seg_head.predictor.extra_head.weight"
  err, msg = _convert_edited(tmp_path, cfg, sd,
                             lambda s: s.__setitem__(key, np.zeros((2, 2), np.float32)))
  assert err.unexpected == [key] and key in msg and not err.missing


def test_tied_tensors_must_agree(tiny, tmp_path):
  _, cfg, _, sd, _ = tiny
  tied = sorted(k for k in sd if k.startswith("model.sem_seg_head.predictor.bbox_embed.")
                and k.endswith("layers.0.weight"))
  assert len(tied) >= 2

  def edit(s):
    s[tied[-1]] = s[tied[-1]] + 1.0

  _, msg = _convert_edited(tmp_path, cfg, sd, edit)
  assert "tied tensors differ" in msg and tied[-1] in msg


def test_wrong_buffer_is_reported(tiny, tmp_path):
  _, cfg, _, sd, _ = tiny
  key = next(k for k in sd if k.endswith("relative_position_index"))

  def edit(s):
    s[key] = s[key][::-1].copy()

  _, msg = _convert_edited(tmp_path, cfg, sd, edit)
  assert key in msg and "relative_position_index differs" in msg


def test_orbax_round_trip_and_sharded_restore(tiny, tmp_path):
  _, cfg, _, _, expected = tiny
  out = save_checkpoint(tmp_path / "ck", expected, cfg)
  config, params = load_checkpoint(out)
  assert config == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)

  if jax.device_count() < 8:
    pytest.skip("needs 8 devices for the sharded restore")
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

  def shard_first_axis(path, sds):
    if sds.shape and sds.shape[0] % 8 == 0:
      return NamedSharding(mesh, P("x"))
    return NamedSharding(mesh, P())

  _, params = load_checkpoint(out, sharding=shard_first_axis)
  flat, exp = _flat(params), _flat(expected)
  sharded = 0
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(v), exp[k])
    assert v.sharding.mesh == mesh
    sharded += v.sharding.spec == P("x")
  assert sharded > len(flat) // 2


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "semsam_jax.convert", *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(tiny, tmp_path):
  d, cfg, _, _, expected = tiny
  out = tmp_path / "ck"
  r = _run_cli("--torch-checkpoint", d / "model.pth", "--reference-config", d / "config.yaml",
               "--output", out)
  assert r.returncode == 0, r.stderr
  n_tensors = len(jax.tree_util.tree_leaves(expected))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(expected))
  assert f"{n_tensors} tensors, {n_params:,} parameters" in r.stdout
  assert str(out) in r.stdout
  config, params = load_checkpoint(out)
  assert config == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)

  # Existing output: refused without --overwrite, replaced with it.
  r = _run_cli("--torch-checkpoint", d / "model.pth", "--reference-config", d / "config.yaml",
               "--output", out)
  assert r.returncode != 0 and "already exists" in r.stderr and "Traceback" not in r.stderr

  # --config with a python config file.
  py = tmp_path / "tiny_config.py"
  py.write_text(
      "import ml_collections\n"
      "from semsam_jax.convert import config_from_reference_yaml\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      f"  c.model = config_from_reference_yaml({str(d / 'config.yaml')!r})\n"
      "  return c\n")
  r = _run_cli("--torch-checkpoint", d / "model.pth", "--config", py, "--output", out,
               "--overwrite")
  assert r.returncode == 0, r.stderr
  jax.tree_util.tree_map(np.testing.assert_array_equal, load_checkpoint(out)[1], expected)


def test_cli_errors_are_short(tiny, tmp_path):
  d = tiny[0]
  # The tiny weights do not fit the SwinT architecture.
  r = _run_cli("--torch-checkpoint", d / "model.pth", "--config", REPO / "configs/semsam_swint.py",
               "--output", tmp_path / "ck")
  assert r.returncode == 1
  # Formatted like the main CLI (``error: <file>: ...``, no exception class).
  assert r.stderr.startswith(f"error: {d / 'model.pth'}: checkpoint does not match")
  assert "ConversionError" not in r.stderr and "parameter(s) missing" in r.stderr
  assert "more lines)" in r.stderr and "hint:" in r.stderr  # long lists are cut
  assert len(r.stderr.splitlines()) < 50
  assert "Traceback" not in r.stderr and not (tmp_path / "ck").exists()
  r = _run_cli("--torch-checkpoint", tmp_path / "missing.pth", "--reference-config",
               d / "config.yaml", "--output", tmp_path / "ck")
  assert r.returncode == 1 and r.stderr == f"error: file not found: {tmp_path / 'missing.pth'}\n"
  (tmp_path / "junk.pth").write_bytes(b"junk")
  r = _run_cli("--torch-checkpoint", tmp_path / "junk.pth", "--reference-config",
               d / "config.yaml", "--output", tmp_path / "ck")
  assert r.returncode == 1 and r.stderr.startswith(f"error: {tmp_path / 'junk.pth'}: ")
  assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
  assert not (tmp_path / "ck").exists()


def test_cli_help():
  r = _run_cli("--version")
  assert r.returncode == 0 and r.stdout.startswith("semsam_jax ")
  r = _run_cli("--help")
  assert r.returncode == 0
  for opt in ("--torch-checkpoint", "--reference-config", "--config", "--output", "--overwrite"):
    assert opt in r.stdout
  r = _run_cli("--torch-checkpoint", "x.pth", "--output", "y")  # no architecture given
  assert r.returncode == 2 and "--reference-config" in r.stderr
