"""The training objective against recorded training steps of the original code.

Every ``train_*/ex*.npz`` of the golden folder is one training step of the
original PyTorch Semantic-SAM (model in ``train()`` mode, see the folder's
README).  The step is replayed here with the recorded draws (drop-path keep
masks, DN noise, matcher points, mask-loss points: semsam_jax/losses/replay.py)
through :func:`semsam_jax.losses.make_objective`, in ONE jit-compiled
``value_and_grad`` per case, and compared stage by stage:

* prompts: boxes before / after the DN noise, pb, level-target boxes, the
  block-diagonal self-attention mask;
* the training-mode decoder outputs of every layer (rel. L2 <= 1e-5);
* the matcher: sampled point logits / labels, every cost term on the valid
  pairs (<= 1e-5), the indices exactly;
* per layer: mask-loss point coordinates, logits, labels, per-pair dice and
  IoU terms; every loss term raw and weighted, the normaliser and the total
  (<= 1e-5 relative);
* gradients: d total / d each layer's outputs, and d total / d every
  parameter by reference state-dict key through the converter's mapping
  (rel. L2 <= 1e-4 per tensor, <= 1e-5 over all); tensors whose reference
  gradient is identically zero must be identically zero here.

Case settings come from the case folder: ``meta.json`` names the model folder
(its ``config.yaml`` is read with ``meta["overrides"]`` applied) and the
number of decoder layers; nothing is specific to ``train_a``.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from semsam_jax.convert import convert_checkpoint, mapping
from semsam_jax.convert.reference_config import load_reference_yaml
from semsam_jax.losses import loss_config_from_reference, make_objective, replay
from semsam_jax.losses.objective import default_forward
from semsam_jax.models.granularity_decoder import self_attention_mask
from tests import golden

TOL = 1e-5           # outputs, costs, losses
GRAD_TOL = 1e-4      # per parameter tensor
GRAD_TOTAL_TOL = 1e-5
OUTPUTS = ("pred_masks", "pred_boxes", "pred_ious")
TERM_NAMES = ("loss_mask_bce", "loss_mask_dice", "iou_score_loss", "loss_bbox", "loss_giou")

# Reference gradient keys that have no Flax parameter (the converter's mapping
# finds a parameter for each of them today).  Any key not mapped must be listed
# here with the reason; the test fails on unlisted ones and on stale entries.
UNMAPPED_REFERENCE_KEYS: dict[str, str] = {}


def train_case_files() -> list[pathlib.Path]:
  d = golden.golden_dir()
  if not d.is_dir():
    return []
  return sorted(f for f in d.glob("train_*/ex*.npz") if not f.name.endswith("_grads.npz"))


CASES = train_case_files() or [None]


def _set_dotted(opt: dict, key: str, value) -> None:
  node = opt
  parts = key.split(".")
  for p in parts[:-1]:
    node = node.setdefault(p, {})
  node[parts[-1]] = value


@functools.lru_cache(maxsize=None)
def _model(case_dir: str):
  """(full config, params) of a case folder's model with its overrides."""
  case_dir = pathlib.Path(case_dir)
  meta = json.loads((case_dir / "meta.json").read_text())
  model_dir = golden.model_dir_of(case_dir)
  opt = copy.deepcopy(load_reference_yaml(model_dir / "config.yaml"))
  for key, value in meta.get("overrides", {}).items():
    _set_dotted(opt, key, value)
  model_cfg, params = convert_checkpoint(model_dir / "model.pth", reference_config=opt)
  config = ml_collections.ConfigDict({"model": model_cfg,
                                      "loss": loss_config_from_reference(opt)})
  return meta, config, params


def probed_forward(model, params, *args):
  """The default forward plus a zero "probe" added to every output, so that
  d total / d probe = d total / d that output (the reference's grad_out)."""
  layers = default_forward(model, params["model"], *args)
  return [{n: v + params["probe"][i][n] for n, v in layer.items()}
          for i, layer in enumerate(layers)]


@functools.lru_cache(maxsize=None)
def _run(path: str):
  path = pathlib.Path(path)
  meta, config, params = _model(str(path.parent))
  data = golden.load_npz(path)
  t = int(config.model.decoder.num_mask_tokens)
  num_layers = int(meta["examples"][path.stem]["num_layers"])
  batch = replay.batch_from_reference(data, t)
  draws = replay.draws_from_reference(data, t, num_layers)
  k = batch["prompt_valid"].shape[1]
  probe = []
  for j in range(num_layers):
    hq, wq = data[f"L{j}_pred_masks"].shape[-2:]
    probe.append({"pred_masks": np.zeros((1, k, t, hq, wq), np.float32),
                  "pred_boxes": np.zeros((1, k, t, 4), np.float32),
                  "pred_ious": np.zeros((1, k, t), np.float32)})
  objective = make_objective(config, forward=probed_forward)

  def f(p, b, d):
    return objective(p, b, jax.random.PRNGKey(0), draws=d)

  with jax.default_matmul_precision("highest"):
    (loss, details), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(
        {"model": params, "probe": probe}, batch, draws)
  details = jax.tree.map(np.asarray, details)
  grads = jax.tree.map(np.asarray, grads)
  return {"data": data, "meta": meta["examples"][path.stem], "config": config,
          "params": params, "batch": batch, "t": t, "num_layers": num_layers,
          "loss": float(loss), "details": details, "grads": grads, "path": path}


@pytest.fixture(scope="module", params=CASES, ids=golden.param_ids([c for c in CASES if c]))
def case(request):
  if request.param is None:
    golden._missing(f"{golden.golden_dir()}/train_*/ex*.npz")
  return _run(str(request.param))


def _check(name, actual, expected, tol=TOL):
  err = golden.rel_l2(actual, expected)
  assert err <= tol, f"{name}: relative L2 error {err:.3g} > {tol}"


def _target_slots(data):
  """For each flattened level target n (reference order): (prompt, slot)."""
  lens = data["level_target_len"].astype(np.int64)
  prompt = np.repeat(np.arange(lens.shape[0]), lens)
  slot = np.arange(prompt.shape[0]) - replay.target_offsets(lens)[prompt]
  return prompt, slot


def _loss_layer(suffix: int, num_layers: int) -> int:
  """Decoder layer of loss suffix ``_k`` (0 = last layer, k >= 1 = layer k-1)."""
  return num_layers - 1 if suffix == 0 else suffix - 1


# --------------------------------------------------------------------- prompts

def test_prompts_and_targets(case):
  data, det, t = case["data"], case["details"], case["t"]
  pr = det["prompts"]
  _check("prompt boxes before noise", pr["boxes"], data["dn_known_boxes_before_noise"])
  np.testing.assert_allclose(pr["boxes"][0], data["tgt_points"], rtol=1e-6, atol=1e-7)
  _check("noised prompt boxes", pr["noised"], data["note/dn/noised_boxes#0"])
  np.testing.assert_array_equal(pr["pb"][0], data["tgt_pb"].astype(np.int32))
  prompt, slot = _target_slots(data)
  tg = det["targets"]
  assert tg["valid"].sum() == data["level_target_flat"].shape[0]
  assert tg["valid"][0, prompt, slot].all()
  _check("level-target boxes", tg["boxes"][0, prompt, slot],
         data["tgt_ori_boxes"][data["level_target_flat"]])
  assert float(det["normalizer"]) == float(data["num_masks"])
  k = data["level_target_len"].shape[0]
  allowed = np.asarray(self_attention_mask(k, t, case["batch"]["prompt_valid"], True))[0]
  np.testing.assert_array_equal(~allowed, data["self_attn_mask"])


# --------------------------------------------------------------------- decoder

def test_training_decoder_outputs_every_layer(case):
  data, det = case["data"], case["details"]
  assert len(det["layers"]) == case["num_layers"]
  for j, layer in enumerate(det["layers"]):
    for name in OUTPUTS:
      ref = data[f"L{j}_{name}"]
      _check(f"L{j}_{name}", layer[name].reshape(ref.shape), ref)


# --------------------------------------------------------------------- matcher

def test_matcher_costs_and_indices(case):
  data, det, t = case["data"], case["details"], case["t"]
  q = data["L0_pred_masks"].shape[1]
  p = data["draw/matcher/rand#0"].shape[1]
  mp = det["matcher_points"]
  _check("matcher point logits", mp["pred"].reshape(q, p), data["note/matcher/point_logits#0"])
  prompt, slot = _target_slots(data)
  _check("matcher point labels", mp["target"][0, prompt, slot],
         data["note/matcher/point_labels#0"])
  # Costs: ours are (B, K, Tq, Tt) blocks; the reference's (Q, N) matrix holds
  # the same values on the valid pairs (query of prompt i, target of prompt i).
  valid = data["matcher_valid"]
  qq = np.arange(q)
  expected_valid = (qq[:, None] // t) == prompt[None, :]
  np.testing.assert_array_equal(valid, expected_valid)
  costs = det["match"]["costs"]
  ours = lambda c: c[0][qq[:, None] // t, qq[:, None] % t, slot[None, :]]
  refs = {"cost_mask": data["note/matcher/cost_mask#0"],
          "cost_dice": data["note/matcher/cost_dice#0"],
          "cost_bbox": data["matcher_cost_bbox"],
          "giou": data["note/matcher/giou#0"],
          "total": data["note/matcher/cost_D#0"]}
  for name, ref in refs.items():
    _check(f"matcher {name}", ours(costs[name])[valid], ref[valid])
  assert np.all(data["note/matcher/cost_D#0"][~valid] == 1e6)   # what we never build
  # Indices: the reference's pairs sorted by query.
  token = det["token"][0]
  query = prompt * t + token[prompt, slot]
  order = np.argsort(query)
  np.testing.assert_array_equal(query[order], data["match_query"])
  np.testing.assert_array_equal(order, data["match_target"])


# --------------------------------------------------------------------- losses

def _point_order(coords: np.ndarray, num_important: int) -> np.ndarray:
  """Per row, a permutation of the P points: the ``num_important`` top-k points
  sorted by (x, y), then the uniform extra points in their drawn order.  The
  order inside the top-k is immaterial (sums over points) and is not stable
  under ulp-level differences of the uncertainties, so it is compared as a set."""
  head = coords[:, :num_important]
  order = np.lexsort((head[..., 1], head[..., 0]), axis=-1)
  tail = np.broadcast_to(np.arange(num_important, coords.shape[1]),
                         (coords.shape[0], coords.shape[1] - num_important))
  return np.concatenate([order, tail], axis=1)


def test_mask_loss_points_and_per_pair_terms(case):
  data, det, t, nl = case["data"], case["details"], case["t"], case["num_layers"]
  for k in range(nl):
    terms = det["terms"][k]
    per_pair = lambda x: replay.slots_to_per_pair(x, data, t)
    pre = f"note/loss_{k}/masks/"
    n_imp = data[pre + "topk_idx#0"].shape[1]
    coords, ref_coords = per_pair(terms["point_coords"]), data[pre + "point_coords#0"]
    ours_o, ref_o = _point_order(coords, n_imp), _point_order(ref_coords, n_imp)
    take = lambda x, o: np.take_along_axis(x, o.reshape(o.shape + (1,) * (x.ndim - 2)), 1)
    np.testing.assert_array_equal(take(coords, ours_o), take(ref_coords, ref_o),
                                  err_msg=f"loss_{k} point coordinates (as sets)")
    cand = data[f"draw/loss_{k}/masks/rand#0"]
    np.testing.assert_array_equal(
        np.take_along_axis(cand, data[pre + "topk_idx#0"][..., None], 1), ref_coords[:, :n_imp])
    _check(f"loss_{k} point_logits", take(per_pair(terms["point_logits"]), ours_o),
           take(data[pre + "point_logits#0"], ref_o))
    _check(f"loss_{k} point_labels", take(per_pair(terms["point_labels"]), ours_o),
           take(data[pre + "point_labels#0"], ref_o))
    _check(f"loss_{k} dice_per_mask", per_pair(terms["loss_mask_dice"]),
           data[pre + "dice_per_mask#0"])
    j = _loss_layer(k, nl)
    src_ious = det["layers"][j]["pred_ious"][0][tuple(replay.pair_slots(data, t)[::2])]
    _check(f"loss_{k} src_ious", src_ious, data[pre + "src_ious#0"])
    target_iou = 1.0 - per_pair(terms["loss_mask_dice"])
    _check(f"loss_{k} target_iou", target_iou, data[pre + "target_iou#0"])
    _check(f"loss_{k} iou term", per_pair(terms["iou_score_loss"]),
           (data[pre + "src_ious#0"] - data[pre + "target_iou#0"]) ** 2)


def test_every_loss_term_and_total(case):
  data, det, meta = case["data"], case["details"], case["meta"]
  cfg = case["config"].loss
  weights = {"loss_mask_bce": cfg.weight_mask_bce, "loss_mask_dice": cfg.weight_mask_dice,
             "iou_score_loss": cfg.weight_iou, "loss_bbox": cfg.weight_bbox,
             "loss_giou": cfg.weight_giou}
  metrics = det["metrics"]
  expected = {k.removeprefix("sam."): v for k, v in meta["losses_weighted"].items()}
  ours = {k: v for k, v in metrics.items() if k != "num_targets"}
  assert set(ours) == set(expected)
  norm = float(data["num_masks"])
  for name, value in expected.items():
    term = name.rsplit("_", 1)[0]
    got = float(ours[name])
    assert abs(got - value) <= TOL * abs(value), (name, got, value)
    np.testing.assert_allclose(float(data[f"loss_weighted/sam.{name}"]), value, rtol=1e-7)
    raw = float(data[f"loss_raw/{name}"])
    k = int(name.rsplit("_", 1)[1])
    per_pair = replay.slots_to_per_pair(det["terms"][k][term], data, case["t"])
    ours_raw = float(per_pair.sum()) / norm
    assert abs(ours_raw - raw) <= TOL * abs(raw), (name, ours_raw, raw)
    assert abs(got - weights[term] * raw) <= TOL * abs(value), (name, got, raw)
  assert abs(case["loss"] - meta["loss_total"]) <= TOL * abs(meta["loss_total"])
  assert abs(case["loss"] - float(data["loss_total"])) <= TOL * abs(meta["loss_total"])
  assert float(metrics["num_targets"]) == norm


# --------------------------------------------------------------------- gradients

def test_gradients_of_the_outputs(case):
  data, grads = case["data"], case["grads"]["probe"]
  for j in range(case["num_layers"]):
    for name in OUTPUTS:
      ref = data[f"grad_out/L{j}_{name}"]
      _check(f"d total / d L{j}_{name}", grads[j][name].reshape(ref.shape), ref)


def test_parameter_gradients_by_reference_key(case):
  path = case["path"]
  ref_file = path.with_name(f"{path.stem}_grads.npz")
  assert ref_file.is_file(), f"{ref_file} missing"
  ref_grads = golden.load_npz(ref_file)
  flat_params = traverse_util.flatten_dict(mapping._unfreeze(case["params"]))
  ours = traverse_util.flatten_dict(mapping._plain(case["grads"]["model"]))
  unmapped, covered, errors, wrong_zero = [], set(), [], []
  num = den = 0.0
  for key, ref in ref_grads.items():
    leaf, ref_leaf = mapping._to_leaf(mapping._path_parts(mapping.normalize_key(key)),
                                      ref, flat_params)
    if leaf is None:
      unmapped.append(key)
      continue
    covered.add(leaf)
    got = np.asarray(ours[leaf], np.float64)
    want = np.asarray(ref_leaf, np.float64)
    assert got.shape == want.shape, (key, got.shape, want.shape)
    if not np.any(want):
      # dropped drop-path branches, the reference's 0.0 x keep-alive terms
      if np.any(got):
        wrong_zero.append(key)
      continue
    num += float(np.sum((got - want) ** 2))
    den += float(np.sum(want ** 2))
    err = golden.rel_l2(got, want)
    if err > GRAD_TOL:
      errors.append(f"{key}: {err:.3g}")
  assert sorted(unmapped) == sorted(UNMAPPED_REFERENCE_KEYS), (
      f"reference keys without a Flax parameter: {sorted(unmapped)}")
  missing = sorted("/".join(p) for p in set(flat_params) - covered)
  assert not missing, f"Flax parameters with no reference gradient: {missing}"
  assert not wrong_zero, f"zero in the reference, non-zero here: {wrong_zero}"
  assert not errors, "per-tensor gradient errors > 1e-4:\n" + "\n".join(errors)
  total = float(np.sqrt(num / den))
  assert total <= GRAD_TOTAL_TOL, f"overall relative L2 {total:.3g} > {GRAD_TOTAL_TOL}"
  # The reference's list of exactly-zero gradients (by module prefix).
  zero_prefixes = case["meta"]["params_with_zero_grad"]
  assert zero_prefixes, "the case lists no zero-gradient parameters"
  for prefix in zero_prefixes:
    keys = [k for k in ref_grads if k == prefix or k.startswith(prefix + ".")]
    assert keys, prefix
    for key in keys:
      leaf, _ = mapping._to_leaf(mapping._path_parts(mapping.normalize_key(key)),
                                 ref_grads[key], flat_params)
      assert not np.any(ours[leaf]), f"{key}: reference gradient 0, ours non-zero"
