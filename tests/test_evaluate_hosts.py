"""`imprint-jax evaluate` on two hosts (two processes, jax.distributed on 127.0.0.1, one CPU
device each) writes the report one process writes: the same pairs, per-pair scores, averages,
FID over all pairs, table and images.

The model, metric networks and test set are those of tests/test_evaluate.py, smaller: 4 Pixabay
pairs, DINO and FID (CLIP scores through the same code as DINO), 2 DDIM steps, batches of 2.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from imprint_jax.cli import distributed
from imprint_jax.data_prep import prepare, synthetic
from imprint_jax.evaluation import metrics, methods, runner
from test_evaluate import MB, PREP, SYN, ckpt, weights  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def pixabay(tmp_path_factory):
  raw = synthetic.generate(tmp_path_factory.mktemp("raw"), dataclasses.replace(SYN, groups=4),
                           layouts=("images",))
  folder = tmp_path_factory.mktemp("pixabay")
  prepare.prepare("images", raw["images"], folder, dataclasses.replace(PREP, instances="largest"),
                  split="test", progress=False)
  return folder


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_hosts_write_the_report_of_one(pixabay, weights, ckpt, tmp_path):  # noqa: F811
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=1"]))
  argv = ["evaluate", "--ckpt", ckpt, "--testset", "pixabay", "--root", pixabay, "--out",
          "two", "--dino", weights / "dino", "--inception", weights / "inception.safetensors",
          "--metric-batch", MB, "--steps", 2, "--batch-size", 2]
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "imprint_jax.cli", *map(str, argv), "--coordinator",
       f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)], cwd=tmp_path,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in range(2)]

  # Meanwhile the reference in this process, on one device as each host has.
  suite = metrics.load_suite(dino=weights / "dino", inception=weights / "inception.safetensors",
                             batch_size=MB)
  generate = methods.model_generator(ckpt, steps=2, batch_size=2, devices=jax.devices()[:1])
  settings = {"ckpt": str(ckpt), "images": None, "steps": 2, "guidance": 5.0}
  one = runner.evaluate(pixabay, "pixabay", tmp_path / "one", {"imprint": generate}, suite,
                        batch_size=2, settings=settings, progress=False)

  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "process 1 of 2 scored 2 of 4 pairs" in outs[1], outs[1][-2000:]
  two_dir = tmp_path / "two"
  two = json.loads((two_dir / "metrics.json").read_text())
  assert one["pairs"] == two["pairs"] == 4 and one["methods"]["imprint"]["fid"] is not None
  assert list(two["methods"]) == list(one["methods"]) == ["imprint", methods.COPY_PASTE]
  for name, r in one["methods"].items():
    assert [k for k, v in r.items() if v is None] == ["clip", "dreamsim"]
    for key in ("dino", "fid"):
      assert two["methods"][name][key] == pytest.approx(r[key], rel=1e-4, abs=1e-6), (name, key)
  assert {**two, "methods": None} == {**one, "methods": None}
  rows = lambda d: [json.loads(x) for x in (d / "scores.jsonl").read_text().splitlines()]  # noqa
  a, b = rows(tmp_path / "one"), rows(two_dir)
  assert [(r["pair_id"], r["method"]) for r in a] == [(r["pair_id"], r["method"]) for r in b]
  assert [r["dino"] for r in b] == pytest.approx([r["dino"] for r in a], rel=1e-4, abs=1e-6)
  files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
  assert files(two_dir) == files(tmp_path / "one")
  for path in (two_dir / "images" / "imprint").glob("*.png"):
    x = np.asarray(Image.open(path)).astype(int)
    y = np.asarray(Image.open(tmp_path / "one" / "images" / "imprint" / path.name)).astype(int)
    assert np.abs(x - y).max() <= 1, path.name
  assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # shares removed


def test_host_share_is_composites_split():
  pairs = list(range(7))
  shares = [distributed.host_share(pairs, k, 3) for k in range(3)]
  assert shares == [[0, 3, 6], [1, 4], [2, 5]]
  assert sorted(sum(shares, [])) == pairs
