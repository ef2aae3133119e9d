"""The SD noise schedule and forward-process algebra against diffusers' DDPMScheduler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from imprint_jax.diffusion import schedules
from imprint_jax.errors import UserError

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
          beta_schedule="scaled_linear")
# Ours is computed in float64 (as the original LDM code) and stored as float32; diffusers
# computes in float32. Measured max relative gap: betas 2.3e-7, alphas_cumprod 9.5e-7.
SCHEDULE_RTOL = 5e-6
FWD_ATOL = 1e-5  # add_noise / get_velocity on unit-scale inputs


@pytest.fixture(scope="module")
def schedule():
  return schedules.sd_schedule()


@pytest.fixture(scope="module")
def ref():
  return DDPMScheduler(**SD)


def _inputs(seed=0):
  rs = np.random.RandomState(seed)
  x0 = rs.randn(6, 8, 8, 4).astype(np.float32)
  noise = rs.randn(6, 8, 8, 4).astype(np.float32)
  t = np.array([0, 1, 250, 500, 998, 999], np.int64)
  return x0, noise, t


def test_schedule_matches_diffusers(schedule, ref):
  assert schedule.num_train_timesteps == 1000
  assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == jnp.float32
  np.testing.assert_allclose(schedule.betas, ref.betas.numpy(), rtol=SCHEDULE_RTOL, atol=0)
  np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod.numpy(),
                             rtol=SCHEDULE_RTOL, atol=0)
  # The defining endpoints of scaled_linear.
  np.testing.assert_allclose(np.asarray(schedule.betas)[[0, -1]], [0.00085, 0.012], rtol=1e-6)


def test_other_schedule_parameters(ref):
  sch = schedules.sd_schedule(num_train_timesteps=500, beta_start=0.0001, beta_end=0.02)
  want = DDPMScheduler(num_train_timesteps=500, beta_start=0.0001, beta_end=0.02,
                       beta_schedule="scaled_linear").alphas_cumprod.numpy()
  np.testing.assert_allclose(sch.alphas_cumprod, want, rtol=SCHEDULE_RTOL)


def test_add_noise_matches_diffusers(schedule, ref):
  x0, noise, t = _inputs()
  # diffusers is layout-agnostic (broadcast over trailing axes), so NHWC arrays go in as is.
  want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  got = schedules.add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=FWD_ATOL)


def test_velocity_matches_diffusers(schedule, ref):
  x0, noise, t = _inputs(1)
  want = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  got = schedules.velocity(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=FWD_ATOL)


def test_scalar_timestep_and_clean_level(schedule):
  x0, noise, _ = _inputs(2)
  per_sample = schedules.add_noise(schedule, x0, noise, jnp.full((6,), 300))
  np.testing.assert_array_equal(schedules.add_noise(schedule, x0, noise, 300), per_sample)
  # t = -1 is the clean sample (used by samplers after their last step).
  np.testing.assert_array_equal(schedules.add_noise(schedule, x0, noise, -1), x0)


def test_training_target(schedule):
  x0, noise, t = _inputs(3)
  np.testing.assert_array_equal(
      schedules.training_target(schedule, x0, noise, t, "epsilon"), noise)
  np.testing.assert_array_equal(
      schedules.training_target(schedule, x0, noise, t, "v_prediction"),
      schedules.velocity(schedule, x0, noise, t))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_eps_inverts_the_forward_process(schedule, prediction_type):
  x0, noise, t = _inputs(4)
  t = t[:-1]  # at t=999 sqrt(abar) = 0.068 amplifies float32 rounding of x0 from epsilon
  x0, noise = x0[:-1], noise[:-1]
  x_t = schedules.add_noise(schedule, x0, noise, t)
  target = schedules.training_target(schedule, x0, noise, t, prediction_type)
  got_x0, got_eps = schedules.predict_x0_eps(schedule, target, x_t, t, prediction_type)
  np.testing.assert_allclose(got_x0, x0, atol=1e-4)
  np.testing.assert_allclose(got_eps, noise, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gaussian_noise_is_jax_random_normal(dtype):
  rng = jax.random.key(11)
  got = schedules.gaussian_noise(rng, (2, 2, 2, 2), dtype)
  assert got.shape == (2, 2, 2, 2) and got.dtype == dtype
  np.testing.assert_array_equal(got, jax.random.normal(rng, (2, 2, 2, 2), dtype))


def test_schedule_is_a_pytree(schedule):
  @jax.jit
  def f(sch, x0, noise):
    return schedules.add_noise(sch, x0, noise, jnp.array([10, 20]))

  x0, noise = jnp.ones((2, 3)), jnp.zeros((2, 3))
  np.testing.assert_allclose(f(schedule, x0, noise),
                             jnp.sqrt(schedule.alphas_cumprod[jnp.array([10, 20])])[:, None]
                             * x0, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["sample", "eps", "v"])
def test_bad_prediction_type(schedule, prediction_type):
  x0, noise, t = _inputs()
  with pytest.raises(UserError, match=f"prediction_type '{prediction_type}'"):
    schedules.training_target(schedule, x0, noise, t, prediction_type)
  with pytest.raises(UserError, match="epsilon, v_prediction"):
    schedules.predict_x0_eps(schedule, noise, x0, t, prediction_type)


def test_bad_schedule_arguments():
  with pytest.raises(UserError, match="beta_start"):
    schedules.sd_schedule(beta_start=0.02, beta_end=0.01)
  with pytest.raises(UserError, match="num_train_timesteps"):
    schedules.sd_schedule(num_train_timesteps=1)
