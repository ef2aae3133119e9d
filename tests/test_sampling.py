"""DDIM / DPM-Solver++ 2M against diffusers' schedulers on the same model function, DDIM
inversion, classifier-free guidance, seeding, blending and single tracing.

The reference model is a small analytic function written twice, in jnp and in torch:
`tanh(x @ W + b) * (1 + t / 1000)` over NHWC arrays (diffusers' schedulers are elementwise, so
layout does not matter to them). The inversion test uses the exact epsilon-predictor of a
Gaussian data distribution N(mu, s^2), for which the DDIM ODE is the true probability flow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DPMSolverMultistepScheduler

from imprint_jax.diffusion import blending
from imprint_jax.diffusion import samplers
from imprint_jax.diffusion import schedules
from imprint_jax.errors import UserError

# SD 1.x/2.x scheduler_config.json: scaled_linear, steps_offset 1, set_alpha_to_one false,
# clip_sample false, no timestep_spacing key (each scheduler keeps its default).
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
          beta_schedule="scaled_linear", steps_offset=1)
DDIM_KW = dict(SD, set_alpha_to_one=False, clip_sample=False)
# Max abs diff relative to the reference's max abs. Our schedule is float64-derived, diffusers'
# float32 (1e-6 apart); measured gaps are 2.9e-7..1.4e-6.
PARITY_TOL = 1e-5
RS = np.random.RandomState(0)
W = (0.5 * RS.randn(4, 4)).astype(np.float32)
B_ = (0.1 * RS.randn(4)).astype(np.float32)
X_T = RS.randn(2, 8, 8, 4).astype(np.float32)


def jnp_model(x, t_B):
  return jnp.tanh(x @ W + B_) * (1.0 + t_B[:, None, None, None] / 1000.0)


def torch_model(x, t):
  return torch.tanh(x @ torch.from_numpy(W) + torch.from_numpy(B_)) * (1.0 + float(t) / 1000.0)


@pytest.fixture(scope="module")
def schedule():
  return schedules.sd_schedule()


def _rel(ours, ref) -> float:
  ref = np.asarray(ref)
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _run_reference(scheduler, n, x, step_kw=lambda i: {}):
  scheduler.set_timesteps(n)
  x = torch.from_numpy(x)
  for i, t in enumerate(scheduler.timesteps):
    x = scheduler.step(torch_model(x, t), t, x, **step_kw(i)).prev_sample
  return x.numpy()


@pytest.mark.parametrize("n", [1, 7, 10, 20, 50, 999])
def test_timesteps_match_diffusers(n):
  ddim = DDIMScheduler(**DDIM_KW)
  ddim.set_timesteps(n)
  np.testing.assert_array_equal(samplers.timesteps("ddim", n), ddim.timesteps.numpy())
  dpm = DPMSolverMultistepScheduler(**SD)
  assert dpm.config.timestep_spacing == "linspace"  # the default SD configs end up with
  dpm.set_timesteps(n)
  np.testing.assert_array_equal(samplers.timesteps("dpmpp_2m", n), dpm.timesteps.numpy())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [10, 25])
def test_ddim_matches_diffusers(schedule, prediction_type, n):
  want = _run_reference(DDIMScheduler(**DDIM_KW, prediction_type=prediction_type), n, X_T)
  got = samplers.sample(jnp_model, jnp.asarray(X_T), num_steps=n, sampler="ddim",
                        schedule=schedule, prediction_type=prediction_type)
  assert _rel(got, want) <= PARITY_TOL


def test_ddim_eta_matches_diffusers_given_the_same_noise(schedule):
  # Step i draws N(0, 1) from fold_in(rng, i); hand diffusers the same draws. (gaussian_noise
  # equals jax.random.normal, see test_diffusion.py, and compiles faster.)
  n, eta, rng = 12, 0.7, jax.random.key(5)
  draws = jax.jit(jax.vmap(
      lambda i: schedules.gaussian_noise(jax.random.fold_in(rng, i), X_T.shape)))(jnp.arange(n))
  noise = torch.from_numpy(np.array(draws))
  want = _run_reference(DDIMScheduler(**DDIM_KW), n, X_T,
                        lambda i: {"eta": eta, "variance_noise": noise[i]})
  got = samplers.sample(jnp_model, jnp.asarray(X_T), num_steps=n, sampler="ddim",
                        schedule=schedule, eta=eta, rng=rng)
  assert _rel(got, want) <= PARITY_TOL
  assert _rel(want, _run_reference(DDIMScheduler(**DDIM_KW), n, X_T)) > 1e-2  # noise matters


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [10, 20])  # below and above lower_order_final's 15-step switch
def test_dpmpp_2m_matches_diffusers(schedule, prediction_type, n):
  ref = DPMSolverMultistepScheduler(**SD, prediction_type=prediction_type)
  assert ref.config.algorithm_type == "dpmsolver++" and ref.config.solver_order == 2
  want = _run_reference(ref, n, X_T)
  got = samplers.sample(jnp_model, jnp.asarray(X_T), num_steps=n, sampler="dpmpp_2m",
                        schedule=schedule, prediction_type=prediction_type)
  assert _rel(got, want) <= PARITY_TOL


def test_ddim_invert_matches_diffusers_inverse_scheduler(schedule):
  n = 20
  want = _run_reference(DDIMInverseScheduler(**DDIM_KW), n, X_T)
  got = samplers.ddim_invert(jnp_model, jnp.asarray(X_T), n, schedule)
  assert _rel(got, want) <= PARITY_TOL


MU, S = 0.3, 0.5
SCHEDULE = schedules.sd_schedule()


def _gauss_eps(x, t_B):
  """E[eps | x_t] for data ~ N(MU, S^2): the exact epsilon-predictor of that distribution."""
  a = schedules.alpha_bar(SCHEDULE, t_B)[:, None, None, None]
  return jnp.sqrt(1.0 - a) * (x - jnp.sqrt(a) * MU) / (a * S ** 2 + 1.0 - a)


def test_ddim_inversion_round_trip(schedule):
  # DDIM inversion evaluates the model one level below where sampling does, a first-order
  # mismatch: the round-trip error must shrink about linearly with the step size.
  x0 = MU + S * jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  errors = {}
  for n in (50, 100):
    x_T = samplers.ddim_invert(_gauss_eps, x0, n, schedule)
    back = samplers.sample(_gauss_eps, x_T, num_steps=n, sampler="ddim", schedule=schedule)
    errors[n] = float(jnp.abs(back - x0).max())
  assert errors[100] < 0.05  # measured 0.035 (data std 0.5)
  assert 0.4 < errors[100] / errors[50] < 0.6  # measured 0.50
  # The inverted latent is noise-like: about unit variance.
  assert 0.8 < float(jnp.std(x_T)) < 1.2


def _ctx_model(calls):
  def model_fn(x, t_B, ctx):
    calls.append(x.shape[0])
    bias = jnp.mean(ctx["tokens"], axis=(1, 2))[:, None, None, None]
    return jnp.tanh(x @ W + bias + ctx["extra"]) * (1.0 + t_B[:, None, None, None] / 1000.0)
  return model_fn


def _ctxs():
  rs = np.random.RandomState(7)
  cond = {"tokens": rs.randn(2, 5, 3).astype(np.float32),
          "extra": rs.randn(2, 8, 8, 4).astype(np.float32)}
  uncond = {"tokens": np.zeros((2, 5, 3), np.float32), "extra": cond["extra"]}
  return cond, uncond


def test_cfg_at_scale_one_is_the_conditional_prediction():
  calls = []
  model_fn = _ctx_model(calls)
  cond, uncond = _ctxs()
  x, t = jnp.asarray(X_T), jnp.array([500, 500])
  want = model_fn(x, t, cond)
  calls.clear()
  # A Python 1 skips the unconditional half altogether.
  got = samplers.cfg_denoise_fn(model_fn, cond, uncond, 1.0)(x, t)
  np.testing.assert_array_equal(got, want)
  assert calls == [2]
  # An array scale of 1 takes the batched path; the combination cond + (s - 1) (cond - uncond)
  # then returns the conditional half of that batched call bit for bit.
  both = {k: np.concatenate([cond[k], uncond[k]]) for k in cond}
  cond_half = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)[:2]
  calls.clear()
  got = samplers.cfg_denoise_fn(model_fn, cond, uncond, jnp.float32(1.0))(x, t)
  assert calls == [4]
  np.testing.assert_array_equal(got, cond_half)
  # Traced under jit (XLA may fuse differently, so compared to a float32 tolerance).
  got = jax.jit(lambda s: samplers.cfg_denoise_fn(model_fn, cond, uncond, s)(x, t))(1.0)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_cfg_combines_in_one_batched_call():
  calls = []
  model_fn = _ctx_model(calls)
  cond, uncond = _ctxs()
  x, t = jnp.asarray(X_T), jnp.array([300, 300])
  c, u = model_fn(x, t, cond), model_fn(x, t, uncond)
  calls.clear()
  got = samplers.cfg_denoise_fn(model_fn, cond, uncond, 7.5)(x, t)
  assert calls == [4]  # one call on the doubled batch
  np.testing.assert_allclose(got, u + 7.5 * (c - u), rtol=1e-5, atol=1e-5)
  assert _rel(got, c) > 1e-2


def test_cfg_context_structures_must_match():
  cond, uncond = _ctxs()
  del uncond["extra"]
  with pytest.raises(UserError, match="structures"):
    samplers.cfg_denoise_fn(_ctx_model([]), cond, uncond, 3.0)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_loop_is_traced_once(schedule, sampler):
  traces = []

  def denoise(x, t_B):
    traces.append(1)  # Python side effect: runs only while tracing
    return jnp_model(x, t_B)

  run = jax.jit(lambda x: samplers.sample(denoise, x, num_steps=30, sampler=sampler,
                                          schedule=schedule))
  first = run(jnp.asarray(X_T))
  second = run(jnp.asarray(X_T) + 1.0)
  assert len(traces) == 1
  assert not np.allclose(first, second)


def test_same_seed_same_output(schedule):
  go = jax.jit(lambda rng: samplers.sample(jnp_model, jnp.asarray(X_T), num_steps=8,
                                           sampler="ddim", schedule=schedule, eta=1.0, rng=rng))
  np.testing.assert_array_equal(go(jax.random.key(0)), go(jax.random.key(0)))
  assert not np.allclose(go(jax.random.key(0)), go(jax.random.key(1)))


@pytest.mark.parametrize("sampler,final_t", [("ddim", 0), ("dpmpp_2m", -1)])
def test_blend_fn_sees_the_next_noise_level(schedule, sampler, final_t):
  # Blending everything with the background noised to t_next makes the output the background
  # at the last step's level: abar_0 for DDIM (set_alpha_to_one=false), clean for DPM-Solver.
  rs = np.random.RandomState(3)
  bg, noise = jnp.asarray(rs.randn(*X_T.shape), jnp.float32), jnp.asarray(X_T)
  seen = []

  def blend(x, t_next):
    jax.debug.callback(lambda t: seen.append(int(t[0])), t_next)
    return schedules.add_noise(schedule, bg, noise, t_next)

  n = 6
  out = samplers.sample(jnp_model, jnp.asarray(X_T), num_steps=n, sampler=sampler,
                        schedule=schedule, blend_fn=blend)
  want = schedules.add_noise(schedule, bg, noise, jnp.full((2,), final_t))
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  ts = samplers.timesteps(sampler, n)
  assert seen == [*ts[1:].tolist(), final_t]


def test_identity_blend_changes_nothing(schedule):
  x = jnp.asarray(X_T)
  plain = samplers.sample(jnp_model, x, num_steps=5, sampler="dpmpp_2m", schedule=schedule)
  blended = samplers.sample(jnp_model, x, num_steps=5, sampler="dpmpp_2m", schedule=schedule,
                            blend_fn=lambda x, t: x)
  np.testing.assert_array_equal(plain, blended)


def test_latent_blend_keeps_the_background_outside_the_mask(schedule):
  """blending.latent_blend_fn inside a DPM-Solver run: outside the mask the result is the
  background latent exactly (the last step ends at the clean level), inside it is the sample
  of the unblended run (the model here is elementwise, so nothing leaks across the seam)."""
  rs = np.random.RandomState(4)
  bg = jnp.asarray(rs.randn(*X_T.shape), jnp.float32)
  mask = np.zeros((*X_T.shape[:3], 1), np.float32)
  mask[:, 2:6, 3:7] = 1.0
  x_T = jnp.asarray(X_T)
  blend = blending.latent_blend_fn(schedule, bg, x_T, jnp.asarray(mask))
  kw = dict(num_steps=5, sampler="dpmpp_2m", schedule=schedule)
  out = np.asarray(samplers.sample(jnp_model, x_T, blend_fn=blend, **kw))
  plain = np.asarray(samplers.sample(jnp_model, x_T, **kw))
  outside = np.broadcast_to(mask == 0, out.shape)
  np.testing.assert_array_equal(out[outside], np.asarray(bg)[outside])
  np.testing.assert_allclose(out[~outside], plain[~outside], rtol=1e-6, atol=1e-6)
  # At an intermediate level the kept part is the background noised with the run's x_T.
  t = jnp.full((X_T.shape[0],), 500, jnp.int32)
  step = np.asarray(blend(jnp.zeros_like(x_T), t))
  noised = np.asarray(schedules.add_noise(schedule, bg, x_T, t))
  np.testing.assert_array_equal(step[outside], noised[outside])
  assert not step[~outside].any()


def test_bf16_latents_keep_their_dtype(schedule):
  x = jnp.asarray(X_T, jnp.bfloat16)
  out = samplers.sample(jnp_model, x, num_steps=5, schedule=schedule)
  assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs,needle", [
    ({"sampler": "euler"}, "unknown sampler 'euler'"),
    ({"num_steps": 0}, "num_steps=0"),
    ({"num_steps": 1000}, "too many"),
    ({"prediction_type": "sample"}, "prediction_type 'sample'"),
    ({"sampler": "dpmpp_2m", "eta": 0.5, "rng": jax.random.key(0)}, "deterministic"),
    ({"eta": 0.5}, "rng="),
    ({"eta": -1.0}, "eta=-1.0"),
])
def test_bad_arguments(schedule, kwargs, needle):
  kw = {"num_steps": 10, **kwargs}
  with pytest.raises(UserError, match=needle):
    samplers.sample(jnp_model, jnp.asarray(X_T), schedule=schedule, **kw)
