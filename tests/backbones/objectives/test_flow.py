"""backbones.objectives.flow: objective conventions, TI2V conditioning, Euler/UniPC samplers.

UniPC parity oracle: diffusers `UniPCMultistepScheduler` in flow mode, driven with Wan's schedule.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backbones.objectives.flow import (
    TRAIN_SIGMA_MAX,
    TRAIN_SIGMA_MIN,
    FlowEulerSampler,
    FlowUniPCSampler,
    add_noise,
    cfg_model,
    condition_training_batch,
    first_frame_mask,
    flow_target,
    masked_mse,
    sample_sigmas,
    shift_sigmas,
    token_timesteps,
    with_token_timesteps,
)

WAN_50_SHIFT5 = [999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906,
                 898, 890, 882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681,
                 660, 636, 611, 584, 555, 522, 487, 448, 405, 356, 302, 241, 172, 92]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------- schedules

def test_unipc_wan_50_step_schedule_exact():
    s = FlowUniPCSampler(shift=5.0)
    s.set_timesteps(50)
    assert s.timesteps.dtype == torch.float32
    assert s.timesteps.long().tolist() == WAN_50_SHIFT5
    assert torch.equal(s.timesteps, s.timesteps.round())  # the model gets truncated integers
    assert len(s.sigmas) == 51 and s.sigmas[-1].item() == 0.0
    assert s.sigmas[0].item() == pytest.approx(0.99980, abs=5e-6)
    assert s.sigmas[-2].item() == pytest.approx(0.09251, abs=5e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
def test_unipc_schedule_matches_upstream_numpy_recipe(shift):
    # Wan's FlowUniPCMultistepScheduler recipe, written with numpy like upstream does.
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    sigma_max = torch.from_numpy(1.0 - alphas).to(torch.float32)[0].item()
    for n in (1, 2, 3, 7, 10, 20, 25, 40, 50, 100):
        sig = np.linspace(sigma_max, 0.0, n + 1).copy()[:-1]
        sig = shift * sig / (1 + (shift - 1) * sig)
        ref_t = torch.from_numpy(sig * 1000).to(torch.int64)
        ref_s = torch.from_numpy(np.concatenate([sig, [0]]).astype(np.float32))
        ours = FlowUniPCSampler(shift=shift)
        ours.set_timesteps(n)
        assert torch.equal(ours.timesteps.long(), ref_t), (shift, n)
        assert torch.equal(ours.sigmas, ref_s), (shift, n)


def test_euler_schedule():
    s = FlowEulerSampler(shift=5.0)
    s.set_timesteps(4)
    ref = shift_sigmas(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64), 5.0).float()
    assert torch.equal(s.sigmas, ref)
    assert s.sigmas[0].item() == 1.0 and s.sigmas[-1].item() == 0.0
    assert torch.allclose(s.timesteps, ref[:-1] * 1000)


# ---------------------------------------------------------------------------------- objective

def test_shift_sigmas():
    assert shift_sigmas(0.5, 5.0) == pytest.approx(5 / 6)
    x = torch.rand(100, generator=_gen())
    assert torch.allclose(shift_sigmas(x, 1.0), x)
    assert shift_sigmas(0.0, 5.0) == 0.0 and shift_sigmas(1.0, 5.0) == 1.0
    assert (shift_sigmas(x, 5.0) >= x).all()
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(x, 0.0)


def test_sample_sigmas_modes_range_and_reproducibility():
    a = sample_sigmas(4096, _gen(1), mode="logit_normal")
    b = sample_sigmas(4096, _gen(1), mode="logit_normal")
    c = sample_sigmas(4096, _gen(2), mode="logit_normal")
    assert a.shape == (4096,) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= TRAIN_SIGMA_MIN and a.max() <= TRAIN_SIGMA_MAX
    assert a.median().item() == pytest.approx(0.5, abs=0.03)  # sigmoid(N(0, 1)): median 0.5
    hi = sample_sigmas(4096, _gen(1), mode="logit_normal", logit_mean=1.0)
    assert hi.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.03)
    u = sample_sigmas(4096, _gen(3), mode="uniform", shift=1.0)
    assert u.mean().item() == pytest.approx(0.5, abs=0.02)
    u5 = sample_sigmas(4096, _gen(3), mode="uniform", shift=5.0)
    raw = torch.rand(4096, generator=_gen(3))
    assert torch.equal(u5, shift_sigmas(raw, 5.0).clamp(TRAIN_SIGMA_MIN, TRAIN_SIGMA_MAX))
    assert u5.median().item() == pytest.approx(5 / 6, abs=0.03)  # shift(0.5)
    with pytest.raises(ValueError, match="mode"):
        sample_sigmas(4, _gen(), mode="cosine")


def test_add_noise_target_conventions():
    g = _gen(4)
    x0, eps = torch.randn(3, 4, 2, 4, 4, generator=g), torch.randn(3, 4, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.0, 0.3, 1.0])
    x_t = add_noise(x0, eps, sigma)
    v = flow_target(x0, eps)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    assert torch.allclose(x_t[1], 0.7 * x0[1] + 0.3 * eps[1], atol=1e-6)
    assert torch.allclose(v, eps - x0)
    # the sampler's reading of a prediction: x0 = x_t − σ v, ε = x_t + (1 − σ) v
    s = sigma.view(-1, 1, 1, 1, 1)
    assert torch.allclose(x_t - s * v, x0, atol=1e-6)
    assert torch.allclose(x_t + (1 - s) * v, eps, atol=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        add_noise(x0, eps, torch.tensor([0.1, 0.2]))


# ---------------------------------------------------------------------------------- conditioning

def test_first_frame_mask_and_token_timesteps_order():
    cond = torch.tensor([True, False])
    mask = first_frame_mask(2, 3, 4, 6, cond)
    assert mask.shape == (2, 1, 3, 4, 6)
    assert (mask[0, :, 0] == 0).all() and (mask[0, :, 1:] == 1).all() and (mask[1] == 1).all()

    tt = token_timesteps(torch.tensor([700, 500]), mask)
    assert tt.shape == (2, 3 * 2 * 3) and tt.dtype == torch.float32
    assert (tt[0, :6] == 0).all() and (tt[0, 6:] == 700).all() and (tt[1] == 500).all()

    # ordering: token index (f·h + hi)·w + wi reads mask[f, 2·hi, 2·wi]
    m = torch.rand(1, 1, 3, 4, 6, generator=_gen(5))
    tt = token_timesteps(torch.tensor([2.0]), m)
    hp, wp = 2, 3
    for f in range(3):
        for hi in range(hp):
            for wi in range(wp):
                assert tt[0, (f * hp + hi) * wp + wi] == 2.0 * m[0, 0, f, 2 * hi, 2 * wi]

    padded = token_timesteps(torch.tensor([700, 500]), mask, seq_len=20)
    assert padded.shape == (2, 20) and (padded[0, 18:] == 700).all() and (padded[1, 18:] == 500).all()
    with pytest.raises(ValueError, match="divisible"):
        token_timesteps(torch.tensor([1.0]), torch.ones(1, 1, 2, 3, 4))


def test_condition_training_batch_p0_p1_and_reproducible():
    g = _gen(6)
    B, C, F, H, W = 3, 4, 3, 4, 4
    x0, eps = torch.randn(B, C, F, H, W, generator=g), torch.randn(B, C, F, H, W, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    plain = add_noise(x0, eps, sigma)
    L, per_frame = F * (H // 2) * (W // 2), (H // 2) * (W // 2)

    x_t, tt, lm, cond = condition_training_batch(x0, eps, sigma, 0.0, _gen(7))
    assert not cond.any() and torch.equal(x_t, plain) and (lm == 1).all()
    assert tt.shape == (B, L) and torch.allclose(tt, (sigma * 1000)[:, None].expand(B, L))

    x_t, tt, lm, cond = condition_training_batch(x0, eps, sigma, 1.0, _gen(7))
    assert cond.all()
    assert torch.equal(x_t[:, :, 0], x0[:, :, 0])        # clean first frame, exactly
    assert torch.equal(x_t[:, :, 1:], plain[:, :, 1:])
    assert (tt[:, :per_frame] == 0).all()
    assert torch.allclose(tt[:, per_frame:], (sigma * 1000)[:, None].expand(B, L - per_frame))
    assert (lm[:, :, 0] == 0).all() and (lm[:, :, 1:] == 1).all()

    big = torch.randn(64, 1, 2, 2, 2, generator=g)
    r1 = condition_training_batch(big, big, torch.full((64,), 0.5), 0.5, _gen(8))
    r2 = condition_training_batch(big, big, torch.full((64,), 0.5), 0.5, _gen(8))
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)
    assert 10 < r1[3].sum().item() < 54  # both kinds of sample occur
    with pytest.raises(ValueError, match="p must be"):
        condition_training_batch(x0, eps, sigma, 1.5, _gen())


def test_masked_mse_per_sample_mean():
    g = _gen(9)
    pred, target = torch.randn(2, 2, 3, 2, 2, generator=g), torch.randn(2, 2, 3, 2, 2, generator=g)
    mask = first_frame_mask(2, 3, 2, 2, torch.tensor([True, False]))
    err = (pred - target) ** 2
    expected = 0.5 * (err[0, :, 1:].mean() + err[1].mean())
    assert torch.allclose(masked_mse(pred, target, mask), expected)
    assert torch.allclose(masked_mse(pred, target), err.mean())
    # excluded elements do not matter
    pred2 = pred.clone()
    pred2[0, :, 0] += 100.0
    assert torch.allclose(masked_mse(pred2, target, mask), expected)


# ---------------------------------------------------------------------------------- samplers

def _gaussian_velocity(x: torch.Tensor, sigma: float, mu: float, std: float) -> torch.Tensor:
    """Exact flow velocity E[ε − x0 | x_σ] for data N(mu, std²) (linear in x)."""
    a = 1.0 - sigma
    var = a * a * std * std + sigma * sigma
    r = x - a * mu
    return (sigma / var) * r - (mu + (a * std * std / var) * r)


def _gaussian_state(x: torch.Tensor, sigma0: float, sigma1: float, mu: float, std: float) -> torch.Tensor:
    """Exact ODE solution at σ1 from x at σ0: x_σ = (1 − σ)·mu + sqrt(var_σ)·z, z conserved."""
    a0, a1 = 1.0 - sigma0, 1.0 - sigma1
    z = (x - a0 * mu) / (a0 * a0 * std * std + sigma0 * sigma0) ** 0.5
    return a1 * mu + (a1 * a1 * std * std + sigma1 * sigma1) ** 0.5 * z


def _gaussian_endpoint(x: torch.Tensor, sigma0: float, mu: float, std: float) -> torch.Tensor:
    return _gaussian_state(x, sigma0, 0.0, mu, std)


def _run_on_gaussian(sampler, steps: int, x: torch.Tensor, mu: float, std: float) -> list[torch.Tensor]:
    """Latents after every step (index i is at σ = sampler.sigmas[i + 1])."""
    traj = []

    def model_fn(xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the true σ of this step (UniPC's t is truncated, so σ is not t / 1000)
        return _gaussian_velocity(xx, sampler.sigmas[len(traj)].item(), mu, std)

    sampler.sample(model_fn, x, steps, callback=lambda i, t, xx: traj.append(xx))
    assert len(traj) == steps
    return traj


def test_euler_converges_to_analytic_x0():
    eps = torch.randn(2, 3, 2, 4, 4, generator=_gen(10))
    mu, std = 0.7, 0.4
    exact = _gaussian_endpoint(eps, 1.0, mu, std)
    errs = {n: (_run_on_gaussian(FlowEulerSampler(shift=3.0), n, eps, mu, std)[-1] - exact).abs().max().item()
            for n in (10, 100, 1000)}
    assert errs[1000] < 5e-3, errs
    assert errs[10] / errs[100] > 7 and errs[100] / errs[1000] > 7, errs  # first order
    # a single data point gives straight paths, which Euler integrates exactly in any step count
    x0 = torch.randn_like(eps)
    out = FlowEulerSampler(shift=5.0).sample(lambda x, t: (x - x0) / (t / 1000).view(-1, 1, 1, 1, 1), eps, 3)
    assert torch.allclose(out, x0, atol=1e-5)


def test_unipc_exact_for_single_point_and_high_order_on_gaussian():
    eps = torch.randn(2, 3, 2, 4, 4, generator=_gen(11))
    # single data point: the x0 prediction is constant, which the exponential integrator solves exactly
    x0 = torch.randn_like(eps)
    for n in (3, 50):
        s = FlowUniPCSampler(shift=5.0)
        calls = []

        def point_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            calls.append(t)
            return (x - x0) / s.sigmas[len(calls) - 1].item()

        out = s.sample(point_velocity, eps, n)
        assert torch.allclose(out, x0, atol=1e-5)

    # Gaussian data: compare with the exact ODE solution where the solver passes σ ≈ 0.5
    # (the last steps to σ = 0 are large in λ whatever N is, so the end point is not a convergence probe)
    mu, std = 0.7, 0.4
    errs = {}
    for n in (20, 80):
        s = FlowUniPCSampler(shift=5.0)
        traj = _run_on_gaussian(s, n, eps, mu, std)
        i = int((s.sigmas[1:] - 0.5).abs().argmin())
        exact = _gaussian_state(eps, s.sigmas[0].item(), s.sigmas[i + 1].item(), mu, std)
        errs[n] = (traj[i] - exact).abs().max().item()
    assert errs[80] < 1e-4 and errs[20] / errs[80] > 16, errs  # 4x the steps: >16x smaller (measured ~52x)


class _FixedModel:
    """A fixed random velocity model: channel mixing of x, modulated by t, plus a t-dependent bias."""

    def __init__(self, C: int, seed: int = 0) -> None:
        g = _gen(seed)
        self.w = torch.randn(C, C, generator=g) * (0.5 / C ** 0.5)
        self.b = torch.randn(1, C, 1, 1, 1, generator=g)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        tt = t.view(-1, 1, 1, 1, 1) / 1000
        return torch.einsum("oc,bcfhw->bofhw", self.w, x) * (1 + 0.5 * torch.cos(3 * tt)) + self.b * tt + 0.3 * x


@pytest.mark.parametrize("order,steps", [(2, 50), (2, 8), (1, 10), (3, 12)])
def test_unipc_matches_diffusers_unipc_flow(order, steps):
    diffusers = pytest.importorskip("diffusers")
    ours = FlowUniPCSampler(shift=5.0, solver_order=order)
    ours.set_timesteps(steps)
    ref = diffusers.UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0, solver_order=order,
        solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    # diffusers starts at σ = 1; hand it Wan's unshifted grid instead (it applies the shift itself)
    sigma_max = ours.sigmas.new_tensor(1 - 1 / 1000).item()
    ref.set_timesteps(sigmas=np.linspace(sigma_max, 0.0, steps + 1)[:-1].copy())
    ref.set_begin_index(0)
    assert torch.equal(ref.timesteps, ours.timesteps.long())
    assert torch.equal(ref.sigmas, ours.sigmas)

    C = 4
    x0 = torch.randn(2, C, 3, 4, 4, generator=_gen(12))
    model = _FixedModel(C)
    traj = []
    out = ours.sample(model, x0, steps, callback=lambda i, t, x: traj.append(x.clone()))
    assert [int(t[0]) for _, t in model.calls] == ours.timesteps.long().tolist()

    ref_model = _FixedModel(C)
    x = x0.clone()
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        v = ref_model(x, t.float().expand(2))
        x = ref.step(v, t, x).prev_sample
        worst = max(worst, (x - traj[i]).abs().max().item())
    assert worst < 1e-5 * max(1.0, x.abs().max().item()), worst
    assert torch.equal(out, traj[-1])


def test_sample_with_first_frame_condition():
    B, C, F, H, W = 2, 3, 3, 4, 4
    g = _gen(13)
    noise = torch.randn(B, C, F, H, W, generator=g)
    z = torch.randn(B, C, 1, H, W, generator=g)
    mask = first_frame_mask(B, F, H, W, torch.tensor([True, True]))

    # an elementwise model: frames ≥ 1 cannot see frame 0, so they must match the plain run
    def elementwise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * (t.view(-1, 1, 1, 1, 1) / 1000) + 0.5 * x

    seen = []

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x[:, :, :1].clone())
        return elementwise(x, t)

    for sampler in (FlowUniPCSampler(), FlowEulerSampler()):
        seen.clear()
        out = sampler.sample(recording, noise, 6, condition=(z, mask))
        assert torch.equal(out[:, :, :1], z)
        assert len(seen) == 6 and all(torch.equal(s, z) for s in seen)  # the model always sees clean z
        plain = sampler.sample(elementwise, noise, 6)
        assert torch.equal(out[:, :, 1:], plain[:, :, 1:])


def test_token_timestep_wrapper_and_cfg():
    B, C, F, H, W = 2, 2, 2, 4, 4
    mask = first_frame_mask(B, F, H, W, torch.tensor([True, False]))
    got = []

    def dit(x: torch.Tensor, t_tokens: torch.Tensor) -> torch.Tensor:
        got.append(t_tokens)
        return torch.zeros_like(x)

    fn = with_token_timesteps(dit, mask)
    fn(torch.zeros(B, C, F, H, W), torch.tensor([999.0, 999.0]))
    assert got[-1].shape == (B, 8)
    assert (got[-1][0, :4] == 0).all() and (got[-1][0, 4:] == 999).all() and (got[-1][1] == 999).all()
    with_token_timesteps(dit)(torch.zeros(B, C, F, H, W), torch.tensor([5.0, 5.0]))
    assert (got[-1] == 5).all()

    x, t = torch.randn(B, C, F, H, W, generator=_gen(14)), torch.tensor([500.0, 500.0])
    guided = cfg_model(lambda x, t: 2 * x, lambda x, t: x, 5.0)(x, t)
    assert torch.allclose(guided, x + 5.0 * (2 * x - x))


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="solver_order"):
        FlowUniPCSampler(solver_order=4)
    s = FlowEulerSampler()
    with pytest.raises(ValueError, match="condition"):
        s.sample(lambda x, t: x, torch.zeros(1, 2, 3, 4, 4), 2,
                 condition=(torch.zeros(1, 2, 1, 4, 4), torch.ones(1, 1, 2, 4, 4)))
    s.set_timesteps(1)
    s.step(torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="past"):
        s.step(torch.zeros(1), torch.zeros(1))
