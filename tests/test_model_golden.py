"""End-to-end parity with the original PyTorch model on every golden case.

Each ``tiny_*/model.pth`` is converted with its original YAML through the
public entry point, then every recorded intermediate of every ``case_*.npz`` is
compared: normalised/padded input, backbone features, pixel decoder outputs,
decoder prompt boxes, final-layer and auxiliary predictions, and the
upsampled ``final_masks`` / ``final_ious`` of the selected tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsam_jax.convert import convert_checkpoint
from semsam_jax.models.deformable_attention import MSDA_IMPLS
from semsam_jax.models import semantic_sam as ss
from tests import golden

TOL = 1e-5
CASES = golden.cases_or_missing("case_*.npz")


@functools.lru_cache(maxsize=None)
def _converted(model_dir: str):
  import pathlib
  d = pathlib.Path(model_dir)
  return convert_checkpoint(d / "model.pth", reference_config=d / "config.yaml")


def _check(name, actual, expected, sign=False):
  err = golden.rel_l2(actual, expected)
  assert err <= TOL, f"{name}: relative L2 error {err:.3g} > {TOL}"
  if sign:
    agree = np.mean((np.asarray(actual) > 0) == (np.asarray(expected) > 0))
    assert agree >= 0.9999, f"{name}: mask-logit signs agree on only {agree:.6f}"


@pytest.fixture(scope="module", params=CASES, ids=golden.param_ids([c for c in CASES if c]))
def case(request):
  data = golden.load_npz(request.param)
  config, params = _converted(str(request.param.parent))
  return data, config, params


def _run_all(config, params, data):
  """Runs the model part by part (each part jit-compiled), returning every intermediate."""
  model = ss.SemanticSAM(ss.freeze_config(config))
  v = {"params": params}
  image = jnp.asarray(data["image_u8"])[None]
  h, w = image.shape[1:3]
  pad_hw = ss.padded_size(h, w, config.size_divisibility)
  x = ss.normalize_and_pad(image, config.pixel_mean, config.pixel_std, pad_hw)
  feats = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.backbone(x)))(v, x)
  mask_features, multi_scale = jax.jit(lambda v, f: model.apply(
      v, f, method=lambda m, f: m.pixel_decoder(f)))(v, feats)
  is_box = bool(data["prompt_is_box"])
  boxes, pb = ss.prompts_to_boxes(jnp.asarray(data["points"])[None], is_box, (h, w), pad_hw)
  emb = {"mask_features": mask_features, "multi_scale_features": list(multi_scale)}
  out = jax.jit(lambda v, e, b, p: model.apply(
      v, e, b, p, None, return_aux=True, method=ss.SemanticSAM.decode))(v, emb, boxes, pb)
  return x, feats, mask_features, multi_scale, boxes, out


def test_intermediates_match_reference(case):
  data, config, params = case
  with jax.default_matmul_precision("highest"):
    x, feats, mask_features, multi_scale, boxes, out = _run_all(config, params, data)
  _check("image_normalized_padded", x, golden.nchw_to_nhwc(data["image_normalized_padded"]))
  for k in ("res2", "res3", "res4", "res5"):
    _check(f"backbone_{k}", feats[k], golden.nchw_to_nhwc(data[f"backbone_{k}"]))
  _check("mask_features", mask_features, golden.nchw_to_nhwc(data["mask_features"]))
  for i, f in enumerate(multi_scale):
    _check(f"multi_scale_{i}", f, golden.nchw_to_nhwc(data[f"multi_scale_{i}"]))
  np.testing.assert_allclose(np.asarray(boxes[0]), data["decoder_points"], rtol=1e-6, atol=1e-7)

  n, t = data["pred_ious"].shape[1:]
  def flat(o):
    hh, ww = o["pred_masks"].shape[-2:]
    return (np.asarray(o["pred_masks"]).reshape(1, n * t, hh, ww),
            np.asarray(o["pred_boxes"]).reshape(1, n * t, 4),
            np.asarray(o["pred_ious"]))
  m, b, i = flat(out)
  _check("pred_masks", m, data["pred_masks"], sign=True)
  _check("pred_boxes", b, data["pred_boxes"])
  _check("pred_ious", i, data["pred_ious"])
  aux_keys = sorted({k.split("_")[0] for k in data if k.startswith("aux")})
  assert len(out["aux_outputs"]) == len(aux_keys)
  for k, aux in zip(aux_keys, out["aux_outputs"]):
    m, b, i = flat(aux)
    _check(f"{k}_pred_masks", m, data[f"{k}_pred_masks"], sign=True)
    _check(f"{k}_pred_boxes", b, data[f"{k}_pred_boxes"])
    _check(f"{k}_pred_ious", i, data[f"{k}_pred_ious"])


@pytest.mark.parametrize("impl", sorted(MSDA_IMPLS))
def test_jitted_forward_matches_final_outputs(case, impl):
  """The single jit-compiled pure function reproduces evaluate_demo's result,
  with every deformable attention implementation."""
  data, config, params = case
  config = config.copy_and_resolve_references()
  config.msda_impl = impl
  levels = tuple(int(l) for l in data["levels"])
  fwd = ss.forward_fn(config, tokens=levels, return_aux=False)
  with jax.default_matmul_precision("highest"):
    out = fwd(params, jnp.asarray(data["image_u8"]), jnp.asarray(data["points"]),
              bool(data["prompt_is_box"]))
  h, w = data["image_u8"].shape[:2]
  masks = np.asarray(out["masks"]).reshape(-1, h, w)
  _check("final_masks", masks, data["final_masks"], sign=True)
  _check("final_ious", out["ious"], data["final_ious"])
  assert "aux_outputs" not in out or not out["aux_outputs"]


@pytest.mark.parametrize("chunks", [(0, 0), (300, 200)], ids=["unchunked", "small-chunks"])
def test_token_chunking_does_not_change_results(case, chunks):
  """The default chunk sizes (golden-checked above) against no chunking and
  small chunks that need padding (Swin windows and memory tokens that do not
  divide evenly): the embedding is the same function (up to the summation
  order of differently blocked matrix products)."""
  data, config, params = case
  image = jnp.asarray(data["image_u8"])[None]
  pad_hw = ss.padded_size(*image.shape[1:3], config.size_divisibility)
  x = ss.normalize_and_pad(image, config.pixel_mean, config.pixel_std, pad_hw)

  def embed(cfg):
    model = ss.SemanticSAM(ss.freeze_config(cfg))
    with jax.default_matmul_precision("highest"):
      return jax.jit(lambda p, x: model.apply({"params": p}, x,
                                              method=ss.SemanticSAM.embed_image))(params, x)

  other = config.copy_and_resolve_references()
  other.backbone_token_chunk, other.memory_token_chunk = chunks
  ref, got = embed(config), embed(other)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(ref),
                        jax.tree.leaves(got)):
    err = golden.rel_l2(b, a)
    assert err <= 5e-6, f"{jax.tree_util.keystr(path[0])}: {err:.3g}"  # summation order only
