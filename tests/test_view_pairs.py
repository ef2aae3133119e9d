"""Stage-1 pairs drawn on the fly: `prepare --pairing views` keeps every view, the pipeline
draws (i, j) with 1 <= |i - j| <= k at each visit, new every epoch, the same after a resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from imprint_jax.data_prep import prepare, synthetic
from imprint_jax.data import pipeline, prepared, schema
from imprint_jax.errors import UserError

E, G = 32, 64
K = 2
FRAMES = 7
CFG = prepare.PrepareConfig(encoder_size=E, generator_size=G, min_size=8, min_area=0.005,
                            val_fraction=0.0, groups_per_shard=2, num_shards=2, seed=1)


@pytest.fixture(scope="module")
def views(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("views")
  raw = synthetic.generate(tmp / "raw", synthetic.SyntheticConfig(
      groups=3, frames=FRAMES, frame_size=64, seed=2), layouts=("mvimgnet",))
  out = tmp / "pairs"
  summary = prepare.prepare("mvimgnet", raw["mvimgnet"], out, CFG, split="train",
                            progress=False)
  return str(out), summary


def _records(folder):
  source, features = prepared.open_source(folder, "train")
  return [prepared.decode_record(source[i], features) for i in range(len(source))]


def _frame(ident: str) -> str:
  return ident.split("#")[0]


def test_prepare_keeps_every_view_and_indexes_them(views):
  folder, summary = views
  assert CFG.pairing == "views"  # the default
  recs = _records(folder)
  index = schema.load_view_index(folder, "train")
  assert summary["splits"]["train"]["pairs"] == len(recs) == len(index["frame_index"])
  assert len(index["groups"]) == 3
  root = Path(summary["root"])
  covered = 0
  for start, n in index["groups"]:
    assert start == covered and n >= 2
    covered += n
    group = recs[start:start + n]
    objects = {r["object_id"].split("/images/")[0] for r in group}
    assert len(objects) == 1  # one object's views, contiguous
    frames = sorted(p.name for p in (root / objects.pop() / "images").iterdir())
    positions = index["frame_index"][start:start + n]
    assert positions == sorted(positions)
    for r, pos in zip(group, positions):
      assert r["kind"] == "view" and r["object_id"] == r["target_id"]
      # The position is the frame's place in the object's sorted frame list.
      assert frames.index(r["object_id"].split("#")[0].rsplit("/", 1)[1]) == pos
  assert covered == len(recs)


def _dataset(folder, **kw):
  cfg = pipeline.DataConfig(sources=((folder, 1.0),), encoder_size=E, generator_size=G,
                            read_threads=0, window=K, draws_per_group=4, seed=5, **kw)
  return pipeline.stage1_dataset(cfg, global_batch=4)


def _pairs(it, n):
  return [tuple(int(p) for p in next(it)["pair_id"]) for _ in range(n)]


def test_pairs_respect_the_window_and_differ_between_epochs(views):
  folder, _ = views
  recs = _records(folder)
  index = schema.load_view_index(folder, "train")
  frame = index["frame_index"]
  group_of = {}
  for g, (start, n) in enumerate(index["groups"]):
    for r in range(start, start + n):
      group_of[r] = g
  per_epoch = len(index["groups"]) * 4 // 4  # objects x draws / batch
  assert pipeline.pairs_per_epoch(folder, "train", K, 4) == len(index["groups"]) * 4
  it = iter(_dataset(folder))
  epochs = [sum(_pairs(it, per_epoch), ()) for _ in range(3)]
  for ids in epochs:
    visits = Counter()
    for pid in ids:
      i, j = pid >> 32, pid & 0xFFFFFFFF
      assert group_of[i] == group_of[j]
      assert 1 <= abs(frame[i] - frame[j]) <= K
      assert recs[i]["object_id"].split("/images/")[0] == recs[j]["object_id"].split(
          "/images/")[0]
      visits[group_of[i]] += 1
    assert set(visits.values()) == {4}  # every object visited draws_per_group times an epoch
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  # The batch is the pair: object of view i, target of view j (background removed).
  batch = next(iter(_dataset(folder)))
  i, j = int(batch["pair_id"][0]) >> 32, int(batch["pair_id"][0]) & 0xFFFFFFFF
  want = pipeline.normalize_object(recs[i]["object"][None])[0]
  np.testing.assert_allclose(batch["object"][0], want, atol=1e-6)
  assert not np.array_equal(recs[i]["target"], recs[j]["target"])


def test_same_pairs_for_the_same_seed_and_step_after_a_resume(views):
  folder, _ = views
  it = iter(_dataset(folder))
  _pairs(it, 5)
  state = it.get_state()
  after = _pairs(it, 6)
  resumed = iter(_dataset(folder))
  resumed.set_state(state)
  assert _pairs(resumed, 6) == after
  assert _pairs(iter(_dataset(folder)), 11)[5:] == after  # and the same as a fresh run
  other = iter(pipeline.stage1_dataset(pipeline.DataConfig(
      sources=((folder, 1.0),), encoder_size=E, generator_size=G, read_threads=0, window=K,
      draws_per_group=4, seed=6), global_batch=4))
  assert _pairs(other, 11) != _pairs(iter(_dataset(folder)), 11)  # another seed, other pairs


def test_bad_pairing_values_fail_clearly(views):
  folder, _ = views
  with pytest.raises(UserError, match="draws_per_group=0"):
    pipeline.DataConfig(sources=((folder, 1.0),), draws_per_group=0)
  with pytest.raises(UserError, match="data.window=0"):
    pipeline.DataConfig(sources=((folder, 1.0),), window=0)
  with pytest.raises(UserError, match="--pairing must be one of views, pairs"):
    prepare.PrepareConfig(pairing="random").validate()
