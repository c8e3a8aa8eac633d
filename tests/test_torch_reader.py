"""The torch-free ``.pth`` reader: zip and legacy formats, wrappers, broken and hostile files."""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from semsam_jax.convert import CheckpointReadError, load_state_dict
from semsam_jax.convert.torch_pth import read_pth
from tests import golden
from tests import torch_writer as tw


def _sample():
  rng = np.random.default_rng(0)
  shared = tw.Storage(np.arange(24, dtype=np.float32))
  obj = collections.OrderedDict(
      f32=rng.standard_normal((3, 4)).astype(np.float32),
      f64=rng.standard_normal(5),
      f16=rng.standard_normal((2, 3)).astype(np.float16),
      bf16=rng.standard_normal(4).astype(ml_dtypes.bfloat16),
      i64=np.arange(5, dtype=np.int64),
      i32=np.arange(-3, 3, dtype=np.int32),
      u8=np.arange(7, dtype=np.uint8),
      b=np.array([True, False, True]),
      scalar=np.array(3.5, np.float32),
      empty=np.zeros((0, 3), np.float32),
      view=tw.Tensor(shared, 2, (2, 3)),
      view_t=tw.Tensor(shared, 4, (3, 2), (1, 3)),  # a transposed view
  )
  base = np.arange(24, dtype=np.float32)
  expected = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
  expected["view"] = base[2:8].reshape(2, 3)
  expected["view_t"] = base[4:10].reshape(2, 3).T
  return obj, expected


def _assert_same(actual: dict, expected: dict):
  assert list(actual) == list(expected)
  for k, v in expected.items():
    assert actual[k].dtype == v.dtype, k
    assert actual[k].shape == v.shape, k
    np.testing.assert_array_equal(actual[k], v, err_msg=k)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_formats_read_all_dtypes_and_views(tmp_path, fmt):
  obj, expected = _sample()
  path = tmp_path / "x.pth"
  (tw.save_zip if fmt == "zip" else tw.save_legacy)(obj, path)
  _assert_same(load_state_dict(path), expected)


def test_legacy_storage_view_metadata(tmp_path):
  """Very old files reference a slice of a storage through view metadata."""
  base = np.arange(10, dtype=np.float32)
  buf = io.BytesIO()
  for header in (tw.LEGACY_MAGIC, tw.LEGACY_PROTOCOL, {"little_endian": True}):
    pickle.dump(header, buf, protocol=2)

  class ViewPickler(tw._Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, tw.Storage):
        return ("storage", tw.Global("torch", "FloatStorage"), "root", "cpu", 10,
                ("view1", 3, 4))
      return None

  ViewPickler(buf, legacy=True).dump({"w": tw.Tensor(tw.Storage(base), 1, (2,))})
  pickle.dump(["root"], buf, protocol=2)
  buf.write(np.int64(10).tobytes() + base.tobytes())
  path = tmp_path / "view.pth"
  path.write_bytes(buf.getvalue())
  np.testing.assert_array_equal(load_state_dict(path)["w"], base[3 + 1:3 + 3])


def test_wrappers_prefixes_and_formats_agree(tmp_path):
  d = golden.require_golden() / "tiny_a"
  sd = load_state_dict(d / "model.pth")
  assert len(sd) > 100 and all(k.startswith("model.") for k in sd)
  tw.save_zip({"model": sd}, tmp_path / "wrapped.pth")
  tw.save_zip({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped2.pth")
  tw.save_legacy(sd, tmp_path / "legacy.pth")
  tw.save_legacy({"model": sd}, tmp_path / "legacy_wrapped.pth")
  for name in ("wrapped", "wrapped2", "legacy", "legacy_wrapped"):
    _assert_same(load_state_dict(tmp_path / f"{name}.pth"), sd)


def test_truncated_zip_is_a_read_error(tmp_path):
  data = (golden.require_golden() / "tiny_a" / "model.pth").read_bytes()
  for cut in (10, 100, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
    path = tmp_path / f"cut{cut}.pth"
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointReadError, match="zip|truncated|corrupt"):
      load_state_dict(path)


def test_corrupt_zip_member_is_a_read_error(tmp_path):
  obj, _ = _sample()
  path = tmp_path / "x.pth"
  tw.save_zip(obj, path)
  raw = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo("archive/data/0")
  # Flip bytes inside the stored data of one storage: the CRC check fails.
  start = info.header_offset + 30 + len(info.filename) + len(info.extra)
  raw[start:start + 4] = bytes(b ^ 0xFF for b in raw[start:start + 4])
  path.write_bytes(bytes(raw))
  with pytest.raises(CheckpointReadError, match="archive/data/0"):
    load_state_dict(path)


def test_missing_storage_entry(tmp_path):
  obj, _ = _sample()
  path = tmp_path / "x.pth"
  tw.save_zip(obj, path, skip=("archive/data/1",))
  with pytest.raises(CheckpointReadError, match="archive/data/1 is missing"):
    load_state_dict(path)


def test_truncated_legacy_is_a_read_error(tmp_path):
  obj, _ = _sample()
  data = tw.legacy_bytes(obj)
  cuts = sorted({1, 5, 12, 30, 60, len(data) // 4, len(data) // 2, len(data) - 9,
                 len(data) - 1})
  for cut in cuts:
    path = tmp_path / f"cut{cut}.pth"
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointReadError) as info:
      load_state_dict(path)
    assert "legacy" in str(info.value) or "PyTorch" in str(info.value), (cut, info.value)


def test_legacy_size_mismatch(tmp_path):
  data = bytearray(tw.legacy_bytes({"a": np.ones(4, np.float32)}))
  # The storage record is the last 8 + 16 bytes: corrupt its element count.
  data[-24:-16] = np.int64(5).tobytes()
  path = tmp_path / "bad.pth"
  path.write_bytes(bytes(data))
  with pytest.raises(CheckpointReadError, match="holds 5 elements, expected 4"):
    load_state_dict(path)


def test_not_a_checkpoint(tmp_path):
  for name, blob in (("empty", b""), ("text", b"hello world\n" * 10),
                     ("npy", b"\x93NUMPY" + bytes(50))):
    path = tmp_path / f"{name}.pth"
    path.write_bytes(blob)
    with pytest.raises(CheckpointReadError, match="not a PyTorch checkpoint"):
      load_state_dict(path)
  with pytest.raises(FileNotFoundError):
    load_state_dict(tmp_path / "nope.pth")


def _hostile(marker):
  """A 'state dict' whose value would run a shell command when unpickled by pickle.load."""

  class Evil:
    def __reduce__(self):
      return (tw.Global("os", "system"), (f"touch {marker}",))

  return {"model.backbone.x": np.ones(2, np.float32), "model.evil": Evil()}


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_disallowed_global_is_refused(tmp_path, fmt):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  (tw.save_zip if fmt == "zip" else tw.save_legacy)(_hostile(marker), path)
  with pytest.raises(CheckpointReadError, match="refusing to unpickle os.system"):
    read_pth(path)
  assert not marker.exists()


def test_non_tensor_entries_are_rejected(tmp_path):
  path = tmp_path / "x.pth"
  tw.save_zip({"model.a": np.ones(2, np.float32), "model.b": 3}, path)
  with pytest.raises(CheckpointReadError, match="not tensors"):
    load_state_dict(path)
