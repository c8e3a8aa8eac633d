"""Original Semantic-SAM YAML -> our model config."""

from __future__ import annotations

import copy
import pathlib

import pytest
import yaml

from configs import semsam_swinl, semsam_swint
from semsam_jax.convert import config_from_reference_yaml
from semsam_jax.convert.reference_config import load_reference_yaml
from tests import golden

DATA = pathlib.Path(__file__).parent / "data"
SWINT_YAML = DATA / "semantic_sam_only_sa-1b_swinT.yaml"
SWINL_YAML = DATA / "semantic_sam_only_sa-1b_swinL.yaml"


@pytest.mark.parametrize("yaml_path,module", [(SWINT_YAML, semsam_swint),
                                              (SWINL_YAML, semsam_swinl)])
def test_release_yamls_equal_our_configs(yaml_path, module):
  got = config_from_reference_yaml(yaml_path)
  assert got.to_dict() == module.get_config().model.to_dict()


def test_tiny_golden_config():
  cfg = config_from_reference_yaml(golden.require_golden() / "tiny_a" / "config.yaml")
  b, p, d = cfg.backbone, cfg.pixel_decoder, cfg.decoder
  assert (b.embed_dim, b.depths, b.num_heads, b.window_size) == (32, (2, 2, 2, 2), (1, 2, 4, 8), 7)
  assert b.pretrain_img_size == 224 and b.patch_size == 4 and b.qk_scale is None
  assert (p.conv_dim, p.mask_dim, p.num_encoder_layers) == (64, 64, 2)
  # The pixel decoder's encoder takes DECODER.NHEADS / DIM_FEEDFORWARD ...
  assert (p.num_heads, p.dim_feedforward) == (4, 128)
  # ... while the decoder layers keep the original layer default of 8 heads
  # (their sampling_offsets in the checkpoint are 8 heads x 4 levels x 4 points x 2).
  assert (d.hidden_dim, d.num_heads, d.dim_feedforward) == (64, 8, 128)
  assert (d.num_layers, d.num_mask_tokens, d.mask_dim, d.dim_proj) == (3, 6, 64, 512)
  assert cfg.size_divisibility == 32
  assert cfg.pixel_mean == (123.675, 116.28, 103.53)
  assert cfg.pixel_std == (58.395, 57.12, 57.375)


def _opt():
  return load_reference_yaml(SWINT_YAML)


def test_dict_input_and_file_list_merge(tmp_path):
  assert config_from_reference_yaml(_opt()) == config_from_reference_yaml(SWINT_YAML)
  # A later file replaces top-level sections; dotted keys address nested fields.
  override = tmp_path / "override.yaml"
  override.write_text(yaml.safe_dump({"MODEL.DECODER.DEC_LAYERS": 3,
                                      "INPUT": {"PIXEL_MEAN": [1, 2, 3],
                                                "PIXEL_STD": [4, 5, 6]}}))
  cfg = config_from_reference_yaml([SWINT_YAML, override])
  assert cfg.decoder.num_layers == 3
  assert cfg.pixel_mean == (1.0, 2.0, 3.0) and cfg.pixel_std == (4.0, 5.0, 6.0)
  assert cfg.backbone.embed_dim == 96


def _with(edits: dict):
  opt = copy.deepcopy(_opt())
  for dotted, value in edits.items():
    node = opt
    *parents, leaf = dotted.split(".")
    for part in parents:
      node = node[part]
    if value is KeyError:
      del node[leaf]
    else:
      node[leaf] = value
  return opt


@pytest.mark.parametrize("edits,field", [
    ({"MODEL.BACKBONE.NAME": "focal"}, "MODEL.BACKBONE.NAME"),
    ({"MODEL.ENCODER.NAME": "transformer_encoder_fpn"}, "MODEL.ENCODER.NAME"),
    ({"MODEL.DECODER.NAME": "mask_dino"}, "MODEL.DECODER.NAME"),
    ({"MODEL.TEXT.ARCH": "vlpencoder"}, "MODEL.TEXT.ARCH"),
    ({"MODEL.DECODER.TWO_STAGE": True}, "MODEL.DECODER.TWO_STAGE"),
    ({"MODEL.DECODER.DN": "no"}, "MODEL.DECODER.DN"),
    ({"MODEL.ENCODER.NORM": "BN"}, "MODEL.ENCODER.NORM"),
    ({"MODEL.ENCODER.FEATURE_ORDER": "random"}, "MODEL.ENCODER.FEATURE_ORDER"),
    ({"MODEL.DECODER.ENFORCE_INPUT_PROJ": True}, "MODEL.DECODER.ENFORCE_INPUT_PROJ"),
    ({"MODEL.DECODER.HIDDEN_DIM": 128}, "MODEL.DECODER.HIDDEN_DIM"),
    ({"MODEL.BACKBONE.SWIN.DEPTHS": [2, 2, 6]}, "MODEL.BACKBONE.SWIN.DEPTHS"),
    ({"MODEL.BACKBONE.SWIN.NUM_HEADS": [5, 6, 12, 24]}, "MODEL.BACKBONE.SWIN.NUM_HEADS"),
    ({"MODEL.BACKBONE.SWIN.EMBED_DIM": "big"}, "MODEL.BACKBONE.SWIN.EMBED_DIM"),
    ({"MODEL.BACKBONE.SWIN.OUT_INDICES": [1, 2, 3]}, "MODEL.BACKBONE.SWIN.OUT_INDICES"),
    ({"MODEL.BACKBONE.SWIN.OUT_FEATURES": ["res3", "res4", "res5"]}, "MODEL.ENCODER.IN_FEATURES"),
    ({"MODEL.ENCODER.CONVS_DIM": 100}, "MODEL.ENCODER.CONVS_DIM"),
    ({"MODEL.DECODER.TOTAL_NUM_FEATURE_LEVELS": 3}, "MODEL.DECODER.TOTAL_NUM_FEATURE_LEVELS"),
    ({"MODEL.BACKBONE.SWIN.WINDOW_SIZE": KeyError}, "MODEL.BACKBONE.SWIN.WINDOW_SIZE"),
    ({"INPUT.PIXEL_MEAN": [1, 2]}, "INPUT.PIXEL_MEAN"),
])
def test_unsupported_or_malformed_settings_name_the_field(edits, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    config_from_reference_yaml(_with(edits))


def test_unrelated_fields_are_ignored():
  opt = _with({"SOLVER.BASE_LR": 1.0, "MODEL.DECODER.DN_NUM": 7,
               "MODEL.DECODER.INITIAL_PRED": True})
  opt["SOMETHING_NEW"] = {"X": 1}
  assert config_from_reference_yaml(opt) == config_from_reference_yaml(SWINT_YAML)


def test_defaults_the_original_code_also_applies():
  cfg = config_from_reference_yaml(_with({"MODEL.DECODER.NUM_INTERACTIVE_TOKENS": KeyError,
                                          "MODEL.DECODER.SIZE_DIVISIBILITY": -1}))
  assert cfg.decoder.num_mask_tokens == 3  # dec_cfg.get('NUM_INTERACTIVE_TOKENS', 3)
  assert cfg.size_divisibility == 32       # negative -> the backbone's divisibility


def test_base_includes_and_bad_files(tmp_path):
  base = tmp_path / "with_base.yaml"
  base.write_text("_BASE_: other.yaml\nMODEL: {}\n")
  with pytest.raises(ValueError, match="_BASE_"):
    config_from_reference_yaml(base)
  bad = tmp_path / "bad.yaml"
  bad.write_text("MODEL: [unclosed\n")
  with pytest.raises(ValueError, match="not valid YAML"):
    config_from_reference_yaml(bad)
  with pytest.raises(FileNotFoundError):
    config_from_reference_yaml(tmp_path / "missing.yaml")
