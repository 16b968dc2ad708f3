"""backbones.objectives.edm_samplers.SVDDPMSolverSampler (EDM DPM-Solver++ for SVD) and svd_sampler.

Oracle: diffusers (0.42.1 here) EDMDPMSolverMultistepScheduler configured for SVD's EDM-v model (σ ∈ [0.002, 700],
σ_data = 1, Karras ρ = 7, v_prediction, dpmsolver++, zero final σ), driven by the pipeline's loop re-stated below.
Its grid is computed in float32 torch, ours in float64 numpy rounded once (as EulerDiscreteScheduler does), so the
two grids agree to ~4e-6 relative, not bit for bit; parity is checked to 1e-5 relative.
Independent check: a Gaussian toy problem whose exact denoiser and probability-flow ODE solution are closed form.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler

from backbones.objectives.edm_samplers import (SVD_SAMPLERS, SVD_SIGMA_MAX, SVDDPMSolverSampler, SVDEulerSampler,
                                               sample_svd, svd_sampler)


def _diffusers_dpm(steps: int, solver_order: int = 2) -> EDMDPMSolverMultistepScheduler:
    sch = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=700.0, sigma_data=1.0, sigma_schedule="karras",
                                         rho=7.0, prediction_type="v_prediction", solver_order=solver_order,
                                         algorithm_type="dpmsolver++", final_sigmas_type="zero")
    sch.set_timesteps(steps)
    return sch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class _FakeUNet:
    """Fixed deterministic stand-in: a fixed random linear map across channels of the input plus a function of the
    timestep t (and of the frame, so the per-frame CFG ramp matters); `cond_from` adds a term to rows
    [cond_from:] (the conditional half of a CFG batch). Records every (x, t) it is called with."""

    def __init__(self, channels: int, seed: int = 0, cond_from: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g) / math.sqrt(channels) * 0.8
        self.b = torch.randn(channels, generator=g)
        self.cond_from = cond_from
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.clone(), torch.as_tensor(t).clone()))
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        t = t.expand(x.shape[0]).view(-1, 1, 1, 1, 1)
        f = torch.arange(x.shape[1], dtype=torch.float32).view(1, -1, 1, 1, 1)
        out = torch.einsum("bfchw,dc->bfdhw", x, self.w) + torch.sin(3 * t + 0.5 * f) * self.b.view(1, 1, -1, 1, 1)
        if self.cond_from is not None:
            c = (torch.arange(x.shape[0]) >= self.cond_from).float().view(-1, 1, 1, 1, 1)
            out = out + c * (0.3 * x + 0.1 * f * torch.cos(t))
        return out


def _noise(shape=(2, 3, 4, 5, 5), seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Schedule and model inputs vs diffusers


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_grid_timesteps_init_sigma_match_diffusers(steps):
    ref = _diffusers_dpm(steps)
    ours = SVDDPMSolverSampler()
    ours.set_timesteps(steps)
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.shape == (steps + 1,) and ours.sigmas[-1] == 0
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-5, atol=0)
    # diffusers' timesteps are precondition_noise(σ) = ¼·ln σ (not DDPM indices); so are ours
    torch.testing.assert_close(ref.timesteps, 0.25 * ref.sigmas[:-1].log())
    assert ours.timesteps.dtype == torch.float32 and ours.timesteps.shape == (steps,)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=1e-5, atol=1e-6)
    # the same grid and timesteps as the Euler sampler, bit for bit
    euler = SVDEulerSampler()
    euler.set_timesteps(steps)
    assert torch.equal(ours.sigmas, euler.sigmas) and torch.equal(ours.timesteps, euler.timesteps)
    # diffusers' init_noise_sigma: (sigma_max² + 1) ** 0.5 from the config float
    assert ours.init_noise_sigma == ref.init_noise_sigma == (SVD_SIGMA_MAX ** 2 + 1) ** 0.5


def test_scale_model_input_matches_diffusers_precondition_inputs():
    ref = _diffusers_dpm(10)
    ours = SVDDPMSolverSampler()
    ours.set_timesteps(10)
    x = _noise() * 50
    for i in range(3):
        got = ours.scale_model_input(x)
        torch.testing.assert_close(got, ref.scale_model_input(x, ref.timesteps[i]), rtol=1e-5, atol=1e-6)
        sigma = ours.sigmas[i].double()
        torch.testing.assert_close(got.double(), x.double() / (sigma ** 2 + 1).sqrt(), rtol=1e-6, atol=1e-7)
        out = torch.zeros_like(x)
        ours.step(out, ours.timesteps[i], x)
        ref.step(out, ref.timesteps[i], x)


# --------------------------------------------------------------------------------------------
# Full sampling loops vs diffusers


def _diffusers_loop(model_fn, noise: torch.Tensor, steps: int, solver_order: int,
                    min_guidance: float = 1.0, max_guidance: float = 1.0) -> torch.Tensor:
    """StableVideoDiffusionPipeline.__call__'s denoising loop with the diffusers scheduler."""
    sch = _diffusers_dpm(steps, solver_order)
    B, F = noise.shape[:2]
    do_cfg = max_guidance > 1
    g = torch.linspace(min_guidance, max_guidance, F).unsqueeze(0).repeat(B, 1).view(B, F, 1, 1, 1)
    x = noise * sch.init_noise_sigma
    for t in sch.timesteps:
        x_in = torch.cat([x] * 2) if do_cfg else x
        x_in = sch.scale_model_input(x_in, t)
        out = model_fn(x_in, t.expand(x_in.shape[0]))
        if do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + g * (cond - uncond)
        x = sch.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("solver_order", [1, 2])
@pytest.mark.parametrize("steps", [10, 25])
def test_unguided_loop_matches_diffusers(steps, solver_order):
    noise = _noise()
    fake = _FakeUNet(4)
    want = _diffusers_loop(fake, noise, steps, solver_order)
    ref_seen = list(fake.seen)
    fake.seen.clear()
    got = SVDDPMSolverSampler(solver_order).sample(fake, noise, steps)
    assert got.dtype == torch.float32 and got.shape == noise.shape
    assert torch.isfinite(got).all() and got.abs().max() > 0.1
    assert _rel(got, want) < 1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the model saw the same scaled inputs and c_noise timesteps as under diffusers
    assert len(fake.seen) == len(ref_seen) == steps
    for (x_a, t_a), (x_b, t_b) in zip(fake.seen, ref_seen):
        assert _rel(x_a, x_b) < 1e-5
        torch.testing.assert_close(t_a, t_b.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver_order", [1, 2])
@pytest.mark.parametrize("steps", [10, 25])
def test_sample_svd_with_cfg_matches_diffusers(steps, solver_order):
    noise = _noise((2, 5, 4, 3, 3), seed=3)
    fake = _FakeUNet(4, seed=5, cond_from=2)
    want = _diffusers_loop(fake, noise, steps, solver_order, 1.0, 3.0)
    seen = []
    got = sample_svd(fake, noise, SVDDPMSolverSampler(solver_order), steps, 1.0, 3.0, num_frames=5,
                     callback=lambda i, t, x: seen.append((i, t.shape)))
    assert seen == [(i, (2,)) for i in range(steps)]
    assert all(x.shape[0] == 4 for x, _ in fake.seen)  # batch-doubled forwards
    assert _rel(got, want) < 1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # guidance changes the result (the test would be vacuous otherwise)
    assert _rel(sample_svd(fake, noise, SVDDPMSolverSampler(solver_order), steps, 1.0, 1.0), got) > 1e-2


def test_second_order_differs_from_first_and_first_order_is_euler():
    noise = _noise()
    fake = _FakeUNet(4)
    x1 = SVDDPMSolverSampler(1).sample(fake, noise, 10)
    x2 = SVDDPMSolverSampler(2).sample(fake, noise, 10)
    assert _rel(x1, x2) > 1e-3
    # on the VE ODE dx/dσ = (x − D)/σ, DPM-Solver++(1) = (σ'/σ)·x + (1 − σ'/σ)·D is algebraically Euler's step
    xe = SVDEulerSampler().sample(fake, noise, 10)
    assert _rel(x1, xe) < 1e-5


# --------------------------------------------------------------------------------------------
# Gaussian toy problem with a closed-form denoiser


def test_gaussian_toy_dpm_solver_beats_euler():
    """x0 ~ N(0, s²·I): p_σ = N(0, (s² + σ²)·I), so D(x, σ) = E[x0 | x] = s²/(s² + σ²)·x and the probability-flow ODE
    dx/dσ = (x − D)/σ = σ/(s² + σ²)·x integrates to x(σ) = x(σ_T)·√((s² + σ²)/(s² + σ_T²)); from x_T at σ_max the
    exact sample is x_0 = x_T·s/√(s² + σ_max²). The model is the exact v-predictor F = (D − c_skip·x)/c_out,
    recovering σ = exp(4·c_noise) and x = x_in/c_in from what it is given."""
    s = 0.5

    def exact_model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = torch.exp(4 * t.double()).view(-1, 1, 1, 1, 1)
        x = x_in.double() * (sigma ** 2 + 1).sqrt()
        d = s * s / (s * s + sigma ** 2) * x
        c_skip, c_out = 1 / (sigma ** 2 + 1), -sigma / (sigma ** 2 + 1).sqrt()
        return ((d - c_skip * x) / c_out).float()

    noise = _noise((2, 3, 4, 8, 8), seed=7)
    dpm = SVDDPMSolverSampler()
    x_dpm = dpm.sample(exact_model, noise, 10)
    exact = noise.double() * dpm.init_noise_sigma * s / math.sqrt(s * s + SVD_SIGMA_MAX ** 2)
    x_euler = SVDEulerSampler().sample(exact_model, noise, 10)
    err_dpm, err_euler = _rel(x_dpm, exact), _rel(x_euler, exact)
    # measured: DPM-Solver++(2M) ≈ 0.151, Euler ≈ 0.358 at 10 steps (25 steps: ≈ 0.067 vs ≈ 0.159)
    assert err_dpm < 0.5 * err_euler, (err_dpm, err_euler)
    assert err_dpm < 0.2
    # every method is a per-element scaling of the noise here: the direction is exact, only the gain is off
    ratio = (x_dpm.double() / exact)
    assert (ratio - ratio.mean()).abs().max() < 1e-4
    # and more steps converge toward the exact solution
    assert _rel(dpm.sample(exact_model, noise, 50), exact) < err_dpm


# --------------------------------------------------------------------------------------------
# Factory and errors


def test_svd_sampler_factory():
    assert SVD_SAMPLERS == ("euler", "dpm++")
    assert type(svd_sampler("euler")) is SVDEulerSampler
    dpm = svd_sampler("dpm++")
    assert type(dpm) is SVDDPMSolverSampler and dpm.solver_order == 2
    with pytest.raises(ValueError, match=r"'x'.*'euler', 'dpm\+\+'"):
        svd_sampler("x")


@pytest.mark.parametrize("order", [0, 3, True, 2.0, "2"])
def test_bad_solver_order(order):
    with pytest.raises(ValueError, match="solver_order"):
        SVDDPMSolverSampler(order)


def test_step_guards():
    s = SVDDPMSolverSampler()
    x = torch.zeros(1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.scale_model_input(x)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 0.0, x)
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="expects timestep"):
        s.step(x, s.timesteps[1], x)              # wrong order: step 0 given step 1's timestep
    assert s.step_index == 0
    for i in range(3):
        s.step(x, s.timesteps[i], x)
        assert s.step_index == i + 1
    with pytest.raises(ValueError, match="past the 3-step"):
        s.step(x, s.timesteps[2], x)
    with pytest.raises(ValueError, match="past the 3-step"):
        s.scale_model_input(x)
    s.set_timesteps(3)                            # a new run resets the index and the multistep history
    assert s.step_index == 0
    s.step(x, s.timesteps[0], x)
    with pytest.raises(ValueError, match="batch shape changed"):
        s.step(torch.zeros(2, 1, 1, 1, 1), s.timesteps[1], torch.zeros(2, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="same shape"):
        s.step(torch.zeros(1, 2, 1, 1, 1), s.timesteps[1], x)
    with pytest.raises(ValueError, match="sigma_min"):
        SVDDPMSolverSampler(sigma_min=800.0)


def test_set_timesteps_resets_history_so_runs_repeat():
    fake = _FakeUNet(4)
    noise = _noise()
    s = SVDDPMSolverSampler()
    a = s.sample(fake, noise, 10)
    b = s.sample(fake, noise, 10)
    assert torch.equal(a, b)
