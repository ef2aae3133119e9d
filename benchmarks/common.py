"""What the benchmarks share: process set-up, the CPU-scale model, alternating timing, tables,
device peaks, memory measures, versions.

Nothing here imports JAX at module level: `single_jax_device()` must run before JAX starts.

Fairness rules the benchmarks follow:
  * one JAX device: on CPU the scripts set `--xla_force_host_platform_device_count=1` before
    importing JAX (the test suite's 8 virtual devices would split the cores 8 ways); on an
    accelerator they use `jax.devices()[0]`, the same single device torch gets.
  * the same cores: `--threads N` restricts the whole process to N cores with
    `os.sched_setaffinity` *before* JAX starts (XLA's CPU thread pool is sized from the
    affinity mask; it has no thread-count flag of its own) and calls `torch.set_num_threads(N)`
    (torch's intra-op pool). Default: every core the process may use.
  * alternation: JAX, torch, JAX, torch ... after warm-up, so a change of machine load hits
    both frameworks alike; medians are reported.
  * the same process: `imprint_jax.parallel.cpu_runtime`, which the command line applies too, makes
    glibc keep freed memory for the whole process on a CPU run, so torch's allocations get it
    as well (its steps stop page-faulting like ours); IMPRINT_JAX_CPU_RUNTIME=default runs
    both frameworks with the system's defaults.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 peaks in TFLOP/s per chip (vendor figures). device_kind substring -> peak.
# Order matters: the first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),     # SXM
    ("H200", 989.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),   # v5p reports itself as "TPU v5"
    ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
)


# ------------------------------------------------------------------------------ process set-up

_cpu_runtime = "JAX started before the benchmark: its settings as they were"


def single_jax_device() -> None:
  """Makes JAX see one CPU device and allocate accelerator memory on demand, and applies
  `imprint_jax.parallel.cpu_runtime` as the command line does (call before importing JAX; no effect
  afterwards)."""
  global _cpu_runtime
  if "jax" in sys.modules:
    return
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=1").strip()
  # Both frameworks share one accelerator in one process: JAX must not take 75% of its memory
  # up front (the peaks reported are each allocator's own).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from imprint_jax.parallel import cpu_runtime
  _cpu_runtime = cpu_runtime.configure()


def pin_threads(threads: int | None) -> int:
  """Restricts the process to `threads` cores (all allowed cores when None) for both
  frameworks; returns the number used. See the module docstring."""
  allowed = sorted(os.sched_getaffinity(0))
  n = len(allowed) if not threads else min(threads, len(allowed))
  if n < len(allowed):
    os.sched_setaffinity(0, allowed[:n])
  import torch
  torch.set_num_threads(n)
  return n


@dataclasses.dataclass(frozen=True)
class Env:
  """What both benchmarks set up before measuring: devices, compute dtype, threads."""
  jax_device: Any
  torch_device: Any
  dtype: str
  threads: int


def setup(args) -> Env:
  """Pins the threads (before JAX starts), picks one JAX and one torch device and the compute
  dtype, and prints the header. `args` has the `add_common_flags` flags and --torch-device."""
  from imprint_jax.parallel import cpu_runtime
  started = cpu_runtime.jax_backends_started()
  threads = pin_threads(args.threads)
  import jax
  jax_device = jax.devices()[0]
  retained = cpu_runtime.on_platform(jax_device.platform)
  torch_dev = torch_device(args.torch_device)
  dtype = args.dtype or ("float32" if jax_device.platform == "cpu" else "bfloat16")
  print(header(jax_device, torch_dev, threads, retained))
  if started and args.threads:
    print("note: JAX was already running; its thread pool keeps its size (affinity still"
          " limits the cores)")
  return Env(jax_device=jax_device, torch_device=torch_dev, dtype=dtype, threads=threads)


def add_common_flags(p) -> None:
  p.add_argument("--scale", choices=("cpu", "cpu32", "real", "tiny"), default="cpu",
                 help="cpu: SD-1.5 block structure at narrow widths, 16x16 latents (minutes"
                      " on 2 cores); cpu32: the same at 32x32 latents; "
                      "real: SD 1.5 at 512 px + DINOv2 ViT-g/14 with registers (a GPU/TPU); "
                      "tiny: the test configs' toy model (smoke tests only)")
  p.add_argument("--warmup", type=int, default=2, help="untimed runs of each framework")
  p.add_argument("--repeats", type=int, default=5, help="timed runs of each framework")
  p.add_argument("--threads", type=int, default=None,
                 help="CPU cores for both frameworks (default: all allowed)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default: float32 on CPU, bfloat16 on accelerators)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--gpu-attention", choices=("cudnn", "xla"), default="cudnn",
                 help="our attention on GPUs: cuDNN flash attention where it takes the shapes"
                      " (default), or XLA's fused path everywhere")


# ------------------------------------------------------------------------------ model scales

@dataclasses.dataclass(frozen=True)
class Scale:
  """Model sizes of a benchmark scale, as `configs/*.py` model dicts."""
  name: str
  dinov2: dict
  adapter: dict
  unet: dict
  vae: dict
  encoder_size: int
  generator_size: int
  batch: int


def scale(name: str) -> Scale:
  """`cpu`: SD 1.5's UNet structure (4 levels, CrossAttnDownBlock2D x3 + DownBlock2D, 2 layers
  per block, 8 heads, GEGLU, conv projections) at widths (32, 64, 128, 128), 16x16 latents
  (128 px, VAE factor 8 with narrow widths), a 4-layer width-128 DINOv2 with 4 registers at
  112 px (69 tokens), a 2-block adapter; batch 8.
  `cpu32`: the same networks at 32x32 latents (256 px: the UNet's first level attends over
  1,024 tokens), batch 4.
  `real`: the paper's model: SD 1.5 at 512 px, DINOv2 ViT-g/14 with 4 registers at 224 px
  (261 tokens), the 5-block adapter of configs/stage*.py; batch 8 per device."""
  if name == "cpu":
    return Scale(
        name="cpu",
        dinov2={"hidden_size": 128, "num_layers": 4, "num_heads": 4, "mlp_ratio": 4.0,
                "patch_size": 14, "image_size": 112, "num_register_tokens": 4},
        adapter={"depth": 2, "num_heads": 1, "mlp_ratio": 4.0},
        unet={"block_out_channels": (32, 64, 128, 128), "layers_per_block": 2,
              "attention_head_dim": 8, "cross_attention_dim": 128, "norm_num_groups": 32,
              "sample_size": 16},
        vae={"block_out_channels": (16, 32, 64, 64), "layers_per_block": 2,
             "norm_num_groups": 16, "sample_size": 128},
        encoder_size=112, generator_size=128, batch=8)
  if name == "cpu32":
    cpu = scale("cpu")
    return dataclasses.replace(cpu, name="cpu32", unet=dict(cpu.unet, sample_size=32),
                               vae=dict(cpu.vae, sample_size=256), generator_size=256,
                               batch=4)
  if name == "tiny":
    from imprint_jax.configs import common as configs_common
    m = configs_common.tiny_model()
    adapter = {k: v for k, v in m.adapter.items() if k not in ("in_dim", "out_dim")}
    return Scale(name="tiny", dinov2=dict(m.dinov2), adapter=adapter, unet=dict(m.unet),
                 vae=dict(m.vae), encoder_size=56, generator_size=64, batch=2)
  if name == "real":
    return Scale(name="real", dinov2={"preset": "g", "registers": 4},
                 adapter={"depth": 5, "num_heads": 1, "mlp_ratio": 4.0},
                 unet={"preset": "sd15"}, vae={"preset": "sd"},
                 encoder_size=224, generator_size=512, batch=8)
  raise ValueError(f"unknown scale {name!r}")


def run_config(sc: Scale, stage: int, *, batch: int, dtype: str, remat: str):
  """A training run config (configs/stage{stage}.py) at the benchmark's model sizes."""
  from imprint_jax.train import run_config as rc
  c = rc.load(f"stage{stage}" + (":tiny" if sc.name != "real" else ""))
  if sc.name != "real":
    c.model.dinov2 = dict(sc.dinov2)
    c.model.adapter = dict(sc.adapter)
    c.model.unet = dict(sc.unet, in_channels=4 if stage == 1 else 9)
    c.model.vae = dict(sc.vae)
  c.data.encoder_size = sc.encoder_size
  c.data.generator_size = sc.generator_size
  c.train.global_batch = batch
  c.dtype = dtype
  c.remat = remat
  c.init.checkpoint = ""
  c.init.encoder_from = ""
  c.allow_random_encoder = True  # speed does not depend on the weights
  return c


# ------------------------------------------------------------------------------ timing

def alternate(fns: dict[str, Callable[[], Any]], *, warmup: int, repeats: int
              ) -> dict[str, list[float]]:
  """Runs each blocking callable `warmup` times, then `repeats` rounds of one call each in
  turn; returns the timed seconds per name."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return times


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> str:
  """'median (min-max)' in ms."""
  return f"{median(xs) * 1e3:.0f} ({min(xs) * 1e3:.0f}-{max(xs) * 1e3:.0f})"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table; the first column left-aligned, the others right-aligned."""
  cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

  def line(r):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r, widths)))

  out = [line(cells[0]), "  ".join("-" * w for w in widths)]
  out += [line(r) for r in cells[1:]]
  return "\n".join(out)


# ------------------------------------------------------------------------------ devices

def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak of a device, None when unknown (CPUs)."""
  for key, peak in PEAK_BF16_TFLOPS:
    if key.lower() in device_kind.lower():
      return peak
  return None


def fmt_tflops(flops: float, seconds: float, peak: float | None) -> tuple[str, str]:
  """('achieved TFLOP/s', 'MFU %' or 'n/a')."""
  achieved = flops / seconds / 1e12
  mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
  return (f"{achieved:.3f}" if achieved < 10 else f"{achieved:.1f}"), mfu


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def load_average() -> str:
  one, five, fifteen = os.getloadavg()
  return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def header(jax_device, torch_device, threads: int, retained: bool = False) -> str:
  """Versions, devices and machine load, for the top of a report."""
  import diffusers
  import flax
  import jax
  import jaxlib
  import torch
  import transformers
  lines = [
      f"jax {jax.__version__} (jaxlib {jaxlib.__version__}), flax {flax.__version__};"
      f" torch {torch.__version__}, diffusers {diffusers.__version__}, transformers"
      f" {transformers.__version__}; python {platform.python_version()}",
      f"jax device: {jax_device.platform} {jax_device.device_kind} (1 of"
      f" {len(jax.devices())}); torch device: {torch_device}",
      f"host: {cpu_model()}, {os.cpu_count()} cores, {threads} used by each framework"
      f" (torch intra-op threads {torch.get_num_threads()}); load average {load_average()}",
      f"process settings (imprint_jax.parallel.cpu_runtime, both frameworks): {_cpu_runtime};"
      f" freed memory {'retained' if retained else 'returned to the system'} in this run",
  ]
  return "\n".join(lines)


def gib(n: float | None) -> str:
  return "n/a" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------ memory

def xla_planned_bytes(compiled) -> int | None:
  """Peak device memory XLA planned for a compiled call: arguments + temporaries + outputs not
  aliased to (donated) arguments. None when the backend gives no analysis."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes)


def xla_memory_line(compiled) -> str:
  """XLA's memory plan of a compiled call, in parts."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    m = None
  if m is None:
    return "no memory analysis on this backend"
  return (f"arguments {gib(m.argument_size_in_bytes)}, temporaries {gib(m.temp_size_in_bytes)},"
          f" outputs {gib(m.output_size_in_bytes)} (aliased to donated arguments"
          f" {gib(m.alias_size_in_bytes)})")


def jax_peak_bytes(device) -> int | None:
  """The allocator's peak since the process started (accelerators; None on CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def torch_peak_bytes(fn: Callable[[], Any], device, resident: Sequence[Any]) -> int:
  """Peak tensor memory while `fn()` runs. CUDA: the caching allocator's
  `max_memory_allocated` (reset first). CPU: the bytes of the `resident` tensors (modules'
  parameters and buffers, optimizer state, inputs: pass modules, optimizers and tensors) plus
  the peak of the storages created while `fn()` runs, seen by a dispatch mode that follows
  each new storage until it is freed. The mode slows the call down: never use it on a timed
  run. Call it when no gradients are held (they would count as resident)."""
  import torch
  if device.type == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())
  resident_bytes = _resident_bytes(resident)
  with _LiveStorages() as live:
    fn()
  return resident_bytes + live.peak


def _resident_bytes(items: Sequence[Any]) -> int:
  import torch
  tensors = []
  for item in items:
    if isinstance(item, torch.nn.Module):
      tensors += list(item.parameters()) + list(item.buffers())
      tensors += [p.grad for p in item.parameters() if p.grad is not None]
    elif isinstance(item, torch.optim.Optimizer):
      tensors += [v for state in item.state.values() for v in state.values()
                  if isinstance(v, torch.Tensor)]
    elif isinstance(item, torch.Tensor):
      tensors.append(item)
  seen, total = set(), 0
  for t in tensors:
    st = t.untyped_storage()
    if st.data_ptr() not in seen:
      seen.add(st.data_ptr())
      total += st.nbytes()
  return total


def _live_storages_mode():
  import weakref

  import torch
  from torch.utils._python_dispatch import TorchDispatchMode
  from torch.utils._pytree import tree_leaves

  class LiveStorages(TorchDispatchMode):
    """Bytes of the storages that ops create inside the context, and their peak."""

    def __init__(self):
      super().__init__()
      self.live = 0
      self.peak = 0
      self._refs = {}

    def _freed(self, key, nbytes):
      self._refs.pop(key, None)
      self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
      kwargs = kwargs or {}
      out = func(*args, **kwargs)
      # In-place ops and views return storages their inputs already had: not new memory.
      inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
      for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
          st = t.untyped_storage()
          key = id(st)
          if key in self._refs or key in inputs or st.nbytes() == 0:
            continue
          nbytes = st.nbytes()
          self._refs[key] = weakref.ref(st, lambda _, k=key, n=nbytes: self._freed(k, n))
          self.live += nbytes
          self.peak = max(self.peak, self.live)
      return out

  return LiveStorages


def _LiveStorages():  # noqa: N802 - a class built lazily (torch is imported on demand)
  return _live_storages_mode()()


def torch_device(name: str | None = None):
  import torch
  if name:
    return torch.device(name)
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync(device) -> None:
  import torch
  if device.type == "cuda":
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------ torch models

def torch_models(model_cfg, device):
  """The PyTorch reference networks of an ImprintConfig: (dinov2, adapter, unet, vae), float32
  parameters on `device`, random weights (speed does not depend on them). Built under
  `torch.device(device)`, so the random init runs there (seconds, not minutes, for ViT-g on
  a GPU)."""
  import torch
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import AutoConfig, AutoModel

  from imprint_jax.convert import dinov2 as dinov2_convert, unet as unet_convert, vae as vae_convert
  from imprint_jax.torch_adapter import ContentAdapterTorch
  hf = dict(dinov2_convert.config_to_transformers(model_cfg.dinov2))
  hf.pop("architectures", None)
  model_type = hf.pop("model_type")
  a = model_cfg.adapter
  with torch.device(device):
    dino = AutoModel.from_config(AutoConfig.for_model(model_type, **hf))
    adapter = ContentAdapterTorch(in_dim=a.in_dim, width=a.width, depth=a.depth,
                                  num_heads=a.num_heads, mlp_ratio=a.mlp_ratio,
                                  out_dim=a.out_dim, layer_norm_eps=a.layer_norm_eps)
    unet = UNet2DConditionModel.from_config(unet_convert.config_to_diffusers(model_cfg.unet))
    vae = AutoencoderKL.from_config(vae_convert.config_to_diffusers(model_cfg.vae))
  return tuple(m.to(device) for m in (dino, adapter, unet, vae))


def autocast(device, dtype: str):
  """bf16 autocast when asked for (what diffusers' trainers do), else a no-op context."""
  import contextlib

  import torch
  if dtype == "bfloat16":
    return torch.autocast(device.type, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def random_batch(stage: int, batch: int, encoder_size: int, generator_size: int,
                 seed: int) -> dict:
  """A batch as the stage-N pipeline yields it (NHWC float32 numpy): normalised object,
  target in [-1, 1], a box mask in {0, 1} and the target with the box blanked."""
  import numpy as np
  rng = np.random.default_rng(seed)
  E, G = encoder_size, generator_size
  out = {"object": rng.standard_normal((batch, E, E, 3), np.float32),
         "target": rng.uniform(-1, 1, (batch, G, G, 3)).astype(np.float32)}
  if stage == 2:
    mask = np.zeros((batch, G, G, 1), np.float32)
    for i in range(batch):
      y0, x0 = rng.integers(0, G // 2, 2)
      mask[i, y0:y0 + G // 2, x0:x0 + G // 2] = 1.0
    out["mask"] = mask
    out["masked_target"] = out["target"] * (1.0 - mask)
  return out


# ------------------------------------------------------------------------------ profiles

PARTS = ("vae", "vae_decode", "dinov2", "adapter", "unet")


def scope_model_parts():
  """Wraps the networks' entry points in `jax.named_scope`s (vae = VAE encode, vae_decode,
  dinov2, adapter, unet),
  so that every HLO op, forward or backward, carries its network in its metadata. The
  computation is unchanged. Returns a function that undoes it."""
  import jax

  from imprint_jax.models.adapter import ContentAdapter
  from imprint_jax.models.dinov2 import Dinov2
  from imprint_jax.models.unet import UNet2DCondition
  from imprint_jax.models.vae import AutoencoderKL
  targets = [(AutoencoderKL, "encode", "vae"), (AutoencoderKL, "decode", "vae_decode"),
             (Dinov2, "__call__", "dinov2"), (ContentAdapter, "__call__", "adapter"),
             (UNet2DCondition, "__call__", "unet")]
  saved = []
  for cls, meth, name in targets:
    original = cls.__dict__[meth]

    def scoped(*a, __f=original, __name=name, **k):
      with jax.named_scope(__name):
        return __f(*a, **k)

    setattr(cls, meth, scoped)
    saved.append((cls, meth, original))

  def undo():
    for cls, meth, original in saved:
      setattr(cls, meth, original)

  return undo


def _hlo_index(hlo_text: str) -> tuple[dict, dict]:
  """{instruction: (shape, opcode, op_name, called computation)}, {computation: [opcodes]}."""
  instrs, comps, cur = {}, {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head and "=" not in line.split("{")[0]:
      cur = head.group(1)
      comps[cur] = []
      continue
    m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
    if m:
      name, shape, opcode = m.groups()
      op_name = re.search(r'op_name="([^"]*)"', line)
      called = re.search(r"calls=%?([\w.\-]+)", line)
      instrs[name] = (shape, opcode, op_name.group(1) if op_name else "",
                      called.group(1) if called else None)
      if cur:
        comps[cur].append(opcode)
  return instrs, comps


def _op_kind(opcodes: set[str]) -> str:
  if "convolution" in opcodes:
    return "convolution"
  if "dot" in opcodes:
    return "matmul"
  if "reduce" in opcodes:
    return "reduction (norms, softmax)"
  if opcodes & {"copy", "transpose"}:
    return "copy/transpose"
  if "broadcast" in opcodes and not opcodes - {"broadcast", "parameter", "bitcast", "fusion",
                                               "constant"}:
    return "broadcast"
  return "elementwise"


def xla_cpu_breakdown(run: Callable[[], Any], compiled, calls: int = 2) -> dict:
  """Traces `calls` runs of a compiled function with the JAX profiler (CPU backend) and
  splits the time of XLA's thunks by network (needs `scope_model_parts` at trace time),
  direction (backward = ops under a `transpose(...)` transform) and op kind (the main HLO
  opcode in the fusion). Returns {'parts': {(part, dir): ms}, 'kinds': {kind: ms},
  'top': [(ms, thunk, kind, shape, op_name)]} per call."""
  import collections
  import glob
  import tempfile

  import jax
  instrs, comps = _hlo_index(compiled.as_text())
  folder = tempfile.mkdtemp(prefix="imprint-bench-trace-")
  jax.profiler.start_trace(folder)
  for _ in range(calls):
    run()
  jax.profiler.stop_trace()
  files = sorted(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True))
  data = jax.profiler.ProfileData.from_file(files[-1])
  parts, kinds, thunks = collections.Counter(), collections.Counter(), collections.Counter()
  for plane in data.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      # XLA's worker threads run the thunks; with one thread, the client thread runs them
      if not line.name.startswith(("tf_XLAEigen", "tf_XLAPjRtCpuClient")):
        continue
      for ev in line.events:
        if ev.name.startswith(("ThunkExecutor", "end:")):
          continue
        shape, opcode, op_name, called = instrs.get(ev.name, ("?", "?", "", None))
        kind = _op_kind(set(comps.get(called, [])) | {opcode})
        part = next((p for p in PARTS if f"/{p}/" in op_name or f"({p})" in op_name
                     or op_name.endswith(f"/{p}")), "loss+optimizer")
        direction = "backward" if "transpose(" in op_name else "forward"
        ms = ev.duration_ns / 1e6 / calls
        parts[(part, direction)] += ms
        kinds[kind] += ms
        thunks[(ev.name, kind, shape, op_name, part)] += ms
  top = [(ms, *k[:4]) for k, ms in thunks.most_common(12)]
  top_by_part = {}
  for k, ms in thunks.most_common():
    top_by_part.setdefault(k[4], [])
    if len(top_by_part[k[4]]) < 3:
      top_by_part[k[4]].append((ms, *k[:4]))
  return {"parts": dict(parts), "kinds": dict(kinds), "top": top, "top_by_part": top_by_part}


def torch_breakdown(step: Callable[[], Any], modules: dict[str, Any], sync) -> dict:
  """Profiles one call of `step` with torch.profiler: forward time of each named module
  (record_function around its forward), the backward pass and the optimizer (which `step`
  must mark with record_function('backward') / ('optimizer')), and the top ops by self time."""
  from torch.profiler import ProfilerActivity, profile, record_function
  saved = []
  for name, mod in modules.items():
    original = mod.forward

    def forward(*a, __f=original, __name=name, **k):
      with record_function(__name):
        return __f(*a, **k)

    mod.forward = forward
    saved.append((mod, original))
  try:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
      step()
      sync()
  finally:
    for mod, original in saved:
      mod.forward = original
  ka = prof.key_averages()
  times = {e.key: e.cpu_time_total / 1e3 for e in ka
           if e.key in (*modules, "backward", "optimizer")}
  total = sum(e.self_cpu_time_total for e in ka) / 1e3
  top = sorted(((e.self_cpu_time_total / 1e3, e.key, e.count) for e in ka
                if e.key not in (*modules, "backward", "optimizer")), reverse=True)[:12]
  return {"parts": times, "total": total, "top": top}


def trace_top_ops(trace_dir: str | Path, n: int = 15) -> str:
  """The device ops of a `jax.profiler` trace in `trace_dir` that took the most time, summed
  by name, as lines of text (GPU/TPU traces; a CPU trace has no device lanes)."""
  import collections
  import gzip
  import json
  files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
  if not files:
    return f"no trace in {trace_dir}"
  events = json.load(gzip.open(files[-1]))["traceEvents"]
  lanes = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, name in lanes.items() if name.startswith("/device:")}
  if not device:
    return f"{files[-1]}: no device ops (a CPU trace; benchmarks/train_step.py --profile splits CPU steps)"
  total = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["pid"] in device:
      total[e["name"]] += e.get("dur", 0)
  all_us = sum(total.values())
  lines = [f"device time by op ({files[-1].name}; {all_us / 1e3:.1f} ms over the traced steps):"]
  for name, us in total.most_common(n):
    lines.append(f"  {100 * us / all_us:5.1f}%  {us / 1e3:9.2f} ms  {name[:100]}")
  return "\n".join(lines)
