"""grain loader: deterministic in the seed, the iterator state restored (orbax,
as the train loop saves it, and get_state/set_state) continues with the
identical batches, the global batches do not depend on the process count, and
worker processes do not change the batches."""

import jax
import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from semsam_jax.data import data_config, make_train_loader, sa1b, synthetic

N = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("loader")
  synthetic.generate(str(root / "src"), N, seed=5, image_size=32, objects_per_image=(1, 3),
                     progress=False)
  sa1b.build([str(root / "src")], str(root / "data"), progress=False, log=lambda m: None)
  return str(root / "data")


def _config(data_dir, seed=0, batch_size=2, **data):
  d = data_config()
  d.update(dict(data_dir=data_dir, image_size=32, max_num_instance=8, max_masks_per_image=64,
                min_scale=0.8, max_scale=1.2, **data))
  return ml_collections.ConfigDict(dict(
      seed=seed, batch_size=batch_size, data=d,
      model=dict(decoder=dict(num_mask_tokens=6))))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _differ(a, b):
  return any(not np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batch_format_and_determinism(data_dir):
  a = _take(iter(make_train_loader(_config(data_dir), process_index=0, process_count=1)), 6)
  b = _take(iter(make_train_loader(_config(data_dir), process_index=0, process_count=1)), 6)
  _same(a, b)
  c = _take(iter(make_train_loader(_config(data_dir, seed=1), process_index=0,
                                   process_count=1)), 6)
  assert _differ(a, c)
  shapes = {"image": ((2, 32, 32, 3), np.uint8), "masks": ((2, 64, 32, 4), np.uint8),
            "mask_valid": ((2, 64), bool), "mask_boxes": ((2, 64, 4), np.float32),
            "click_xy": ((2, 8, 2), np.int32), "prompt_mask": ((2, 8), np.int32),
            "prompt_valid": ((2, 8), bool), "target_index": ((2, 8, 6), np.int32),
            "target_valid": ((2, 8, 6), bool), "image_size": ((2, 2), np.int32),
            "example_id": ((2,), np.int32), "num_dropped_prompts": ((2,), np.int32)}
  for batch in a:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes
    assert batch["prompt_valid"].all() and batch["target_valid"][..., 0].all()
  # Each epoch visits every example once, in a new order, with new augmentations.
  ids = [np.concatenate([x["example_id"] for x in a[e * 3:(e + 1) * 3]]) for e in range(2)]
  assert sorted(ids[0]) == sorted(ids[1]) == list(range(N))
  assert list(ids[0]) != list(ids[1])
  first = {int(i): x["image"][j] for x in a[:3] for j, i in enumerate(x["example_id"])}
  second = {int(i): x["image"][j] for x in a[3:] for j, i in enumerate(x["example_id"])}
  assert any(not np.array_equal(first[i], second[i]) for i in range(N))


def test_restored_iterator_continues_identically(data_dir, tmp_path):
  cfg = _config(data_dir)
  it = iter(make_train_loader(cfg, process_index=0, process_count=1))
  _take(it, 2)
  state = it.get_state()
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  path = tmp_path / "ckpt"
  ckptr.save(path, args=ocp.args.Composite(
      data_iter=grain.checkpoint.CheckpointSave(it),
      params=ocp.args.StandardSave({"w": np.arange(3.0)})))
  ref = _take(it, 4)                     # crosses the epoch boundary (3 batches per epoch)
  it2 = iter(make_train_loader(cfg, process_index=0, process_count=1))
  _take(it2, 1)                          # somewhere else
  restored = ckptr.restore(path, args=ocp.args.Composite(
      data_iter=grain.checkpoint.CheckpointRestore(it2),
      params=ocp.args.StandardRestore({"w": np.zeros(3)})))
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(3.0))
  _same(_take(it2, 4), ref)
  it3 = iter(make_train_loader(cfg, process_index=0, process_count=1))
  it3.set_state(state)
  _same(_take(it3, 4), ref)


def _global(batches_per_process):
  """Process 0's rows, then process 1's, ... of each step (what JAX assembles)."""
  return [{k: np.concatenate([b[k] for b in step]) for k in step[0]}
          for step in zip(*batches_per_process)]


@pytest.mark.parametrize("batch_size,counts", [(2, (2,)), (4, (2, 4))])
def test_global_batches_do_not_depend_on_the_process_count(data_dir, batch_size, counts):
  steps = 5                                   # 10 or 20 examples: across epoch boundaries
  cfg = _config(data_dir, batch_size=batch_size)
  one = _take(iter(make_train_loader(cfg, process_index=0, process_count=1)), steps)
  ids = np.concatenate([b["example_id"] for b in one])
  # The global stream is a new permutation of the split every epoch.
  for e in range(len(ids) // N):
    assert sorted(ids[e * N:(e + 1) * N]) == list(range(N))
  assert list(ids[:N]) != list(ids[N:2 * N])
  for P in counts:
    parts = [_take(iter(make_train_loader(cfg, process_index=p, process_count=P)), steps)
             for p in range(P)]
    assert all(b["image"].shape[0] == batch_size // P for part in parts for b in part)
    # Process p holds rows [p B/P, (p+1) B/P) of every global batch: same ids,
    # same augmentations as one process.
    _same(_global(parts), one)
  # A restored iterator of one process of several continues with its own rows.
  it = iter(make_train_loader(cfg, process_index=1, process_count=counts[-1]))
  _take(it, 2)
  state = it.get_state()
  ref = _take(it, 3)
  it2 = iter(make_train_loader(cfg, process_index=1, process_count=counts[-1]))
  it2.set_state(state)
  _same(_take(it2, 3), ref)


def test_sharding_by_jax_process_by_default(data_dir, monkeypatch):
  cfg = _config(data_dir, batch_size=2)
  # By default the process index/count come from JAX (grain's ShardByJaxProcess).
  monkeypatch.setattr(jax, "process_index", lambda *a: 1)
  monkeypatch.setattr(jax, "process_count", lambda *a: 2)
  b = _take(iter(make_train_loader(cfg)), N // 2)
  explicit = _take(iter(make_train_loader(cfg, process_index=1, process_count=2)), N // 2)
  _same(b, explicit)
  with pytest.raises(ValueError, match="not divisible"):
    make_train_loader(_config(data_dir, batch_size=3))


def test_worker_processes_give_the_same_batches(data_dir):
  ref = _take(iter(make_train_loader(_config(data_dir), process_index=0, process_count=1)), 4)
  it = iter(make_train_loader(_config(data_dir, worker_count=2), process_index=0,
                              process_count=1))
  got = _take(it, 2)
  state = it.get_state()
  got += _take(it, 2)
  _same(got, ref)
  it2 = iter(make_train_loader(_config(data_dir, worker_count=2), process_index=0,
                               process_count=1))
  it2.set_state(state)
  _same(_take(it2, 2), ref[2:])


def test_show_writes_a_picture(data_dir, tmp_path, capsys):
  from PIL import Image
  from semsam_jax.data import __main__ as cli
  out = tmp_path / "x.png"
  assert cli.main(["show", data_dir, "--index", "1", "--output", str(out), "--image-size", "32",
                   "--dpi", "40"]) == 0
  assert "60 prompts" in capsys.readouterr().out
  with Image.open(out) as im:
    assert im.size[0] > 100 and im.size[1] > 100
  assert cli.main(["show", data_dir, "--index", str(N), "--output", str(out)]) == 1
