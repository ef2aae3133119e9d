"""Training: tiny stage 1 -> stage 2 on synthetic data, sharding, multi-process, preemption.

All runs use the tiny configs (configs/stage{1,2}.py:tiny) on the 8 virtual CPU devices that
`make test` sets up, with the synthetic datasets prepared once for the module.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx

from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax.data import pipeline
from imprint_jax.data_prep import sources as data_sources
from imprint_jax.errors import UserError
from imprint_jax.train import loop, optim, run_config
from imprint_jax.train import data as train_data
from imprint_jax.train import setup as setup_lib

REPO = Path(__file__).resolve().parents[1]
STEPS = 16


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Synthetic datasets in their real layouts, prepared once: {layout: folder}."""
  root = tmp_path_factory.mktemp("data")
  c = run_config.load("configs/stage2.py:tiny")
  out = {}
  for layout in ("mvimgnet", "images", "youtube_vos"):
    folder = root / layout
    data_sources.prepare_synthetic(layout, folder, c)
    out[layout] = str(folder)
  return out


def tiny(stage: int, sources: dict, **overrides):
  c = run_config.load(f"configs/stage{stage}.py:tiny")
  c.data.sources = (((sources["mvimgnet"], 1.0),) if stage == 1 else
                    ((sources["images"], 2.0), (sources["youtube_vos"], 1.0)))
  c.train.num_steps = STEPS
  c.log_every = 4
  c.eval_every = 8
  c.checkpoint_every = 8
  c.sample_every = 0
  if stage == 2:
    c.phases.steps = (STEPS // 2,)
  for key, value in overrides.items():
    run_config.apply_override(c, f"{key}={value!r}")
  return c


def losses(workdir) -> dict[int, float]:
  out = {}
  for line in (epath.Path(str(workdir)) / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec
  return out


def _params(state: dict, part: str) -> dict:
  return {p: np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state[part])}


def _assert_identical(a: dict, b: dict, what: str):
  assert a.keys() == b.keys()
  for k in a:
    assert np.array_equal(a[k], b[k]), f"{what} changed at {jax.tree_util.keystr(k)}"


@pytest.fixture(scope="module")
def stage1_run(sources, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("stage1")
  c = tiny(1, sources, sample_every=STEPS)
  result = loop.train(c, workdir)
  return c, workdir, result


def test_stage1_learns_and_keeps_frozen_parts(stage1_run):
  c, workdir, result = stage1_run
  assert result.final_step == STEPS and not result.preempted
  m = losses(workdir)
  assert sorted(m) == list(range(1, STEPS + 1))
  first = np.mean([m[s]["loss"] for s in range(1, 5)])
  last = np.mean([m[s]["loss"] for s in range(STEPS - 3, STEPS + 1)])
  assert last < 0.6 * first, (first, last)  # measured: about 1.2 -> 0.4
  assert (workdir / "samples" / f"step_{STEPS:07d}.png").is_file()
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  # Frozen in stage 1: the UNet's encoder half and the VAE. Compare with a fresh init.
  setup = setup_lib.build(c, total_steps=STEPS, steps_per_epoch=STEPS)
  init = setup_lib.full_model_state(setup_lib.init_state(setup))
  final, _ = ckpt_lib.load_model(ckpt_lib.resolve(workdir, which="latest"))
  final = nnx.to_pure_dict(nnx.state(final, nnx.Param))
  _assert_identical(_params(init, "vae"), _params(final, "vae"), "VAE")
  init_unet, final_unet = _params(init, "unet"), _params(final, "unet")
  rest = [k for k in init_unet if optim.component_of(("unet",) + k) == "unet_rest"]
  assert rest
  _assert_identical({k: init_unet[k] for k in rest}, {k: final_unet[k] for k in rest},
                    "UNet encoder")
  trained = [k for k in init_unet if k not in rest]
  assert any(not np.array_equal(init_unet[k], final_unet[k]) for k in trained)


def test_no_optimizer_state_for_frozen_parameters(sources):
  c = tiny(1, sources)
  setup = setup_lib.build(c, total_steps=STEPS, steps_per_epoch=STEPS)
  opt_leaves = jax.tree.leaves(setup.abstract_state.opt_state)
  n_trained = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  n_frozen = sum(x.size for x in jax.tree.leaves(setup.abstract_state.frozen))
  n_opt = sum(x.size for x in opt_leaves)
  assert n_frozen > 0
  # AdamW keeps mu and nu per trained parameter plus a few scalars (counts, hyperparameters).
  assert 2 * n_trained <= n_opt < 2 * n_trained + 64


def test_state_holds_no_nnx_objects(sources):
  """The step's state is plain dicts of arrays (an nnx.Variable leaf costs a Python call per
  step each time the state is flattened or rebuilt; see steps.TrainState)."""
  setup = setup_lib.build(tiny(1, sources), total_steps=STEPS, steps_per_epoch=STEPS)
  nnx_types = (nnx.Variable, nnx.State)
  for tree in (setup.abstract_state, setup.state_shardings):
    found = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx_types))
             if isinstance(x, nnx_types)]
    assert not found, type(found[0])
  assert type(setup.abstract_state.params) is dict and setup.abstract_state.params
  assert type(setup.abstract_state.frozen["vae"]) is dict


def test_cpu_init_op_by_op_equals_one_jitted_program(sources):
  """`setup._materialise` creates the CPU state op by op (fast to compile); the values must be
  those of the single jitted program accelerators run, in the state's shardings (a 2x2x2 mesh
  here). Bit for bit at XLA's default optimisation level (measured); the suite's
  --xla_backend_optimization_level=0 rounds some of the jitted draws differently by one
  float32 step (6e-8 at 0.4), hence the tolerance."""
  c = tiny(2, sources, **{"init.encoder_from": ""})
  c.allow_random_encoder = True
  c.mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  setup = setup_lib.build(c, total_steps=STEPS, steps_per_epoch=STEPS)
  state = setup_lib.init_state(setup)
  jitted = nnx.to_pure_dict(jax.jit(lambda: setup_lib._random_model(setup))())
  eager = setup_lib.full_model_state(state)
  for part in ("dinov2", "adapter", "unet", "vae"):
    a, b = _params(jitted, part), _params(eager, part)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-12, err_msg=f"{part} {k}")
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(setup.state_shardings)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params))


def test_stage2_from_stage1_swaps_learning_rates(stage1_run, sources, tmp_path):
  _, stage1_dir, _ = stage1_run
  stage1_ckpt = ckpt_lib.resolve(stage1_dir)
  # Like a real run: UNet and VAE from a 4-channel checkpoint (widened to 9 channels), the
  # encoder from stage 1.
  c = tiny(2, sources, **{"init.checkpoint": str(stage1_ckpt),
                          "init.encoder_from": str(stage1_dir)})
  result = loop.train(c, tmp_path)
  assert result.final_step == STEPS
  m = losses(tmp_path)
  first = np.mean([m[s]["loss"] for s in range(1, 5)])
  last = np.mean([m[s]["loss"] for s in range(STEPS - 3, STEPS + 1)])
  assert last < 0.8 * first, (first, last)
  # Learning rates the optimizer applied: phase 1 adapter large / UNet small, then swapped.
  b = STEPS // 2
  for s in range(3, b + 1):  # after the 2-step warmup
    assert m[s]["lr/adapter"] == pytest.approx(1e-3) and m[s]["lr/unet_rest"] == pytest.approx(1e-4)
  for s in range(b + 1, STEPS + 1):
    assert m[s]["lr/adapter"] == pytest.approx(1e-4) and m[s]["lr/unet_rest"] == pytest.approx(1e-3)
    assert m[s]["lr/unet_decoder"] == pytest.approx(1e-3)
  assert "lr/dinov2" not in m[1]  # frozen: no optimizer at all
  # DINOv2 (frozen) is the stage-1 encoder, bit for bit; the adapter moved on from it.
  s1, _ = ckpt_lib.load_model(stage1_ckpt)
  s2, meta = ckpt_lib.load_model(tmp_path)
  assert meta["stage"] == 2 and s2.cfg.unet.in_channels == 9
  s1, s2 = (nnx.to_pure_dict(nnx.state(s, nnx.Param)) for s in (s1, s2))
  _assert_identical(_params(s1, "dinov2"), _params(s2, "dinov2"), "DINOv2")
  _assert_identical(_params(s1, "vae"), _params(s2, "vae"), "VAE")
  a1, a2 = _params(s1, "adapter"), _params(s2, "adapter")
  assert any(not np.array_equal(a1[k], a2[k]) for k in a1)


def test_sharded_step_matches_single_device(sources):
  c = tiny(2, sources, **{"init.encoder_from": "", "train.eps": 1e-6})
  c.allow_random_encoder = True
  data_cfg = train_data.data_config(c, list(c.data.sources), "train")
  batch_np = next(iter(pipeline.stage2_dataset(data_cfg, global_batch=8)))
  results = []
  # One device; the 2x2x2 mesh; the 2x2x2 mesh accumulating over two microbatches of 4 (one
  # sample per device each: the case that hit the XLA bug of the UNet test below).
  for devices, mesh, micro in ((jax.devices()[:1], {"data": 1, "fsdp": 1, "tensor": 1}, 1),
                               (jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2}, 1),
                               (jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2}, 2)):
    c.mesh = mesh
    c.train.microbatches = micro
    setup = setup_lib.build(c, total_steps=STEPS, steps_per_epoch=STEPS, devices=devices)
    if not results:
      state0 = jax.device_get(setup_lib.init_state(setup))
    state = jax.device_put(state0, setup.state_shardings)
    compiled, _ = loop.compile_steps(setup)
    sh = setup.batch_spec(8)
    batch = {k: jax.device_put(batch_np[k], v.sharding) for k, v in sh.items()}
    rng = jax.random.PRNGKey(0)
    trace = []
    for _ in range(3):
      state, metrics = compiled(state, batch, rng)
      trace.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    results.append((trace, jax.device_get(state.params)))
  (trace1, p1), (trace8, p8), (trace_micro, p_micro) = results
  # Losses and gradient norms of three consecutive steps agree to float32 rounding
  # (measured: <= 2e-7 relative). Every sample draws its noise from its own key, so
  # microbatching changes only the order of the sums.
  np.testing.assert_allclose(trace8, trace1, rtol=1e-5)
  np.testing.assert_allclose(trace_micro, trace1, rtol=1e-5)
  # Parameters after three AdamW updates. Adam divides each gradient by its own running RMS,
  # so with the default eps (1e-8) a parameter whose true gradient is zero (attention key
  # biases: |g| ~ 1e-10 of pure rounding noise) would move by ~lr in a direction set by that
  # noise; this test raises eps to 1e-6 (see `c` above) so such parameters stay put and the
  # comparison measures the sharded step, not Adam's amplification of rounding noise.
  for a, b, b_micro in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), jax.tree.leaves(p_micro)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b_micro, a, rtol=1e-4, atol=1e-6)


def test_unet_on_2x2x2_mesh_matches_single_device():
  """The UNet alone, one sample per data x fsdp device, forward and gradients. Without
  sharding.shard_batch on the dense layers' and convolutions' inputs (row-parallel dense:
  outputs), XLA swapped samples 1 and 2 in the mid-block transformer's forward and in the
  backward of convolutions and column-parallel dense layers (see sharding.shard_batch)."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from imprint_jax.models import layers
  from imprint_jax.models.imprint import Imprint
  from imprint_jax.parallel import sharding
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  c = run_config.load("configs/stage2.py:tiny")
  unet = Imprint(setup_lib.model_config(c), rngs=layers.init_rngs(0)).unet
  graphdef, params = nnx.split(unet, nnx.Param)
  k_x, k_ctx = jax.random.split(jax.random.key(1))
  x = jax.random.normal(k_x, (4, 8, 8, unet.cfg.in_channels))
  ctx = jax.random.normal(k_ctx, (4, 7, unet.cfg.cross_attention_dim))
  t = jnp.arange(4) * 100

  def loss(p, x, t, ctx):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x, t, ctx)))

  fwd_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3)))
  want = fwd_grad(params, x, t, ctx)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
  shardings = sharding.tree_shardings(params, mesh, sharding.check_rules(c.logical_axis_rules))
  with jax.set_mesh(mesh):
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    got = fwd_grad(jax.device_put(params, shardings),
                   *(jax.device_put(a, batch) for a in (x, t, ctx)))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(want[1]), jax.tree.leaves(got[1])):  # params, x, ctx
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


def _val_losses(workdir) -> dict[int, float]:
  recs = [json.loads(l) for l in (epath.Path(str(workdir)) / "metrics.jsonl").read_text()
          .splitlines()]
  return {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}


def test_sigterm_on_gcs_then_resume_equals_uninterrupted(stage1_run, sources, gcs, tmp_path,
                                                         monkeypatch):
  """A run in gs:// (the emulator), killed by SIGTERM and resumed, equals the uninterrupted
  local run step for step; nothing lands in a local 'gs:' folder."""
  c, ref_dir, _ = stage1_run
  c = tiny(1, sources, sample_every=0, profile_steps=(2, 3))
  ref = losses(ref_dir)
  monkeypatch.chdir(tmp_path)
  workdir = f"{gcs}/sigterm"
  run = epath.Path(workdir)

  def kill_after_first_log():
    path = run / "metrics.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= 4):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  watcher = threading.Thread(target=kill_after_first_log, daemon=True)
  watcher.start()
  first = loop.train(c, workdir)
  watcher.join(timeout=1)
  assert first.preempted and 4 <= first.final_step < STEPS
  with pytest.raises(UserError, match="--resume"):
    loop.train(c, workdir)  # a workdir with checkpoints needs --resume
  second = loop.train(c, workdir, resume=True)
  assert second.final_step == STEPS
  got = losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  for s in range(1, STEPS + 1):
    assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])
  assert json.loads((run / "config.json").read_text())["train"]["num_steps"] == STEPS
  assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
  assert any(n.endswith(".xplane.pb") for _, _, names in (run / "profile").walk()
             for n in names), "profile_steps wrote no trace"
  # Checkpoint choice through orbax's CheckpointManager: latest, best by val_loss, a step.
  val = _val_losses(workdir)
  best = min(val, key=val.get)
  assert ckpt_lib.resolve(workdir) == run / "checkpoints" / str(STEPS)
  assert ckpt_lib.resolve(workdir, "best") == run / "checkpoints" / str(best)
  assert ckpt_lib.resolve(workdir, str(STEPS)) == run / "checkpoints" / str(STEPS)
  with pytest.raises(UserError, match="no checkpoint of step 3"):
    ckpt_lib.resolve(workdir, "3")
  for dirpath, dirnames, _ in os.walk(tmp_path):
    assert not any(n.startswith("gs:") for n in dirnames), dirpath


def test_resume_skips_a_corrupt_step_and_load_refuses_it(stage1_run, sources, tmp_path):
  """Bytes flipped in the newest step's parameters: `load_model` refuses that step with one
  line naming it and the file; `--resume` falls back to step 8 and reproduces the
  uninterrupted run's losses exactly."""
  from imprint_jax.convert import integrity
  _, ref_dir, _ = stage1_run
  ref = losses(ref_dir)
  c = tiny(1, sources, sample_every=0)
  shutil.copytree(Path(ref_dir) / ckpt_lib.CHECKPOINTS_DIR, tmp_path / ckpt_lib.CHECKPOINTS_DIR)
  shutil.copy(Path(ref_dir) / "metrics.jsonl", tmp_path / "metrics.jsonl")
  step_dir = tmp_path / ckpt_lib.CHECKPOINTS_DIR / str(STEPS)
  victim = max((p for p in (step_dir / "model").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0x10
  victim.write_bytes(bytes(data))
  rel = victim.relative_to(step_dir).as_posix()
  with pytest.raises(integrity.CorruptCheckpoint,
                     match=f"the checkpoint of step {STEPS} is corrupt: {rel} does not match"):
    ckpt_lib.load_model(step_dir)
  result = loop.train(c, tmp_path, resume=True)
  assert result.final_step == STEPS
  got = losses(tmp_path)
  assert sorted(got) == list(range(1, STEPS + 1))
  for s in range(1, STEPS + 1):
    assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])
  assert (tmp_path / ckpt_lib.CHECKPOINTS_DIR / f"corrupt-{STEPS}").is_dir()
  assert integrity.verify(step_dir)  # rewritten by the resumed run


def test_resume_into_another_optimizer_layout_fails_clearly(stage1_run, sources, tmp_path):
  _, ref_dir, _ = stage1_run
  shutil.copytree(Path(ref_dir) / ckpt_lib.CHECKPOINTS_DIR, tmp_path / ckpt_lib.CHECKPOINTS_DIR)
  c = tiny(1, sources, **{"components.unet_decoder": None})  # no optimizer state for it now
  with pytest.raises(UserError, match="does not fit this run's model and optimizer state"):
    loop.train(c, tmp_path, resume=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(stage1_run, sources, tmp_path):
  _, ref_dir, _ = stage1_run
  ref = losses(ref_dir)
  steps = 6
  port = _free_port()
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=4"]))
  sets = [f"data.sources=(({sources['mvimgnet']!r}, 1.0),)", f"train.num_steps={STEPS}",
          "log_every=1", "eval_every=0", "sample_every=0", f"checkpoint_every={steps}"]
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "imprint_jax.cli", "train", "--config",
           "configs/stage1.py:tiny", "--workdir", str(tmp_path / "run"),
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
           "--process-id", str(pid)]
    for s in sets:
      cmd += ["--set", s]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  # Stop both after `steps` steps: SIGTERM once process 0 has logged them.
  path = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 900
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if path.exists() and len(path.read_text().splitlines()) >= steps:
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  got = losses(tmp_path / "run")
  assert len(got) >= steps
  for s in range(1, steps + 1):
    np.testing.assert_allclose(got[s]["loss"], ref[s]["loss"], rtol=1e-5, err_msg=f"step {s}")


def test_bad_config_values_fail_before_compiling(sources, tmp_path):
  c = tiny(1, sources)
  c.components.unet_middle = {"lr": 1e-4}
  with pytest.raises(UserError, match="unknown component label 'unet_middle'"):
    setup_lib.build(c, total_steps=4, steps_per_epoch=4)
  for stage, overrides, message in (
      (1, {"mesh.data": 3, "mesh.fsdp": -1}, "does not divide the 8 devices"),
      (1, {"mesh.data": 3}, "needs 3 devices, but there are 8"),
      (1, {"train.global_batch": 12}, "not divisible by data x fsdp = 8"),
      (1, {"train.microbatches": 3}, "does not split into train.microbatches=3"),
      (1, {"train.microbatches": 0}, "expected a positive integer"),
      (2, {"init.encoder_from": ""}, "stage 2 needs the stage-1 encoder"),
      (2, {"init.encoder_from": str(tmp_path / "nothing")}, "no such checkpoint")):
    with pytest.raises(UserError, match=message):
      setup_lib.build(tiny(stage, sources, **overrides), total_steps=4, steps_per_epoch=4)
  # Through the CLI: one line on stderr, exit status 2.
  out = subprocess.run([sys.executable, "-m", "imprint_jax.cli", "train", "--config",
                        "configs/stage2.py:tiny", "--workdir", str(tmp_path / "w"),
                        "--set", f"init.encoder_from={tmp_path / 'missing'}"],
                       cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith("imprint-jax train: error:")


def test_phase_boundary_past_the_end_is_refused_before_compiling(sources, tmp_path,
                                                                 monkeypatch):
  def no_compile(setup):
    raise AssertionError("compiled a run the phase guard should have refused")

  monkeypatch.setattr(loop, "compile_steps", no_compile)
  monkeypatch.setattr(setup_lib, "init_state", no_compile)
  for bounds in ((STEPS,), (STEPS + 5,), (0,)):
    c = tiny(2, sources, **{"init.encoder_from": "", "phases.steps": bounds})
    c.allow_random_encoder = True
    with pytest.raises(UserError, match=r"phase \d of 2 gets no step: phase boundaries at"
                       rf" steps \[{bounds[0]}\] \(phases.steps=\({bounds[0]},\)\), the run"
                       rf" has {STEPS} steps .*set phases.allow_cut=True"):
      loop.train(c, tmp_path / "w")
  assert not list((tmp_path / "w").glob("checkpoints*"))
  # The full stage-2 config shortened by train.num_steps: the epoch-based boundary is past it.
  full = run_config.load("configs/stage2.py", ["train.num_steps=100"])
  with pytest.raises(UserError, match=r"phase 2 of 2 gets no step.*phases.epochs=\(10,\)"):
    setup_lib.check_phases(full, setup_lib.phase_boundaries(full, 50), 100)
  # Allowed explicitly: the log line says so; a boundary inside the run is logged with its step.
  full.phases.allow_cut = True
  line = setup_lib.check_phases(full, setup_lib.phase_boundaries(full, 50), 100)
  assert "phases.allow_cut=True: phase 2 of 2 gets no step" in line
  assert setup_lib.check_phases(full, [60], 100) == (
      "2 phases (phases.epochs=(10,)): phase 1 steps 1-60, phase 2 steps 61-100")


def test_plan_reports_memory(sources, capsys):
  from imprint_jax.train import plan
  c = tiny(1, sources)
  p = plan.plan(c, {"data": 2, "fsdp": 2, "tensor": 2})
  assert p.mesh == {"data": 2, "fsdp": 2, "tensor": 2}
  assert p.params_bytes > 0 and p.opt_bytes > 0 and p.temp_bytes and p.temp_bytes > 0
  # fsdp x tensor = 4: parameters per device are well below the replicated size.
  assert p.params_bytes < 0.5 * 4 * p.params_total
  assert plan.print_plan(p, hbm_gib=16)
  assert "fits in 16 GiB" in capsys.readouterr().out
  # Accumulating over 2 microbatches: the activations of 4 samples at a time, not 8.
  c.train.microbatches = 2
  p2 = plan.plan(c, {"data": 2, "fsdp": 2, "tensor": 2})
  assert p2.params_bytes == p.params_bytes and p2.opt_bytes == p.opt_bytes
  assert p2.temp_bytes < 0.8 * p.temp_bytes, (p2.temp_bytes, p.temp_bytes)


def test_plan_cli_exit_status(tmp_path):
  """`plan` exits 1 when the step does not fit, 2 with one line for bad input."""
  def run(*args):
    return subprocess.run([sys.executable, "-m", "imprint_jax.cli", "plan", "--config",
                           "configs/stage1.py:tiny", *args], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  out = run("--mesh", "data=2,fsdp=1,tensor=1", "--hbm-gib", "0.001")
  assert out.returncode == 1, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1].split() == ["fits", "in", "0.001", "GiB", "NO"]
  out = run("--mesh", "data=2,fsdp=x,tensor=1")
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(
      "imprint-jax plan: error: --mesh")
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    out = run("--mesh", "data=4,fsdp=1,tensor=1", "--topology", "v5e:2x2")
    assert out.returncode == 2 and "needs the TPU compiler (libtpu)" in out.stderr
