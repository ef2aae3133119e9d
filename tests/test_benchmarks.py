"""Benchmarks: the model-FLOP counts against two independent counts (torch's FlopCounterMode on
the diffusers/transformers networks, XLA's cost analysis of our UNet), the shared helpers, and
smoke runs of the scripts at the toy scale."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common, flops  # noqa: E402
from imprint_jax.convert.unet import config_to_diffusers  # noqa: E402
from imprint_jax.models import attention  # noqa: E402
from imprint_jax.models.unet import UNetConfig, abstract_unet  # noqa: E402
from imprint_jax.parallel import compiler  # noqa: E402
from imprint_jax.train import setup as setup_lib  # noqa: E402


def _torch_flops(fn) -> int:
  # The math SDPA backend decomposes attention into matmuls FlopCounterMode sees (it has no
  # formula for the CPU flash kernel), and autograd then runs only the gradients it needs.
  with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
    fn()
  return counter.get_total_flops()


def test_sd15_unet_forward_flops_match_torch_and_xla():
  cfg = UNetConfig.sd15()
  ours = flops.unet_forward(cfg, 1, 64, 77)
  # torch: the diffusers UNet on the meta device (no memory, no compute), same counting rule.
  from diffusers import UNet2DConditionModel
  with torch.device("meta"):
    ref = UNet2DConditionModel.from_config(config_to_diffusers(cfg))
    x, t, ctx = torch.empty(1, 4, 64, 64), torch.tensor([10]), torch.empty(1, 77, 768)
    counted = _torch_flops(lambda: ref(x, t, ctx))
  assert ours == pytest.approx(counted, rel=1e-9)
  assert 780e9 < ours < 820e9  # SD 1.5 at 512 px: ~0.8 TFLOP (~0.4 TMAC) per image
  # XLA's estimate of our NNX UNet also counts elementwise ops but skips padded conv taps:
  # measured 1.7% below ours. Traced with XLA's attention: the CPU form loops over query
  # blocks at this size, and XLA's cost analysis counts a loop's body once.
  graphdef, state = nnx.split(abstract_unet(cfg))
  with compiler.compiling_for("gpu"), attention.gpu_attention("xla"):
    lowered = jax.jit(lambda s, x, c: nnx.merge(graphdef, s)(x, 10, c)).lower(
        state, jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32),
        jax.ShapeDtypeStruct((1, 77, 768), jnp.float32))
  xla = lowered.cost_analysis()["flops"]
  assert ours == pytest.approx(xla, rel=0.04)


@pytest.mark.parametrize("stage,inputs", [(1, "pixels"), (2, "pixels"), (2, "latents")])
def test_training_flops_match_autograd(stage, inputs):
  """The dependency rule (forward F, +F input gradient, +F weight gradient) reproduces what
  autograd computes on the PyTorch step: the VAE and (stage 2) DINOv2 forward only, stage 1's
  frozen UNet encoder with input gradients only (the gradient reaches the object tokens
  through cross-attention), the trained parts in full; on cached latents and tokens, the
  adapter and the UNet alone."""
  from benchmarks import train_step
  sc = common.scale("tiny")  # also exact at the cpu scale (checked by hand; 20 s a stage)
  c = common.run_config(sc, stage, batch=1, dtype="float32", remat="none")
  model_cfg = setup_lib.model_config(c)
  batch = train_step.cached_inputs(
      common.random_batch(stage, 1, sc.encoder_size, sc.generator_size, 0), inputs, model_cfg,
      sc, 0)
  step = train_step.TorchStep(c, model_cfg, batch, torch.device("cpu"), "float32")
  counted = _torch_flops(lambda: step.loss().backward())
  ours = flops.train_step(model_cfg, stage, 1, sc.encoder_size, sc.generator_size,
                          object_tokens=inputs == "latents", latents=inputs == "latents")
  assert ours.total == pytest.approx(counted, rel=1e-9)
  if inputs == "latents":
    assert set(ours.by_part) == {"adapter", "unet"}
    return
  # Stage 2 trains the whole UNet: ~3x its forward (conv_in and the first time-embedding
  # layer see data: 2x); stage 1 trains only its decoder. The VAE is forward only.
  fwd, vae = flops.Counter(), flops.Counter()
  lat = sc.generator_size // model_cfg.vae.downsample_factor
  n_tok = flops.dinov2_tokens(model_cfg.dinov2, sc.encoder_size)
  flops.unet(fwd, model_cfg.unet, 1, lat, lat, n_tok, False, False, False)
  flops.vae_encode(vae, model_cfg.vae, 1, sc.generator_size)
  if stage == 2:
    assert 2.95 * fwd.total_forward() < ours.by_part["unet"] < 3 * fwd.total_forward()
  else:
    assert 2 * fwd.total_forward() < ours.by_part["unet"] < 2.95 * fwd.total_forward()
  assert ours.by_part["vae_encode"] == pytest.approx(stage * vae.total_forward())


def test_composite_flops_match_torch_sampler():
  from benchmarks import sampling
  sc = common.scale("tiny")
  c = common.run_config(sc, 2, batch=2, dtype="float32", remat="none")
  model_cfg = setup_lib.model_config(c)
  nets = common.torch_models(model_cfg, torch.device("cpu"))
  sampler = sampling.TorchSampler(nets, model_cfg, sampling.inputs_for(2, sc, 0), 2,
                                  torch.device("cpu"), "float32")
  counted = _torch_flops(sampler)
  ours = flops.composite(model_cfg, 2, sc.encoder_size, sc.generator_size, steps=2)
  assert ours.total == pytest.approx(counted, rel=1e-9)


def test_peaks_and_table():
  assert common.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert common.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert common.peak_tflops("NVIDIA H200") == 989.0
  assert common.peak_tflops("TPU v4") == 275.0
  assert common.peak_tflops("TPU v5 lite") == 197.0
  assert common.peak_tflops("TPU v5") == 459.0
  assert common.peak_tflops("TPU v6 lite") == 918.0
  assert common.peak_tflops("cpu") is None
  assert common.fmt_tflops(2e12, 1.0, None) == ("2.000", "n/a")
  assert common.fmt_tflops(400e12, 1.0, 989.0) == ("400.0", "40.4%")
  lines = common.table(["a", "bb"], [["x", 1], ["yyy", 22]]).splitlines()
  assert lines == ["a    bb", "---  --", "x     1", "yyy  22"]


def test_alternate_runs_in_turn():
  calls = []
  times = common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                           warmup=1, repeats=2)
  assert calls == ["a", "b"] * 3
  assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}


def test_torch_peak_bytes_counts_state_gradients_and_activations():
  model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 256))
  opt = torch.optim.AdamW(model.parameters())
  x = torch.randn(64, 256)

  def step():
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()

  step()  # creates the optimizer state
  opt.zero_grad(set_to_none=True)
  params = sum(p.numel() * 4 for p in model.parameters())
  peak = common.torch_peak_bytes(step, torch.device("cpu"), [model, opt, x])
  # resident: params + 2 Adam moments + x; during the step also the gradients (one params'
  # worth), a few (64, 1024) activations and AdamW's temporaries (up to two params' worth).
  low = 4 * params + x.numel() * 4
  assert low <= peak <= low + 2 * params + 3 * 64 * 1024 * 4


@pytest.mark.slow  # builds, converts and compiles the sampler: 15-30 s on 2 shared cores
def test_sampling_main_smoke(capsys):
  from benchmarks import sampling
  results = sampling.main(["--scale", "tiny", "--repeats", "1", "--warmup", "0", "--steps",
                           "2", "--batches", "1"])
  (r,) = results
  assert r["batch"] == 1 and set(r["times"]) == {"jax", "torch"}
  assert all(len(v) == 1 and v[0] > 0 for v in r["times"].values())
  assert r["mem"]["jax"] > 0 and r["mem"]["torch"] > 0
  out = capsys.readouterr().out
  assert "jax/torch" in out and "model GFLOP per call" in out


@pytest.mark.slow  # two JAX training steps to initialise and compile: over a minute on 2 cores
def test_train_step_main_smoke(capsys):
  from benchmarks import train_step
  results = train_step.main(["--scale", "tiny", "--repeats", "1", "--warmup", "0",
                             "--stage", "1", "--stage", "2"])
  assert [r["stage"] for r in results] == [1, 2]
  for r in results:
    assert all(len(v) == 1 and v[0] > 0 for v in r["times"].values())
    assert r["mem"]["jax"] > 0 and r["mem"]["torch"] > 0
    assert r["flops"].total > 0
    assert all(abs(v) < 1e3 for v in r["losses"].values())
  assert "jax/torch" in capsys.readouterr().out


def _one_level(name: str) -> common.Scale:
  """The tiny scale with a one-level UNet, a 2-level VAE, one DINOv2 and one adapter block:
  the same kinds of layers, half the compile time."""
  t = _SCALE("tiny")
  return dataclasses.replace(
      t, dinov2=dict(t.dinov2, num_layers=1), adapter=dict(t.adapter, depth=1),
      unet=dict(t.unet, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                up_block_types=("CrossAttnUpBlock2D",)),
      vae=dict(t.vae, block_out_channels=(32, 32)), generator_size=32)


_SCALE = common.scale


def test_train_step_on_cached_latents_and_tokens(capsys, monkeypatch):
  """`--inputs latents`: the trainer's stage-2 step with data.object_tokens and data.latents
  (its batch holds tokens, posterior moments and the latent mask), against torch on the same
  batch, in one run: both rows and their ratio printed."""
  import re

  from benchmarks import train_step
  monkeypatch.setattr(common, "scale", _one_level)
  (r,) = train_step.main(["--scale", "tiny", "--repeats", "1", "--warmup", "0", "--inputs",
                          "latents"])
  assert r["stage"] == 2 and r["label"] == "stage 2 (latents)"
  assert r["jax_inputs"] == ["mask_latent", "masked_target_moments", "object_tokens",
                             "target_moments"]
  assert set(r["flops"].by_part) == {"adapter", "unet"}
  assert all(len(v) == 1 and v[0] > 0 for v in r["times"].values())
  assert all(abs(v) < 1e3 for v in r["losses"].values())
  rows = {line.split()[3]: line.split()[4:] for line in capsys.readouterr().out.splitlines()
          if line.startswith("stage 2 (latents) ")}
  assert set(rows) == {"jax", "torch", "jax/torch"}
  for k in ("jax", "torch"):
    assert float(rows[k][0]) == pytest.approx(2 / r["times"][k][0], rel=0.01)  # img/s
  ratio = r["times"]["torch"][0] / r["times"]["jax"][0]
  assert re.fullmatch(r"\d+\.\d\dx", rows["jax/torch"][0])
  assert float(rows["jax/torch"][0][:-1]) == pytest.approx(ratio, abs=0.006)


def test_train_step_cached_inputs_are_stage_2_only(capsys):
  from benchmarks import train_step
  with pytest.raises(SystemExit) as e:
    train_step.main(["--scale", "tiny", "--inputs", "latents", "--stage", "1"])
  assert e.value.code == 2
  assert "--inputs latents is a stage-2 option" in capsys.readouterr().err


def test_networks_main_smoke(capsys):
  from benchmarks import networks
  times = networks.main(["--scale", "tiny", "--repeats", "1", "--warmup", "0", "--stage", "1"])
  assert list(times) == ["unet fwd+bwd", "vae encode", "dinov2 fwd+bwd", "adapter fwd+bwd"]
  assert all(len(t[k]) == 1 and t[k][0] > 0 for t in times.values() for k in ("jax", "torch"))
  out = capsys.readouterr().out
  assert "jax/torch" in out and "dinov2 fwd+bwd" in out


def test_trace_top_ops_sums_device_lanes(tmp_path):
  import gzip
  import json
  from benchmarks import common
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 1, "name": "fusion.1", "dur": 300},
            {"ph": "X", "pid": 1, "name": "cudnn_fmha", "dur": 400},
            {"ph": "X", "pid": 1, "name": "fusion.1", "dur": 300},
            {"ph": "X", "pid": 2, "name": "PjitFunction(jit(step))", "dur": 9000}]
  folder = tmp_path / "plugins" / "profile" / "run"
  folder.mkdir(parents=True)
  with gzip.open(folder / "vm.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  lines = common.trace_top_ops(tmp_path).splitlines()
  assert "1.0 ms" in lines[0]
  assert lines[1].split() == ["60.0%", "0.60", "ms", "fusion.1"]
  assert lines[2].split() == ["40.0%", "0.40", "ms", "cudnn_fmha"]
  assert len(lines) == 3


def _run_gpu_sh(tmp_path, *names, fail=""):
  """benchmarks/gpu.sh with stub python3 and nvidia-smi: the benchmark command lines it runs,
  in order (a stub run whose arguments contain `fail` exits 1)."""
  import os
  import subprocess
  stubs, calls = tmp_path / "bin", tmp_path / "calls"
  stubs.mkdir(exist_ok=True)
  (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'stub GPU'\n")
  (stubs / "python3").write_text(
      "#!/bin/bash\nprintf '%s\\x1f' \"$@\" >> \"$CALLS\"; echo >> \"$CALLS\"\n"
      f"[[ -n '{fail}' && \"$*\" == *'{fail}'* ]] && exit 1\nexit 0\n")
  for f in stubs.iterdir():
    f.chmod(0o755)
  calls.write_text("")
  out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), str(tmp_path / "logs"),
                        *names], capture_output=True, text=True, cwd=tmp_path, check=False,
                       env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}",
                            "CALLS": str(calls)})
  lines = [line.rstrip("\x1f").split("\x1f") for line in calls.read_text().splitlines()]
  return out, lines


def test_gpu_script_runs_the_latents_step_first_with_valid_arguments(tmp_path):
  """The GPU script (run rarely, in a short lease): every train_step.py command line it runs
  parses, the cached-latents step comes first, a torch.compile failure does not stop it, and
  naming items runs only those."""
  from benchmarks import train_step
  out, calls = _run_gpu_sh(tmp_path, fail="--torch-compile")
  assert out.returncode == 0, out.stderr
  assert "=== stage2_latents_compile failed (exit status 1); going on" in out.stdout
  scripts = [c[0] for c in calls]
  assert scripts[:6] == ["benchmarks/train_step.py"] * 6 and len(calls) == 9
  assert scripts[6:] == ["benchmarks/sampling.py", "benchmarks/train_step.py",
                         "benchmarks/networks.py"]
  parsed = [train_step.parser().parse_args(c[1:]) for c in calls
            if c[0] == "benchmarks/train_step.py"]
  assert all(a.scale == "real" for a in parsed)
  first = parsed[0]
  assert (first.inputs, first.stage, first.batch, first.torch_compile) == ("latents", [2], 8,
                                                                          False)
  assert first.trace and parsed[2].torch_compile and parsed[2].inputs == "latents"
  out, calls = _run_gpu_sh(tmp_path, "stage2", "stage2_latents", fail="--inputs latents")
  assert out.returncode != 0 and len(calls) == 1  # a failure outside may_fail stops it
  out, calls = _run_gpu_sh(tmp_path, "stage1", "stage2")
  assert out.returncode == 0
  assert [train_step.parser().parse_args(c[1:]).stage for c in calls] == [[2], [1]]
