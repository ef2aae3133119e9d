"""grain pipelines: batch contents, host sharding, mixing, epochs, exact resume, to_global."""

import dataclasses
import json
import time

import jax
from jax.sharding import AxisType, PartitionSpec as P
import numpy as np
import pytest

from imprint_jax.data import feed, pipeline, prepared, schema
from imprint_jax.data_prep import shards
from imprint_jax.errors import UserError
from imprint_jax.parallel import sharding

E, G = 32, 64
N_IMG, N_VID = 24, 12
VID_BASE = 1000  # pair_ids of the video source start here


def _ellipse(size, rng):
  yy, xx = np.mgrid[:size, :size]
  cx, cy = rng.uniform(0.3, 0.7, 2) * size
  a, b = rng.uniform(0.1, 0.3, 2) * size
  return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 < 1


def _records(n, kind, start, seed):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    om, tm = _ellipse(E, rng), _ellipse(G, rng)
    obj = np.full((E, E, 3), schema.OBJECT_FILL, np.uint8)
    obj[om] = rng.integers(0, 200, (om.sum(), 3))
    ys, xs = np.nonzero(tm)
    out.append(dict(
        object=obj, object_mask=(om * 255).astype(np.uint8)[..., None],
        target=rng.integers(0, 256, (G, G, 3), dtype=np.uint8),
        target_mask=(tm * 255).astype(np.uint8)[..., None],
        box=np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32) / G,
        source="test", kind=kind, object_id=f"o#{i}", target_id=f"t#{i}", pair_id=start + i))
  return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pairs")
  img, vid = _records(N_IMG, "image", 0, 0), _records(N_VID, "video", VID_BASE, 1)
  shards.write_dataset(root / "img", "train", img, encoder_size=E, generator_size=G,
                       num_shards=2)
  shards.write_dataset(root / "vid", "train", vid, encoder_size=E, generator_size=G)
  records = {r["pair_id"]: r for r in img + vid}
  return str(root / "img"), str(root / "vid"), records


def _cfg(data, **kw):
  img, vid, _ = data
  kw.setdefault("sources", ((img, 1.0),))
  return pipeline.DataConfig(encoder_size=E, generator_size=G, read_threads=0, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a) and a.keys() == b.keys()


def test_stage1_batches(data):
  records = data[2]
  b = next(iter(pipeline.stage1_dataset(_cfg(data), global_batch=4)))
  assert set(b) == {"object", "target", "pair_id"}
  assert b["object"].shape == (4, E, E, 3) and b["object"].dtype == np.float32
  assert b["target"].shape == (4, G, G, 3) and b["target"].dtype == np.float32
  assert b["pair_id"].shape == (4,) and b["pair_id"].dtype == np.int64
  lo = (0 - pipeline.IMAGENET_MEAN) / pipeline.IMAGENET_STD
  hi = (1 - pipeline.IMAGENET_MEAN) / pipeline.IMAGENET_STD
  assert (b["object"] >= lo - 1e-6).all() and (b["object"] <= hi + 1e-6).all()
  assert b["target"].min() >= -1.0 and b["target"].max() <= 1.0
  for i, pid in enumerate(b["pair_id"]):
    rec = records[int(pid)]
    m = rec["target_mask"][..., 0] > 0
    # Background removed (stage 1 is context-agnostic); object pixels kept.
    np.testing.assert_array_equal(b["target"][i][~m], schema.OBJECT_FILL / 127.5 - 1.0)
    np.testing.assert_allclose(b["target"][i][m], rec["target"][m] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_allclose(b["object"][i] * pipeline.IMAGENET_STD + pipeline.IMAGENET_MEAN,
                               rec["object"] / 255.0, atol=1e-5)


def test_stage2_batches(data):
  img, vid, records = data
  cfg = _cfg(data, sources=((img, 1.0), (vid, 1.0)), augment_video_objects=False)
  batches = _take(iter(pipeline.stage2_dataset(cfg, global_batch=4)), 4)
  shapes = {"object": (4, E, E, 3), "target": (4, G, G, 3), "mask": (4, G, G, 1),
            "masked_target": (4, G, G, 3), "mask_level": (4,), "pair_id": (4,)}
  dtypes = {"mask_level": np.int32, "pair_id": np.int64}
  perturbed = kept = 0
  for b in batches:
    assert {k: v.shape for k, v in b.items()} == shapes
    assert all(v.dtype == dtypes.get(k, np.float32) for k, v in b.items())
    assert set(np.unique(b["mask"])) <= {0.0, 1.0}
    assert set(b["mask_level"]) <= {1, 2, 3, 4}
    np.testing.assert_array_equal(b["masked_target"], b["target"] * (1 - b["mask"]))
    assert (b["masked_target"][np.broadcast_to(b["mask"] > 0, b["target"].shape)] == 0).all()
    for i, pid in enumerate(b["pair_id"]):
      rec = records[int(pid)]
      np.testing.assert_allclose(b["target"][i], rec["target"] / 127.5 - 1.0, atol=1e-6)
      precise = rec["target_mask"] > 0
      x0, y0, x1, y1 = np.rint(rec["box"] * G).astype(int)
      box = np.zeros_like(precise)
      box[y0:y1, x0:x1] = True
      mask = b["mask"][i] > 0
      assert not (precise & ~mask).any() and not (mask & ~box).any()  # precise <= mask <= box
      if b["mask_level"][i] == 1:
        np.testing.assert_array_equal(mask, precise)
      if b["mask_level"][i] == 4:
        np.testing.assert_array_equal(mask, box)
      obj = b["object"][i] * pipeline.IMAGENET_STD + pipeline.IMAGENET_MEAN
      same = np.abs(obj - rec["object"] / 255.0).max() < 1e-5
      if rec["kind"] == "image":
        perturbed += not same  # image pairs: the object is always perturbed
      else:
        kept += same  # video pairs: kept as is with augment_video_objects=False
  assert perturbed == sum(int(p) < VID_BASE for b in batches for p in b["pair_id"])
  assert kept == sum(int(p) >= VID_BASE for b in batches for p in b["pair_id"])
  assert perturbed > 0 and kept > 0


def test_hosts_split_each_global_batch(data):
  """Two hosts' batches, concatenated, are the one-host global batches; over an epoch they
  are disjoint and cover the dataset."""
  single = _take(iter(pipeline.stage1_dataset(_cfg(data), global_batch=4)), N_IMG // 4)
  per_host = [_take(iter(pipeline.stage1_dataset(_cfg(data), global_batch=4, process_index=pi,
                                                 process_count=2)), N_IMG // 4)
              for pi in range(2)]
  for g, (a, b) in enumerate(zip(*per_host)):
    for key in single[g]:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), single[g][key])
  seen = [set(np.concatenate([b["pair_id"] for b in host]).tolist()) for host in per_host]
  assert len(seen[0]) == len(seen[1]) == N_IMG // 2  # one epoch: each record once
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(N_IMG))


def test_mixing_weights(data):
  img, vid, _ = data
  cfg = _cfg(data, sources=((img, 3.0), (vid, 1.0)))
  ids = np.concatenate([b["pair_id"] for b in
                        _take(iter(pipeline.stage1_dataset(cfg, global_batch=8)), 25)])
  frac_vid = float(np.mean(ids >= VID_BASE))
  assert abs(frac_vid - 0.25) < 0.03, frac_vid  # 200 draws; grain interleaves exactly
  assert set(ids[ids >= VID_BASE].tolist()) == set(range(VID_BASE, VID_BASE + N_VID))


def test_epochs_differ_and_seeds_repeat(data):
  cfg = _cfg(data)
  run = lambda c: np.stack([b["pair_id"] for b in  # noqa: E731
                            _take(iter(pipeline.stage1_dataset(c, global_batch=4)), 12)])
  ids = run(cfg).reshape(2, N_IMG)  # two epochs
  assert sorted(ids[0]) == sorted(ids[1]) == list(range(N_IMG))
  assert not np.array_equal(ids[0], ids[1])  # re-shuffled every epoch
  np.testing.assert_array_equal(run(cfg).reshape(2, N_IMG), ids)  # same seed, same order
  assert not np.array_equal(run(dataclasses.replace(cfg, seed=1)).reshape(2, N_IMG), ids)
  # Augmentation differs between epochs: the same image pair gets another perturbation.
  it = iter(pipeline.stage2_dataset(cfg, global_batch=N_IMG))
  e1, e2 = next(it), next(it)
  o1 = e1["object"][np.argsort(e1["pair_id"])]
  o2 = e2["object"][np.argsort(e2["pair_id"])]
  assert all(not np.array_equal(a, b) for a, b in zip(o1, o2))


def test_resume_from_saved_state(data):
  cfg = _cfg(data, mask_level_probs=(0.25, 0.25, 0.25, 0.25))
  ds = pipeline.stage2_dataset(cfg, global_batch=4)
  it = iter(ds)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = _take(it, 4)
  resumed = iter(pipeline.stage2_dataset(cfg, global_batch=4))
  resumed.set_state(state)
  assert all(_equal(a, b) for a, b in zip(_take(resumed, 4), expected))


def test_prefetcher_state_is_the_last_consumed_batch(data):
  cfg = _cfg(data)
  ref_it = iter(pipeline.stage2_dataset(cfg, global_batch=4))
  reference = _take(ref_it, 7)
  pf = feed.Prefetcher(iter(pipeline.stage2_dataset(cfg, global_batch=4)), size=3)
  try:
    assert all(_equal(a, b) for a, b in zip(_take(pf, 2), reference[:2]))
    deadline = time.time() + 30
    while not pf._queue.full() and time.time() < deadline:  # 3 batches in flight
      time.sleep(0.01)
    assert pf._queue.full()
    state = json.loads(json.dumps(pf.get_state()))
    raw = iter(pipeline.stage2_dataset(cfg, global_batch=4))
    _take(raw, 2)
    assert state == json.loads(json.dumps(raw.get_state()))
  finally:
    pf.close()
  resumed = feed.Prefetcher(iter(pipeline.stage2_dataset(cfg, global_batch=4)), size=2)
  try:
    _take(resumed, 1)  # a restored run may have moved on: set_state rewinds it
    resumed.set_state(state)
    assert all(_equal(a, b) for a, b in zip(_take(resumed, 5), reference[2:7]))
  finally:
    resumed.close()


def test_worker_processes_match_in_process_and_resume(data):
  cfg = _cfg(data)
  reference = _take(iter(pipeline.stage2_dataset(cfg, global_batch=4)), 5)
  mp_cfg = dataclasses.replace(cfg, num_workers=1, prefetch=1)
  it = iter(pipeline.stage2_dataset(mp_cfg, global_batch=4))
  try:
    assert all(_equal(a, b) for a, b in zip(_take(it, 2), reference[:2]))
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  it = iter(pipeline.stage2_dataset(mp_cfg, global_batch=4))
  try:
    it.set_state(state)
    assert all(_equal(a, b) for a, b in zip(_take(it, 3), reference[2:5]))
  finally:
    it.close()


def test_to_global_on_a_mesh(data):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  batch = next(iter(pipeline.stage2_dataset(_cfg(data), global_batch=8)))
  out = feed.to_global(batch, sharding.batch_sharding(mesh))
  for k, v in batch.items():
    assert out[k].shape == v.shape
    assert out[k].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape[0] for s in out[k].addressable_shards} == {1}
    np.testing.assert_array_equal(np.asarray(out[k]), v.astype(out[k].dtype))
  pf = feed.Prefetcher(iter(pipeline.stage2_dataset(_cfg(data), global_batch=8)),
                       sharding.batch_sharding(mesh))
  try:
    got = next(pf)
    assert isinstance(got["target"], jax.Array)
    np.testing.assert_array_equal(np.asarray(got["target"]), batch["target"])
  finally:
    pf.close()


def test_user_errors(data):
  with pytest.raises(UserError, match="multiple of the 2 JAX processes"):
    pipeline.stage1_dataset(_cfg(data), global_batch=5, process_count=2)
  with pytest.raises(UserError, match="sources is empty"):
    pipeline.stage1_dataset(_cfg(data, sources=()), global_batch=4)
  with pytest.raises(UserError, match="not a prepared dataset"):
    pipeline.stage1_dataset(_cfg(data, sources=(("/nonexistent", 1.0),)), global_batch=4)
  with pytest.raises(UserError, match="no split 'val'"):
    pipeline.stage1_dataset(_cfg(data, split="val"), global_batch=4)
  with pytest.raises(UserError, match="mask_level_probs"):
    pipeline.stage2_dataset(_cfg(data, mask_level_probs=(1.0, 0.0)), global_batch=4)
  with pytest.raises(UserError, match="reader"):
    _cfg(data, reader="tf.data")


def test_readers_agree_and_sizes_are_resampled(data):
  img, _, records = data
  a = next(iter(pipeline.stage2_dataset(_cfg(data), global_batch=4)))
  b = next(iter(pipeline.stage2_dataset(_cfg(data, reader="tfds"), global_batch=4)))
  assert _equal(a, b)
  cfg = pipeline.DataConfig(sources=((img, 1.0),), encoder_size=16, generator_size=48,
                            read_threads=0)
  c = next(iter(pipeline.stage2_dataset(cfg, global_batch=2)))
  assert c["object"].shape == (2, 16, 16, 3) and c["mask"].shape == (2, 48, 48, 1)
  assert set(np.unique(c["mask"])) <= {0.0, 1.0}
  src, features = prepared.open_source(img, "train")
  rec = prepared.decode_record(src[0], features)
  assert rec["kind"] == "image" and rec["object"].shape == (E, E, 3)
  assert int(rec["pair_id"]) in records


class _Failing:
  """An iterator whose third batch fails (stands for a bad record)."""

  def __init__(self):
    self.n = 0

  def __next__(self):
    self.n += 1
    if self.n == 3:
      raise UserError("bad record")
    return {"x": np.full((2,), self.n)}

  def get_state(self):
    return {"n": self.n}

  def set_state(self, state):
    self.n = state["n"]


def test_prefetcher_surfaces_errors_in_order():
  pf = feed.Prefetcher(_Failing(), size=4)
  assert [int(next(pf)["x"][0]) for _ in range(2)] == [1, 2]
  assert pf.get_state() == {"n": 2}
  for _ in range(2):  # raised again on every later call, not a hang
    with pytest.raises(UserError, match="bad record"):
      next(pf)
  pf.set_state({"n": 3})
  assert int(next(pf)["x"][0]) == 4
  pf.close()
