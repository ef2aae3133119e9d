"""The training loop behind `imprint-jax train`.

One jitted, ahead-of-time compiled step with donated state; batches prefetched onto the mesh by
a background thread; no host synchronisation inside the loop except every `log_every` steps,
when the window's metrics are fetched at once (that is also when a NaN/inf loss is detected
and reported with its step and pair ids). Validation loss every `eval_every` steps, sample
grids every `sample_every` steps, asynchronous orbax checkpoints every `checkpoint_every`
steps, and on SIGTERM (TPU preemption) a checkpoint at the next step boundary and a clean exit.
The run holds the workdir's lease (`train.lease`) from start to end; `--resume` restores the
newest checkpoint whose checksums match (`RunCheckpoints.restore_intact`).

The workdir may be a local folder or gs:// (`imprint_jax.storage`): checkpoints go through
orbax, metrics.jsonl, config.json and sample grids through etils epath (each rewritten whole,
so a reader never sees a partial file), TensorBoard events through tensorboardX. Progress is a
bar on a terminal, plain log lines otherwise. `jax_cache_dir` (or JAX_COMPILATION_CACHE_DIR)
keeps compiled steps for a restarted run; `profile_steps=(A, B)` traces steps A..B with
jax.profiler into `<workdir>/profile`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from etils import epath

from imprint_jax import storage
from imprint_jax.parallel import cpu_runtime
from imprint_jax.data import latent_store, token_store
from imprint_jax.errors import UserError
from imprint_jax.parallel import compiler
from imprint_jax.train import data as train_data
from imprint_jax.train import encode_objects
from imprint_jax.train import lease as lease_lib
from imprint_jax.train import setup as setup_lib
from imprint_jax.parallel import sharding
from imprint_jax.train.checkpoints import RunCheckpoints
from imprint_jax.train.steps import make_eval_step, make_train_step

log = logging.getLogger("imprint_jax.train")


class NonFiniteLoss(UserError):
  """The loss became NaN or inf: the message names the step and the batch's pair ids."""


@dataclasses.dataclass
class RunResult:
  final_step: int
  preempted: bool
  last_loss: float | None
  val_loss: float | None


class _Preemption:
  """Sets a flag on SIGTERM; the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no preemption support
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """True on every process once any process was asked to stop (a collective; called at
    logging intervals only when there are several processes)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.asarray(flags).any())


class _Writers:
  """metrics.jsonl + TensorBoard events, on process 0 only.

  metrics.jsonl is rewritten whole at each flush (Cloud Storage objects cannot be appended
  to); flushes happen only after new records, every `log_every` steps. For a gs:// workdir the
  TensorBoard events are written to a local folder and each flush uploads the event file
  whole through epath (what tensorboardX's own GCS writer does, but through gcsfs like every
  other file of the run, and without that writer's upload again at garbage collection)."""

  def __init__(self, workdir: epath.Path, resume_step: int | None):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = workdir / "metrics.jsonl"
    self.lines: list[str] = []
    self.dirty = False
    if not self.enabled:
      return
    if self.jsonl_path.exists():
      self.lines = [l for l in self.jsonl_path.read_text().splitlines() if l]
      if resume_step is not None:
        # Drop lines written after the checkpoint we resume from: they will be recomputed.
        self.lines = [l for l in self.lines if json.loads(l).get("step", 0) <= resume_step]
        self.dirty = True
    # Here, not at the head: tensorboardX imports torch when it is installed, and the
    # training path runs without the torch extra (tests/test_packaging.py).
    from tensorboardX import SummaryWriter
    self.tb_dir = workdir / "tensorboard"
    self.tb_local = (tempfile.mkdtemp(prefix="imprint-jax-tb-")
                     if storage.is_remote(workdir) else None)
    self.tb = SummaryWriter(self.tb_local or str(self.tb_dir))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self.lines.append(json.dumps({"step": step, **scalars}))
    self.dirty = True
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)

  def flush(self) -> None:
    if self.enabled and self.dirty:
      storage.write_text(self.jsonl_path, "".join(l + "\n" for l in self.lines))
      self.tb.flush()
      self._upload_events()
      self.dirty = False

  def _upload_events(self) -> None:
    if self.tb_local is None:
      return
    self.tb_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(self.tb_local)):
      with open(os.path.join(self.tb_local, name), "rb") as f:
        storage.write_bytes(self.tb_dir / name, f.read())

  def close(self) -> None:
    if self.enabled:
      self.flush()
      self.tb.close()
      self._upload_events()
      if self.tb_local is not None:
        shutil.rmtree(self.tb_local, ignore_errors=True)


def _use_compilation_cache(c: ml_collections.ConfigDict) -> None:
  """Points JAX's persistent compilation cache at `jax_cache_dir` (local or gs://), so a
  restarted run loads its compiled steps instead of compiling them again. Empty: JAX's own
  setting (JAX_COMPILATION_CACHE_DIR, if set)."""
  folder = c.get("jax_cache_dir", "")
  if folder:
    folder = str(storage.path(folder))
    if jax.config.jax_compilation_cache_dir != folder:
      jax.config.update("jax_compilation_cache_dir", folder)
      compilation_cache.reset_cache()  # the cache binds its folder at the first compile
  if jax.config.jax_compilation_cache_dir:
    log.info("JAX compilation cache: %s", jax.config.jax_compilation_cache_dir)


class _Profiler:
  """A jax.profiler trace of steps A..B (`profile_steps=(A, B)`) into `<workdir>/profile`
  (traced into a local folder, then copied, when the workdir is gs://)."""

  def __init__(self, c: ml_collections.ConfigDict, workdir: epath.Path):
    steps = tuple(c.get("profile_steps", ()) or ())
    if steps and (len(steps) != 2 or not all(isinstance(s, int) for s in steps)
                  or not 1 <= steps[0] <= steps[1]):
      raise UserError(f"profile_steps={steps!r}: expected two steps A,B with 1 <= A <= B")
    self.first, self.last = steps if steps else (0, -1)
    self.out = workdir / "profile"
    self.local = None
    self.active = False

  def before(self, step: int) -> None:
    """Called before running step `step` (1-based)."""
    if step == self.first and jax.process_index() == 0:
      if storage.is_remote(self.out):
        self.local = tempfile.mkdtemp(prefix="imprint-jax-profile-")
      else:
        self.out.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(self.local or str(self.out))
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and (step >= self.last):
      self.stop(state)

  def stop(self, state) -> None:
    if not self.active:
      return
    try:
      jax.block_until_ready(state)
    except Exception:  # stopping after a failed step: its buffers may be gone
      pass
    jax.profiler.stop_trace()
    self.active = False
    if self.local is not None:
      for root, _, files in os.walk(self.local):
        for name in files:
          src = os.path.join(root, name)
          dst = self.out / os.path.relpath(src, self.local)
          dst.parent.mkdir(parents=True, exist_ok=True)
          dst.write_bytes(open(src, "rb").read())
      shutil.rmtree(self.local, ignore_errors=True)
    log.info("profile of steps %d-%d written to %s", self.first, self.last, self.out)


def _memory_report(compiled) -> str:
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return "memory analysis unavailable on this backend"
  if m is None:
    return "memory analysis unavailable on this backend"
  gib = 1 / 2**30
  return (f"per device: arguments {m.argument_size_in_bytes * gib:.2f} GiB, outputs"
          f" {m.output_size_in_bytes * gib:.2f} GiB (aliased {m.alias_size_in_bytes * gib:.2f}),"
          f" temporaries {m.temp_size_in_bytes * gib:.2f} GiB")


def compile_steps(setup: setup_lib.Setup):
  """AOT-compiled train step (donated state) and jitted eval step."""
  c = setup.config
  repl = NamedSharding(setup.mesh, P())
  batch_spec = setup.batch_spec(c.train.global_batch)
  batch_sh = {k: v.sharding for k, v in batch_spec.items()}
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      setup.abstract_state, setup.state_shardings)
  rng_spec = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
  step_fn = make_train_step(setup.stage, setup.graphdef, setup.tx, setup.step_cfg)
  jitted = jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_sh, repl),
                   out_shardings=(setup.state_shardings, repl), donate_argnums=0)
  t0 = time.time()
  target = setup.mesh.devices.flat[0].platform
  cpu_runtime.on_platform(target)
  # The mesh's platform picks the model's attention/GroupNorm forms (it differs from JAX's
  # default backend when compiling for a TPU topology from a CPU host); activations' sharding
  # constraints refer to the mesh and the config's logical-axis rules.
  with (jax.set_mesh(setup.mesh), compiler.compiling_for(target),
        sharding.logical_rules(setup.rules)):
    compiled = jitted.lower(abstract_state, batch_spec, rng_spec).compile(
        compiler_options=compiler.compiler_options(target))
  log.info("compiled stage-%d step in %.1f s; %s", setup.stage, time.time() - t0,
           _memory_report(compiled))
  # One sharding for every batch entry: validation batches may carry more keys than the step's.
  eval_jit = jax.jit(make_eval_step(setup.stage, setup.graphdef, setup.step_cfg),
                     in_shardings=(setup.state_shardings, sharding.batch_sharding(setup.mesh),
                                   repl), out_shardings=repl,
                     compiler_options=compiler.compiler_options(target))

  def eval_fn(state, batch, rng):
    with jax.set_mesh(setup.mesh), sharding.logical_rules(setup.rules):
      return eval_jit(state, batch, rng)

  return compiled, eval_fn


def _first_bad_step(window, values) -> tuple[int, list[int]] | None:
  for (step, ids), loss in zip(window, values):
    if not np.isfinite(loss):
      return step, ids
  return None


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, resume: bool = False,
          stop_after: int | None = None, takeover: bool = False) -> RunResult:
  """Runs (or resumes) a training run in `workdir`. `stop_after` ends the run early at that
  step, as if preempted (for tests and experiments). `takeover`: take the workdir's lease even
  if another run seems to hold it (see `train.lease`)."""
  if not log.handlers:  # absl may own the root logger: give ours its own handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
  workdir = storage.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  lease = lease_lib.hold(workdir, ttl_s=config.get("lease_ttl_s", 60.0), takeover=takeover)
  with lease:
    return _train(config, workdir, resume=resume, stop_after=stop_after, lease=lease)


def _train(config, workdir: epath.Path, *, resume: bool, stop_after: int | None, lease
           ) -> RunResult:
  c = config
  _use_compilation_cache(c)
  profiler = _Profiler(c, workdir)
  sources = train_data.resolve_sources(c, workdir)
  steps_per_epoch = train_data.steps_per_epoch(sources, c.train.global_batch, c)
  total_steps = c.train.num_steps if c.train.num_steps > 0 else c.train.epochs * steps_per_epoch
  if total_steps <= 0:
    raise UserError(f"the run has {total_steps} steps: fewer pairs than one global batch"
                    f" ({c.train.global_batch})")
  setup = setup_lib.build(c, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  phases = setup_lib.check_phases(c, setup.boundaries, total_steps)
  if setup_lib.uses_object_tokens(c):
    token_store.check_sources(token_store.load_manifest(c.data.object_tokens), sources)
  if setup_lib.uses_latents(c):
    token_store.check_sources(latent_store.load_manifest(c.data.latents), sources, "latents",
                              latent_store.COMMAND)

  ckpts = RunCheckpoints(workdir, keep=c.keep_checkpoints, use_async=c.async_checkpoints)
  latest = ckpts.latest_step()
  data_state = None
  if latest is not None and not resume:
    raise UserError(f"{workdir} already holds checkpoints (latest step {latest}); pass --resume"
                    " to continue or use a new --workdir")
  log.info("stage %d: %d steps (%d per epoch), global batch %d, mesh %s", c.stage, total_steps,
           steps_per_epoch, c.train.global_batch, dict(setup.mesh.shape))
  log.info("%s", phases)
  if resume and latest is not None:
    state, meta = ckpts.restore_intact(setup)
    data_state = meta.get("data_state")
    start = int(meta["step"])
    log.info("resumed from step %d", start)
  else:
    t0 = time.time()
    state = setup_lib.init_state(setup)
    start = 0
    log.info("initialised the state in %.1f s", time.time() - t0)
  if setup_lib.uses_object_tokens(c):
    dist = encode_objects.check_encoder(setup, state)
    log.info("object tokens from %s: made by this run's encoder (probe distance %.2g)",
             c.data.object_tokens, dist)
  if setup_lib.uses_latents(c):
    dist = encode_objects.check_vae(setup, state)
    log.info("latents from %s: made by this run's VAE (probe distance %.2g)", c.data.latents,
             dist)
  if jax.process_index() == 0:
    storage.write_text(workdir / "config.json", c.to_json_best_effort(indent=2) + "\n")

  compiled, eval_fn = compile_steps(setup)
  train_it = train_data.train_iterator(c, setup, sources)
  if data_state is not None:
    train_it.set_state(data_state)
  val_batches = train_data.val_batches(c, setup, sources)
  log.info("data ready: %d validation batches", len(val_batches))
  writers = _Writers(workdir, start if resume else None)
  rng = jax.device_put(jax.random.PRNGKey(c.seed), NamedSharding(setup.mesh, P()))
  eval_rng = jax.random.PRNGKey(c.seed + 1)
  end = total_steps if stop_after is None else min(total_steps, stop_after)

  def meta_at(step):
    return {"step": step, "stage": setup.stage, "data_state": train_it.get_state(),
            "config": json.loads(c.to_json_best_effort()),
            "model": setup.model_cfg.to_dict()}

  def validate(state) -> float | None:
    if not val_batches:
      return None
    losses = [eval_fn(state, b, jax.random.fold_in(eval_rng, i))["loss"]
              for i, b in enumerate(val_batches)]
    return float(np.mean(jax.device_get(losses)))

  progress = None
  t_start, start_step = time.time(), start
  if jax.process_index() == 0 and sys.stderr.isatty():  # a bar on a terminal, lines elsewhere
    progress = tqdm(total=total_steps, initial=start, desc=f"stage {setup.stage}",
                    dynamic_ncols=True, file=sys.stderr)
  window: collections.deque = collections.deque()
  pending: list[dict[str, Any]] = []
  last_loss, val_loss, preempted = None, None, False
  t_window = time.time()
  step = start

  def flush_metrics():
    """Fetches the window's metrics (the loop's only host sync), checks them, logs them."""
    nonlocal last_loss, t_window
    if not pending:
      return
    fetched = jax.device_get(pending)
    bad = _first_bad_step(window, [m["loss"] for m in fetched])
    if bad is not None:
      raise NonFiniteLoss(f"non-finite loss at step {bad[0]} (batch pair ids"
                          f" {bad[1][:16]}{'...' if len(bad[1]) > 16 else ''}); stopping")
    for (s, _), m in zip(window, fetched):
      writers.write(s, {k: float(v) for k, v in m.items()})
    last_loss = float(fetched[-1]["loss"])
    dt = time.time() - t_window
    img_s = len(fetched) * c.train.global_batch / dt
    if progress is not None:
      progress.update(len(fetched))
      progress.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{img_s:.1f}")
    elif jax.process_index() == 0:
      done = window[-1][0]
      eta = (time.time() - t_start) / max(done - start_step, 1) * (total_steps - done)
      log.info("step %d/%d loss %.4f %.1f img/s ETA %s", done, total_steps, last_loss, img_s,
               time.strftime("%H:%M:%S", time.gmtime(eta)))
    window.clear()
    pending.clear()
    t_window = time.time()

  with _Preemption() as preemption:
    try:
      while step < end:
        batch, ids = next(train_it)
        profiler.before(step + 1)
        state, metrics = compiled(state, batch, rng)
        step += 1
        profiler.after(step, state)
        window.append((step, ids))
        pending.append(metrics)
        boundary = step % c.log_every == 0 or step == end
        if boundary:
          flush_metrics()
          lease.check()
        if c.eval_every and (step % c.eval_every == 0 or step == end):
          val_loss = validate(state)
          if val_loss is not None:
            writers.write(step, {"val_loss": val_loss})
        if c.sample_every and (step % c.sample_every == 0 or step == end):
          train_data.write_samples(c, setup, state, val_batches, workdir / "samples",
                                   step)
        stop = (preemption.agreed() if boundary and jax.process_count() > 1
                else preemption.requested and jax.process_count() == 1)
        if stop and step < end:
          preempted = True
          log.info("SIGTERM: saving a checkpoint at step %d and exiting", step)
          flush_metrics()
          ckpts.save(state, meta_at(step), force=True)
          break
        if step % c.checkpoint_every == 0 or step == end:
          evaluated = c.eval_every and (step % c.eval_every == 0 or step == end)
          ckpts.save(state, meta_at(step), val_loss=val_loss if evaluated else None,
                     force=True)
        writers.flush()
    finally:
      profiler.stop(state)
      ckpts.close()
      writers.close()
      train_it.close()
      if progress is not None:
        progress.close()
  if preempted or (stop_after is not None and step < total_steps):
    log.info("stopped at step %d of %d; continue with --resume", step, total_steps)
  return RunResult(final_step=step, preempted=preempted, last_loss=last_loss, val_loss=val_loss)
