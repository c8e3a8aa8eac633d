"""The command line end to end on the converted tiny golden model.

Subprocess runs (exit codes, stderr, Ctrl-C, the compilation cache) share one
compilation cache folder per test session, so repeated calls are cheap;
everything else runs in-process with the cache off.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from semsam_jax import __main__ as cli
from semsam_jax.__main__ import main as cli_main
from semsam_jax.__main__ import resize_short_side
from semsam_jax.inference import postprocess as pp
from tests import golden


@pytest.fixture(scope="module")
def tiny_files():
  dirs = golden.model_dirs()
  if not dirs:
    golden.require_golden()
    pytest.fail("no tiny_* model folder")
  return dirs[0] / "model.pth", dirs[0] / "config.yaml"


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  env = dict(os.environ, SEMSAM_JAX_COMPILE_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")))
  env.pop("SEMSAM_JAX_COMPILE_CACHE", None)
  env["PYTHONPATH"] = str(golden.REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.fixture(autouse=True)
def _no_cache_in_process(monkeypatch):
  monkeypatch.setenv("SEMSAM_JAX_COMPILE_CACHE", "0")


def _run(*args, env=None):
  return subprocess.run([sys.executable, "-m", "semsam_jax", *map(str, args)],
                        capture_output=True, text=True, timeout=600, env=env,
                        cwd=golden.REPO_ROOT)


def _files(path):
  return sorted(os.path.relpath(os.path.join(r, f), path)
                for r, _, fs in os.walk(path) for f in fs)


def _umask_mode(kind="file"):
  mask = os.umask(0)
  os.umask(mask)
  return (0o666 if kind == "file" else 0o777) & ~mask


def test_predict_and_auto(tmp_path, tiny_files, cache_env):
  pth, yaml = tiny_files
  img = np.random.default_rng(0).integers(0, 255, (70, 90, 3), np.uint8)
  Image.fromarray(img).save(tmp_path / "im.png")
  ckpt = tmp_path / "ckpt"
  r = subprocess.run([sys.executable, "-m", "semsam_jax.convert", "--torch-checkpoint", pth,
                      "--reference-config", yaml, "--output", ckpt],
                     capture_output=True, text=True, timeout=600, env=cache_env)
  assert r.returncode == 0, r.stderr
  predict = ["predict", "--image", tmp_path / "im.png", "--checkpoint", ckpt,
             "--levels", "1", "3", "6", "--short-side", "0", "--iou-thresh", "0",
             "--output-dir", tmp_path / "pred", "--no-progress"]
  r = _run(*predict, "--points", "10,20;50,40", "--boxes", "5,5,60,50", "--mask-pngs",
           env=cache_env)
  assert r.returncode == 0, r.stderr
  text = (tmp_path / "pred" / "predictions.json").read_text()
  rep = json.loads(text)
  assert rep["processed_size"] == [70, 90] and rep["levels"] == [1, 3, 6]
  assert rep["tokens"] == [3, 0, 5] and rep["independent_prompts"] is False
  assert [list(p)[0] for p in rep["prompts"]] == ["point", "point", "box"]
  assert rep["prompts"][0]["point"] == [10.0, 20.0]
  assert rep["prompts"][2]["box"] == pytest.approx([5.0, 5.0, 60.0, 50.0])
  # Numbers are rounded (IoUs 4 decimals, coordinates 2).
  assert not re.search(r"\d\.\d{5,}", text)
  for i, p in enumerate(rep["prompts"]):
    assert [m["level"] for m in p["masks"]] == [1, 3, 6]
    assert [m["token"] for m in p["masks"]] == [3, 0, 5]
    for m in p["masks"]:
      assert 0 <= m["area"] <= 70 * 90 and len(m["box_xyxy"]) == 4
      assert isinstance(m["predicted_iou"], float) and isinstance(m["kept"], bool)
      # Every mask exported: COCO RLE in the JSON and the same mask as a PNG.
      mask = pp.decode_rle(m["segmentation"])
      assert mask.shape == (70, 90) and mask.sum() == m["area"]
      png = np.asarray(Image.open(tmp_path / "pred" / m["png"]))
      assert m["png"] == f"masks/prompt{i}_level{m['level']}.png"
      np.testing.assert_array_equal(png == 255, mask)
      assert set(np.unique(png)) <= {0, 255}
    # iou-thresh 0: every mask is kept unless it duplicates a better one.
    assert sorted(p["kept_by_iou"]) == sorted(p["kept_by_area"])
    assert set(p["kept_by_iou"]) == {m["level"] for m in p["masks"] if m["kept"]}
    ious = {m["level"]: m["predicted_iou"] for m in p["masks"]}
    assert [ious[l] for l in p["kept_by_iou"]] == sorted(ious[l] for l in p["kept_by_iou"])[::-1]
    k = len(p["kept_by_iou"])
    for kind in ("by_iou", "by_area"):
      assert p[f"strip_{kind}"] == f"prompt{i}_{kind}.png"
      im = Image.open(tmp_path / "pred" / f"prompt{i}_{kind}.png")
      assert im.size == (90 * k + 4 * (k - 1), 70)
  # Usual permissions (not mkstemp's 0600), no temporary folder left.
  assert stat.S_IMODE(os.stat(tmp_path / "pred" / "predictions.json").st_mode) == _umask_mode()
  assert stat.S_IMODE(os.stat(tmp_path / "pred").st_mode) == _umask_mode("dir")
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]

  # Item 8: the first call filled the compilation cache; a second call with
  # the same shapes (2 prompts: the same prompt bucket as 3) compiles nothing
  # new, so it writes no new cache entry.  Item 6: its outputs replace the
  # first call's, the third prompt's files are gone.
  cache = cache_env["SEMSAM_JAX_COMPILE_CACHE_DIR"]
  entries = set(os.listdir(cache))
  assert entries, "the compilation cache stayed empty"
  r = _run(*predict, "--points", "10,20", "--boxes", "5,5,60,50", env=cache_env)
  assert r.returncode == 0, r.stderr
  assert set(os.listdir(cache)) == entries, "the second call compiled again"
  files = _files(tmp_path / "pred")
  assert files == ["predictions.json"] + [f"prompt{i}_{k}.png" for i in range(2)
                                          for k in ("by_area", "by_iou")]
  assert len(json.loads((tmp_path / "pred" / "predictions.json").read_text())["prompts"]) == 2

  r = _run("auto", "--image", tmp_path / "im.png", "--torch-checkpoint", pth,
           "--reference-config", yaml, "--points-per-side", "4", "--points-per-batch", "8",
           "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--short-side", "35",
           "--levels", "2", "--output-dir", tmp_path / "auto", env=cache_env)
  assert r.returncode == 0, r.stderr
  out = json.loads((tmp_path / "auto" / "masks.json").read_text())
  assert out["processed_size"] == [35, 45] and out["input_size"] == [70, 90]
  assert out["annotations"], "no masks generated"
  for a in out["annotations"]:
    assert a["level"] == 2 and a["crop_box"] == [0.0, 0.0, 45.0, 35.0]
    assert a["segmentation"]["size"] == [35, 45]
    assert pp.decode_rle(a["segmentation"]).sum() == a["area"]
    assert set(a) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords",
                      "stability_score", "crop_box", "level"}
    assert a["predicted_iou"] == round(a["predicted_iou"], 4)
  assert Image.open(tmp_path / "auto" / "masks.png").size == (45, 35)


def _model(tiny_files):
  pth, yaml = tiny_files
  return ["--torch-checkpoint", str(pth), "--reference-config", str(yaml)]


def _in_process(capsys, *args):
  capsys.readouterr()
  code = cli_main([str(a) for a in args])
  return code, capsys.readouterr().err


def test_errors_are_reported_before_loading(tmp_path, tiny_files, capsys, monkeypatch):
  """Clear messages and exit status 1, no traceback, no output folder: every
  prompt and option is checked before the model is loaded (in-process)."""
  model = _model(tiny_files)

  def no_model(args):
    raise AssertionError("the model was loaded before the arguments were checked")

  monkeypatch.setattr(cli, "_predictor", no_model)
  out = tmp_path / "o" / "deeper"

  def run(*args):
    return _in_process(capsys, *args)

  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "im.png")
  im = ["--image", tmp_path / "im.png"]
  cases = [
      ((*im[:1], tmp_path / "missing.png", *model, "--points", "1,1"), "image not found"),
      ((*im, *model, "--points", "30,1"), "outside the 20x20 image"),
      ((*im, *model, "--boxes", "1,1,30,5"), "outside the 20x20 image"),
      ((*im, *model, "--points", "0.5,1.5", "--coords", "relative"), "outside the 20x20"),
      ((*im, *model, "--boxes", "0.5,0.5,2,0.1", "--coords", "relative"), "outside"),
      ((*im, *model, "--points", "1,1", "--levels", "7"), "levels are 1..6"),
      ((*im, *model, "--points", "1;2"), "groups of 2"),
      ((*im, *model), "--points and/or --boxes"),
      ((*im, "--checkpoint", tmp_path / "nope", "--points", "1,1"),
       "checkpoint directory not found"),
      ((*im, "--reference-config", tiny_files[1], "--points", "1,1"),
       "--reference-config goes with --torch-checkpoint"),
      ((*im, "--torch-checkpoint", tiny_files[0], "--points", "1,1"), "--reference-config"),
      ((*im, *model, "--points", "1,1", "--size-buckets", "big"), "--size-buckets"),
      ((*im, *model, "--points", "1,1", "--short-side", "-5"), "--short-side must be >= 0"),
      ((*im, *model, "--points", "1,1", "--max-long-side", "-1"), "--max-long-side"),
      ((*im, *model, "--points", "1,1", "--iou-thresh", "1.5"), "--iou-thresh must lie in"),
      ((*im, *model, "--points", "1,1", "--max-pixels", "100"), "more than the limit"),
      ((*im, *model, "--points", "1,1", "--short-side", "100000", "--max-long-side", "0"),
       "the processed image would be 100000x100000"),
  ]
  for args, want in cases:
    code, err = run("predict", *args, "--output-dir", out)
    assert code == 1 and want in err, (args, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err
  auto_cases = [
      (("--levels", "0"), "levels are 1..6"),
      (("--points-per-side", "0"), "--points-per-side must be >= 1"),
      (("--points-per-batch", "-3"), "--points-per-batch must be >= 1"),
      (("--pred-iou-thresh", "-100"), "--pred-iou-thresh must lie in [0, 1]"),
      (("--stability-score-thresh", "1.01"), "--stability-score-thresh"),
      (("--box-nms-thresh", "2"), "--box-nms-thresh"),
      (("--stability-score-offset", "0"), "--stability-score-offset must be > 0"),
      (("--crop-n-layers", "-1"), "--crop-n-layers must be >= 0"),
      (("--min-mask-region-area", "-1"), "--min-mask-region-area"),
  ]
  for args, want in auto_cases:
    code, err = run("auto", *im, *model, *args, "--output-dir", out)
    assert code == 1 and want in err, (args, err)
  (tmp_path / "afile").write_text("x")
  code, err = run("auto", *im, *model, "--output-dir", tmp_path / "afile")
  assert code == 1 and "not a directory" in err
  code, err = run("auto", *im, *model, "--output-dir", tmp_path / "afile" / "sub")
  assert code == 1 and "not a directory" in err
  assert not (tmp_path / "o").exists(), "an output folder was created for a failed run"
  # Negative pixel coordinates need no '=' (they reach our own check).
  code, err = run("predict", *im, *model, "--points", "-5,3", "--output-dir", out)
  assert code == 1 and "[[-5.0, 3.0]] lie outside" in err
  code, err = run("predict", *im, *model, "--boxes", "-1,-1,5,5", "--output-dir", out)
  assert code == 1 and "outside the 20x20" in err
  with pytest.raises(SystemExit) as e:
    cli_main(["frobnicate"])
  assert e.value.code == 2

  def oom(args):
    raise MemoryError()

  monkeypatch.setattr(cli, "_predictor", oom)
  code, err = run("predict", *im, *model, "--points", "1,1", "--no-progress",
                  "--output-dir", out)
  assert code == 1 and err.startswith("error: out of memory") and len(err.splitlines()) == 1
  assert not (tmp_path / "o").exists()


def test_help_and_version(capsys):
  parser = cli.build_parser()
  sub = {a.dest: a for a in parser._actions}["command"].choices
  for name, p in sub.items():
    assert p.description, f"{name} has no description"
    text = p.format_help()
    assert "--checkpoint DIR, or --torch-checkpoint PTH with --reference-config YAML; " \
        "default: the committed tiny checkpoint" in " ".join(text.split())
    assert "do not show progress bars" in text
    for action in p._actions:
      if action.help in (None, argparse_suppress()) or not action.option_strings:
        continue
      assert action.help.count("(default:") <= 1, action.help  # no duplicated default
      if action.default is not None and not isinstance(action.default, bool) \
          and action.dest != "help":
        assert "(default: %(default)s)" in action.help or "(default: all six)" in action.help, \
            action.option_strings
  auto_help = sub["auto"].format_help()
  for opt, default in (("--points-per-side", "32"), ("--points-per-batch", "200"),
                       ("--pred-iou-thresh", "0.88"), ("--stability-score-thresh", "0.92"),
                       ("--stability-score-offset", "1.0"), ("--box-nms-thresh", "0.7"),
                       ("--crop-n-layers", "0"), ("--min-mask-region-area", "10")):
    block = auto_help[auto_help.index(f"\n  {opt}") + 1:]
    block = block[:block.index("\n  -")] if "\n  -" in block else block
    assert f"(default: {default})" in " ".join(block.split()), opt
  with pytest.raises(SystemExit) as e:
    cli_main(["--version"])
  assert e.value.code == 0 and capsys.readouterr().out.startswith("semsam_jax ")


def argparse_suppress():
  import argparse
  return argparse.SUPPRESS


def test_outputs_are_staged_and_replaced(tmp_path, tiny_files, capsys, monkeypatch):
  """A run's files appear together at the end, replace the previous run's
  (stale prompt files removed), keep umask permissions; a failed run leaves
  the previous outputs untouched and no temporary folder (in-process)."""
  model = _model(tiny_files)
  img = np.random.default_rng(1).integers(0, 255, (40, 50, 3), np.uint8)
  Image.fromarray(img).save(tmp_path / "im.png")
  out = tmp_path / "res" / "pred"
  base = ["predict", "--image", tmp_path / "im.png", *model, "--short-side", "0",
          "--iou-thresh", "0", "--levels", "2", "--no-progress", "--output-dir", out]
  code, err = _in_process(capsys, *base, "--points", "5,5;20,20;30,10", "--mask-pngs")
  assert code == 0, err
  assert _files(out) == (["masks/prompt0_level2.png", "masks/prompt1_level2.png",
                          "masks/prompt2_level2.png", "predictions.json"]
                         + [f"prompt{i}_{k}.png" for i in range(3) for k in ("by_area", "by_iou")])
  (out / "notes.txt").write_text("the user's own file")
  code, err = _in_process(capsys, *base, "--points", "5,5")
  assert code == 0, err
  assert _files(out) == ["notes.txt", "predictions.json", "prompt0_by_area.png",
                         "prompt0_by_iou.png"]
  for f in _files(out):
    assert stat.S_IMODE(os.stat(out / f).st_mode) == _umask_mode(), f
  before = {f: (out / f).read_bytes() for f in _files(out)}

  from semsam_jax.inference import visualize as vis
  real_strip = vis.strip
  calls = []

  def full_disk(images, gap=4):
    calls.append(1)
    if len(calls) == 2:
      raise OSError(28, "No space left on device")
    return real_strip(images, gap)

  monkeypatch.setattr(vis, "strip", full_disk)
  code, err = _in_process(capsys, *base, "--points", "6,6;7,7")
  assert code == 1 and "No space left on device" in err and len(err.splitlines()) == 1
  assert {f: (out / f).read_bytes() for f in _files(out)} == before
  assert sorted(os.listdir(out)) == sorted(before) and os.listdir(out.parent) == ["pred"]
  calls.clear()
  code, err = _in_process(capsys, *base[:-1], tmp_path / "fresh" / "new", "--points", "6,6")
  assert code == 1 and not (tmp_path / "fresh" / "new").exists()
  assert os.listdir(tmp_path / "fresh") == []


def test_exif_orientation_and_thin_image(tmp_path, tiny_files, capsys):
  """Item 2: a click in the frame a viewer shows (EXIF applied) is valid and
  reported there.  Item 1: a 1 x 5000 image is processed with its long side
  capped (in-process)."""
  model = _model(tiny_files)
  stored = np.random.default_rng(2).integers(0, 255, (40, 56, 3), np.uint8)  # 56 wide
  exif = Image.Exif()
  exif[0x0112] = 6  # shown rotated: 40 wide, 56 high
  Image.fromarray(stored).save(tmp_path / "rot.png", exif=exif)
  out = tmp_path / "rot"
  code, err = _in_process(capsys, "predict", "--image", tmp_path / "rot.png", *model,
                          "--points", "30,50", "--short-side", "0", "--levels", "1",
                          "--no-progress", "--output-dir", out)
  assert code == 0, err
  rep = json.loads((out / "predictions.json").read_text())
  assert rep["input_size"] == [56, 40] and rep["prompts"][0]["point"] == [30.0, 50.0]
  Image.fromarray(np.full((1, 5000, 3), 90, np.uint8)).save(tmp_path / "thin.png")
  code, err = _in_process(capsys, "predict", "--image", tmp_path / "thin.png", *model,
                          "--points", "2500,0", "--max-long-side", "256", "--levels", "1",
                          "--no-progress", "--output-dir", tmp_path / "thin")
  assert code == 0, err
  rep = json.loads((tmp_path / "thin" / "predictions.json").read_text())
  assert rep["input_size"] == [1, 5000] and rep["processed_size"] == [1, 256]
  assert rep["prompts"][0]["masks"][0]["segmentation"]["size"] == [1, 256]


def test_corrupt_checkpoint_and_bad_config_are_one_line(tmp_path, tiny_files, cache_env):
  """Item 3, as a user sees it (a real process: no traceback of orbax's
  background threads at exit either)."""
  pth, yaml = tiny_files
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "im.png")
  ckpt = tmp_path / "ck"
  r = subprocess.run([sys.executable, "-m", "semsam_jax.convert", "--torch-checkpoint", pth,
                      "--reference-config", yaml, "--output", ckpt],
                     capture_output=True, text=True, timeout=600, env=cache_env)
  assert r.returncode == 0, r.stderr
  cfg = json.loads((ckpt / "config.json").read_text())
  for root, _, files in os.walk(ckpt / "params"):
    if os.path.basename(root) == "d" and "ocdbt.process_0" in root:
      for f in files:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  args = ["predict", "--image", tmp_path / "im.png", "--checkpoint", ckpt, "--points", "1,1",
          "--no-progress", "--output-dir", tmp_path / "o"]
  r = _run(*args, env=cache_env)
  assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
  assert r.stderr.startswith("error: ") and "cannot restore the parameters" in r.stderr
  assert "Traceback" not in r.stderr and "TensorStore(" not in r.stderr
  # A config.json that does not fit the parameters is caught at load (in the
  # same process as the restore would be), not at set_image.
  cfg["decoder"]["hidden_dim"] = 2 * cfg["decoder"]["hidden_dim"]
  (ckpt / "config.json").write_text(json.dumps(cfg))
  r = _run(*args, env=cache_env)
  assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
  assert "config.json does not match the parameters" in r.stderr
  assert not (tmp_path / "o").exists()


def test_ctrl_c_exits_130_at_any_moment(tmp_path, tiny_files, cache_env):
  """Item 4: SIGINT during start-up and during the (uncached) compilation of
  the image embedding: status 130, one line, nothing left behind.  Also item
  8's opt-out: SEMSAM_JAX_COMPILE_CACHE=0 creates no cache folder."""
  Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "im.png")
  env = dict(cache_env, SEMSAM_JAX_COMPILE_CACHE="0",
             SEMSAM_JAX_COMPILE_CACHE_DIR=str(tmp_path / "cache_off"))
  args = [sys.executable, "-m", "semsam_jax", "predict", "--image", str(tmp_path / "im.png"),
          *_model(tiny_files), "--points", "3,3", "--short-side", "0",
          "--output-dir", str(tmp_path / "out")]
  for wait_for in (None, "embed image"):
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            cwd=golden.REPO_ROOT)
    err = bytearray()
    seen = threading.Event()

    def reader():
      while chunk := proc.stderr.read1(4096):
        err.extend(chunk)
        if wait_for and wait_for.encode() in err:
          seen.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    if wait_for:
      assert seen.wait(300), err.decode(errors="replace")
      time.sleep(0.5)  # well inside the compilation of the embedding
    else:
      time.sleep(0.5)  # importing
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    t.join(10)
    text = err.decode(errors="replace")
    assert text.rstrip().splitlines()[-1].split("\r")[-1] == "error: interrupted", text
    assert "Traceback" not in text and "Segmentation" not in text
  assert not (tmp_path / "out").exists()
  assert sorted(os.listdir(tmp_path)) == ["im.png"]  # no temp folders, no cache folder


def test_resize_short_side_matches_torchvision_rule():
  img = np.zeros((70, 90, 3), np.uint8)
  assert resize_short_side(img, 0) is img
  assert resize_short_side(img, 35).shape == (35, 45, 3)
  assert resize_short_side(img, 640).shape == (640, 822, 3)     # int(640 * 90 / 70)
  assert resize_short_side(np.zeros((90, 70, 3), np.uint8), 640).shape == (822, 640, 3)
  assert resize_short_side(np.zeros((2, 900, 3), np.uint8), 640, 300).shape == (1, 300, 3)


def test_docs_match_the_code():
  """Item 12: README / pyproject facts that the code decides."""
  import tomllib

  from semsam_jax import _cli
  readme = (golden.REPO_ROOT / "README.md").read_text()
  pyproject = tomllib.loads((golden.REPO_ROOT / "pyproject.toml").read_text())
  assert pyproject["project"]["requires-python"] == ">=3.11"
  assert "Python ≥ 3.11" in readme and "3.10" not in readme
  # Every CLI option the inference section names exists in predict/auto --help.
  section = readme[readme.index("## Interactive prediction"):readme.index("## Sharding")]
  parser = cli.build_parser()
  sub = {a.dest: a for a in parser._actions}["command"].choices
  known = {o for p in sub.values() for a in p._actions for o in a.option_strings}
  named = set(re.findall(r"(--[a-z][a-z-]+)", section))
  assert named and named <= known, named - known
  # The documented cache location and switches are the code's.
  env = {k: os.environ.pop(k) for k in ("SEMSAM_JAX_COMPILE_CACHE_DIR", "XDG_CACHE_HOME")
         if k in os.environ}
  try:
    default = _cli.compile_cache_dir()
  finally:
    os.environ.update(env)
  assert default == os.path.expanduser("~/.cache/semsam_jax/jax_cache")
  assert "~/.cache/semsam_jax/jax_cache" in section and "SEMSAM_JAX_COMPILE_CACHE=0" in section
  assert _cli.COMPILE_CACHE_ENV == "SEMSAM_JAX_COMPILE_CACHE"
  assert _cli.COMPILE_CACHE_DIR_ENV in section
  # The file names the README says predict / auto write.
  for name in ("predictions.json", "prompt<i>_by_iou.png", "masks/prompt<i>_level<l>.png",
               "masks.png", "masks.json"):
    assert name in section
  assert re.fullmatch(cli.PREDICT_OUTPUTS, "masks/prompt3_level6.png")
  assert "`point_coords`" in (golden.REPO_ROOT / "docs" / "differences.md").read_text()
