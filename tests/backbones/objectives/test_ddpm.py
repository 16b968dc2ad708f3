"""backbones.objectives.ddpm + ddpm_samplers: schedules, targets, min-SNR, noise offset, per-sample draws, and
DDIM / Euler / DPM-Solver++ 2M parity.

Oracles: diffusers (0.42.1 here) DDPMScheduler, DDIMScheduler, CogVideoXDDIMScheduler, EulerDiscreteScheduler,
DPMSolverMultistepScheduler and training_utils.compute_snr, configured as SD1.5 / AnimateDiff / CogVideoX
configure them (animatediff-sd15.md §4, cogvideox.md §5).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (CogVideoXDDIMScheduler, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler)
from diffusers.training_utils import compute_snr

from backbones.objectives import flow
from backbones.objectives.ddpm import (DDPMObjectiveConfig, add_noise, alphas_cumprod, ddpm_loss,
                                       draw_training_noise, make_betas, min_snr_weights, predicted_x0,
                                       rescale_zero_terminal_snr, shift_snr, target, training_inputs, velocity,
                                       weighted_mse)
from backbones.objectives.ddpm_samplers import (DDIM_PRESETS, DDIMSampler, DPMSolverPP2MSampler, EulerSampler,
                                                cfg_model, make_sampler, spaced_timesteps)

BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
SD15 = DDPMObjectiveConfig(beta_schedule="scaled_linear")
SD15_V = DDPMObjectiveConfig(beta_schedule="scaled_linear", prediction="v_prediction")
ANIMATEDIFF = DDPMObjectiveConfig(beta_schedule="linear")
COGVIDEOX_2B = DDPMObjectiveConfig(prediction="v_prediction", zero_terminal_snr=True, snr_shift=3.0)
COGVIDEOX_5B = DDPMObjectiveConfig(prediction="v_prediction", zero_terminal_snr=True, snr_shift=1.0)
ZERO_SNR_V = DDPMObjectiveConfig(prediction="v_prediction", zero_terminal_snr=True)  # SD2-style zero SNR

# ᾱ_t at t = 0, 250, 500, 750, 999 (cogvideox.md §5.1, computed from CogVideoXDDIMScheduler)
COGVIDEOX_TABLE = {3.0: [0.997454, 0.389054, 0.095328, 0.010839, 0.0],
                   1.0: [0.999150, 0.652457, 0.241019, 0.032799, 0.0]}
# diffusers' float32 cumprod drifts from the float64 ᾱ by at most 4.65e-7 (scaled_linear) / 1.50e-7 (linear),
# measured with diffusers 0.42.1; the float64 recipe (CogVideoXDDIMScheduler) agrees to 1e-16
FLOAT32_SCHEDULE_ATOL = 6e-7
STEP_RTOL = 1e-5
# make_sampler's float64 ᾱ vs the plain float32 diffusers loop, 25 SD1.5 steps: measured <= 9.5e-7 (DDIM),
# 5.0e-7 (Euler), 7.9e-7 (DPM++) with diffusers 0.42.1
END_TO_END_RTOL = 1e-5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a denoiser: smooth in x, varies with t."""
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1))) / 1000
    return 0.5 * torch.tanh(x) * torch.cos(3 * tt) + 0.2 * x * tt + 0.1 * torch.sin(5 * tt)


# ---------------------------------------------------------------------------------- config

@pytest.mark.parametrize("key, value", [
    ("beta_schedule", "cosine"), ("beta_start", 0.0), ("beta_end", 1.0), ("num_train_timesteps", 1),
    ("prediction", "sample"), ("snr_gamma", -1.0), ("noise_offset", float("nan")), ("snr_shift", 0.0),
    ("timestep_sampling", "logit_normal"), ("zero_terminal_snr", True)])
def test_config_validate_names_the_key(key, value):
    cfg = dataclasses.replace(SD15, **{key: value})
    with pytest.raises(ValueError, match=f"objective.{key}"):
        cfg.validate()
    for ok in (SD15, SD15_V, ANIMATEDIFF, COGVIDEOX_2B, COGVIDEOX_5B):
        ok.validate()


# ---------------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("cfg", [SD15, ANIMATEDIFF], ids=["scaled_linear", "linear"])
def test_alphas_cumprod_matches_diffusers(cfg):
    ours = alphas_cumprod(cfg)
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls(beta_schedule=cfg.beta_schedule, **BETAS)
        assert torch.allclose(make_betas(cfg), ref.betas.double(), rtol=5e-7, atol=0)  # float32 β
        assert torch.allclose(ours, ref.alphas_cumprod.double(), rtol=0, atol=FLOAT32_SCHEDULE_ATOL)
    if cfg.beta_schedule == "scaled_linear":
        # the float64 recipe: CogVideoX's scheduler with the shift and the rescale off
        ref64 = CogVideoXDDIMScheduler(snr_shift_scale=1.0, rescale_betas_zero_snr=False, **BETAS).alphas_cumprod
        assert ref64.dtype == torch.float64 and torch.allclose(ours, ref64, rtol=0, atol=1e-15)
    assert ours[999].item() == pytest.approx(0.00466 if cfg.beta_schedule == "scaled_linear" else 0.00158, abs=1e-5)


@pytest.mark.parametrize("shift", [3.0, 1.0], ids=["2b", "5b"])
def test_cogvideox_alphas_cumprod(shift):
    cfg = COGVIDEOX_2B if shift == 3.0 else COGVIDEOX_5B
    ours = alphas_cumprod(cfg)
    ref = CogVideoXDDIMScheduler(snr_shift_scale=shift, rescale_betas_zero_snr=True, **BETAS).alphas_cumprod
    assert torch.allclose(ours, ref, rtol=0, atol=1e-14)
    assert ours[999].item() == 0.0
    assert ours[[0, 250, 500, 750, 999]].tolist() == pytest.approx(COGVIDEOX_TABLE[shift], abs=6e-7)
    assert ours[0].item() == pytest.approx(shift_snr(torch.tensor(1 - 0.00085, dtype=torch.float64), shift).item())


def test_snr_shift_then_rescale_order_matters():
    raw = torch.cumprod(1 - make_betas(SD15), 0)
    assert torch.allclose(shift_snr(raw, 3.0), raw / (1 - raw) / 3 / (1 + raw / (1 - raw) / 3))  # SNR / 3
    right = rescale_zero_terminal_snr(shift_snr(raw, 3.0))
    wrong = shift_snr(rescale_zero_terminal_snr(raw), 3.0)
    assert torch.equal(alphas_cumprod(COGVIDEOX_2B), right)
    idx = [0, 250, 500, 750, 999]
    assert right[idx].tolist() == pytest.approx(COGVIDEOX_TABLE[3.0], abs=6e-7)
    assert wrong[idx].tolist() != pytest.approx(COGVIDEOX_TABLE[3.0], abs=1e-4)  # t=500: 0.0957 vs 0.0953
    # shift 1 + rescale equals diffusers' betas-based zero-SNR rescale of the plain schedule
    ref = DDIMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear", **BETAS).alphas_cumprod
    assert torch.allclose(alphas_cumprod(ZERO_SNR_V), ref.double(), rtol=0, atol=FLOAT32_SCHEDULE_ATOL)


# ---------------------------------------------------------------------------------- forward process and targets

def test_add_noise_velocity_target_match_diffusers():
    g = _gen(1)
    x0, eps = torch.randn(4, 4, 2, 3, 3, generator=g), torch.randn(4, 4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 250, 998, 999])
    for cfg in (SD15_V, COGVIDEOX_2B):
        abar = alphas_cumprod(cfg)
        a = abar[t].sqrt().float().view(-1, 1, 1, 1, 1)
        s = (1 - abar[t]).sqrt().float().view(-1, 1, 1, 1, 1)
        assert torch.allclose(velocity(x0, eps, t, abar), a * eps - s * x0, atol=1e-6)
        assert torch.allclose(add_noise(x0, eps, t, abar), a * x0 + s * eps, atol=1e-6)
        assert torch.equal(target(x0, eps, t, abar, "epsilon"), eps)
        assert torch.equal(target(x0, eps, t, abar, "v_prediction"), velocity(x0, eps, t, abar))
    ref = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", **BETAS)
    abar = alphas_cumprod(SD15_V)
    assert _rel(add_noise(x0, eps, t, abar), ref.add_noise(x0, eps, t)) < 1e-6
    assert _rel(velocity(x0, eps, t, abar), ref.get_velocity(x0, eps, t)) < 1e-6
    abar = alphas_cumprod(COGVIDEOX_2B)
    assert torch.allclose(velocity(x0, eps, t, abar)[3], -x0[3])  # ᾱ = 0: v = −x0
    with pytest.raises(ValueError, match="integers"):
        add_noise(x0, eps, t.float(), abar)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        add_noise(x0, eps, torch.tensor([0, 1, 2, 1000]), abar)


def test_predicted_x0_inverts_and_cogvideox_x0_loss_equals_v_mse():
    g = _gen(2)
    x0, eps = torch.randn(3, 16, 2, 4, 4, generator=g, dtype=torch.float64), \
        torch.randn(3, 16, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    abar = alphas_cumprod(COGVIDEOX_2B)
    x_t = add_noise(x0, eps, t, abar)
    assert torch.allclose(predicted_x0(velocity(x0, eps, t, abar), x_t, t, abar, "v_prediction"), x0, atol=1e-12)
    t_eps = torch.tensor([0, 400, 998])
    x_t_eps = add_noise(x0, eps, t_eps, abar)
    assert torch.allclose(predicted_x0(eps, x_t_eps, t_eps, abar, "epsilon"), x0, atol=1e-9)
    # the official CogVideoX loss: mean of w_t·(x̂0 − x0)², w_t = 1/(1 − ᾱ_t), on x̂0 from the model's v
    v_hat = velocity(x0, eps, t, abar) + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    w = (1 / (1 - abar[t])).view(-1, 1, 1, 1, 1)
    official = (w * (predicted_x0(v_hat, x_t, t, abar, "v_prediction") - x0) ** 2).flatten(1).mean(1).mean()
    ours = weighted_mse(v_hat, velocity(x0, eps, t, abar))
    assert ours.dtype == torch.float32 and ours.item() == pytest.approx(official.item(), rel=1e-6)


# ---------------------------------------------------------------------------------- min-SNR

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers_script(prediction):
    t = torch.tensor([0, 1, 10, 100, 300, 500, 700, 999])
    gamma = 5.0
    sched = DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction, **BETAS)
    snr = compute_snr(sched, t)
    # examples/text_to_image/train_text_to_image_lora.py (current main)
    ref = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    ref = ref / snr if prediction == "epsilon" else ref / (snr + 1)
    cfg = dataclasses.replace(SD15, prediction=prediction)
    ours = min_snr_weights(t, alphas_cumprod(cfg), gamma, prediction)
    # on diffusers' own float32 ᾱ the formulas agree to rounding; on the float64 ᾱ the gap is diffusers'
    # float32 1 − ᾱ at t = 0 (cancellation): 2.55e-5 relative, measured with diffusers 0.42.1
    same_abar = min_snr_weights(t, sched.alphas_cumprod, gamma, prediction)
    assert torch.allclose(same_abar, ref, rtol=1e-6, atol=0)
    assert ours.dtype == torch.float32 and torch.allclose(ours, ref, rtol=5e-5, atol=0)
    assert ours[-1] == 1.0 if prediction == "epsilon" else ours[-1] < 1.0  # low SNR: ε weight 1
    assert ours[0] < 0.1  # high SNR is clamped to γ and down-weighted
    zero = min_snr_weights(torch.tensor([0, 999]), alphas_cumprod(ZERO_SNR_V), gamma, "v_prediction")
    assert zero[1].item() == 0.0 and torch.isfinite(zero).all()


# ---------------------------------------------------------------------------------- training draws and loss

def test_draws_come_from_the_sample_generator_in_order():
    cfg = dataclasses.replace(SD15_V, noise_offset=0.1, snr_gamma=5.0)
    x0 = torch.randn(2, 4, 3, 4, 4, generator=_gen(3))
    inp = training_inputs(x0, cfg, [_gen(10), _gen(11)])
    abar = alphas_cumprod(cfg)
    for i, seed in enumerate((10, 11)):
        g = _gen(seed)
        t = torch.randint(0, 1000, (1,), generator=g)
        eps = torch.randn(4, 3, 4, 4, generator=g)
        off = torch.randn(4, 1, 1, 1, generator=g)  # [C, 1, 1, 1]: constant over frames and pixels
        noise = (eps + 0.1 * off)[None]
        assert inp.t[i].item() == t.item() and inp.t.dtype == torch.int64
        assert torch.equal(inp.x_t[i : i + 1], add_noise(x0[i : i + 1], noise, t, abar))
        assert torch.equal(inp.target[i : i + 1], velocity(x0[i : i + 1], noise, t, abar))  # offset is in ε
    t0, plain = draw_training_noise(x0, dataclasses.replace(cfg, noise_offset=0.0), [_gen(10), _gen(11)])
    t1, offset = draw_training_noise(x0, cfg, [_gen(10), _gen(11)])
    shift = offset - plain
    assert torch.equal(t0, t1) and shift.abs().min() > 0
    assert torch.allclose(shift, shift[:, :, :1, :1, :1].expand_as(shift), atol=1e-6)
    img_t, img = draw_training_noise(x0[:, :, 0], cfg, [_gen(10), _gen(11)])  # images: offset [C, 1, 1]
    assert img.shape == (2, 4, 4, 4) and torch.equal(img_t, t1)
    with pytest.raises(ValueError, match="one generator per sample"):
        training_inputs(x0, cfg, [_gen(1)])


def test_batch_layout_invariance():
    cfg = dataclasses.replace(SD15, noise_offset=0.05, snr_gamma=5.0)
    x0 = torch.randn(2, 4, 2, 4, 4, generator=_gen(4))
    both = training_inputs(x0, cfg, [_gen(20), _gen(21)])
    loss_both = ddpm_loss(_fake_model, x0, cfg, [_gen(20), _gen(21)])
    losses = []
    for i, seed in enumerate((20, 21)):
        one = training_inputs(x0[i : i + 1], cfg, [_gen(seed)])
        assert torch.equal(one.t, both.t[i : i + 1]) and torch.equal(one.x_t, both.x_t[i : i + 1])
        assert torch.equal(one.target, both.target[i : i + 1]) and torch.equal(one.weights, both.weights[i : i + 1])
        losses.append(ddpm_loss(_fake_model, x0[i : i + 1], cfg, [_gen(seed)]))
    assert loss_both.item() == pytest.approx(0.5 * (losses[0] + losses[1]).item(), rel=1e-6)


def test_loss_reduction_is_the_scripts():
    g = _gen(5)
    pred, tgt = torch.randn(3, 4, 2, 4, 4, generator=g), torch.randn(3, 4, 2, 4, 4, generator=g)
    w = torch.tensor([0.2, 1.0, 3.0])
    ref = F.mse_loss(pred.float(), tgt.float(), reduction="none")
    ref = (ref.mean(dim=list(range(1, ref.ndim))) * w).mean()
    assert torch.allclose(weighted_mse(pred, tgt, w), ref)
    assert torch.allclose(weighted_mse(pred, tgt), F.mse_loss(pred, tgt))
    # snr_gamma = 0: no weights; > 0: the weights of the drawn timesteps
    x0 = torch.randn(3, 4, 4, 4, generator=g)
    assert training_inputs(x0, SD15, [_gen(i) for i in range(3)]).weights is None
    cfg = dataclasses.replace(SD15, snr_gamma=5.0)
    inp = training_inputs(x0, cfg, [_gen(i) for i in range(3)])
    assert torch.equal(inp.weights, min_snr_weights(inp.t, alphas_cumprod(cfg), 5.0, "epsilon"))
    loss = ddpm_loss(_fake_model, x0, cfg, [_gen(i) for i in range(3)])
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(weighted_mse(_fake_model(inp.x_t, inp.t.float()), inp.target,
                                                     inp.weights).item())


# ---------------------------------------------------------------------------------- timestep grids

def test_ddim_25_steps_leading_offset_1():
    s = DDIMSampler(alphas_cumprod(ANIMATEDIFF), **DDIM_PRESETS["animatediff"])
    s.set_timesteps(25)
    assert s.timesteps.long().tolist() == list(range(961, 0, -40))  # [961, 921, ..., 41, 1]
    s = make_sampler("ddim", COGVIDEOX_2B, **DDIM_PRESETS["cogvideox"])
    s.set_timesteps(50)
    assert s.timesteps.long().tolist() == list(range(999, 0, -20))  # [999, 979, ..., 19]


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 25, 50])
def test_grids_match_diffusers(spacing, steps):
    kw = dict(beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=1, **BETAS)
    ref = DDIMScheduler(**kw)
    abar = ref.alphas_cumprod  # diffusers' float32 ᾱ, so σ compares at float32 rounding (schedule: tests above)
    ddim = DDIMSampler(abar, spacing=spacing, steps_offset=1)
    ddim.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ddim.timesteps.tolist() == ref.timesteps.float().tolist()
    for ours, ref in ((EulerSampler(abar, spacing=spacing, steps_offset=1), EulerDiscreteScheduler(**kw)),
                      (DPMSolverPP2MSampler(abar, spacing=spacing, steps_offset=1), DPMSolverMultistepScheduler(**kw))):
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        assert ours.timesteps.tolist() == ref.timesteps.float().tolist()
        assert torch.allclose(ours.sigmas, ref.sigmas, rtol=3e-7, atol=0)
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=3e-7)


def test_trailing_grid_keeps_n_points_where_numpy_adds_one():
    ref = DDIMScheduler(timestep_spacing="trailing", **BETAS)
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and ref.timesteps[-1] == -1  # diffusers' float-arange artefact
    ts = spaced_timesteps(61, 1000, "trailing")
    assert len(ts) == 61 and ts.tolist() == ref.timesteps[:61].float().tolist()
    with pytest.raises(ValueError, match="outside"):
        spaced_timesteps(1000, 1000, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="num_steps"):
        spaced_timesteps(1001, 1000, "linspace")


# ---------------------------------------------------------------------------------- step parity

def _ddim_pair(name: str, prediction: str):
    cfg = {"sd15": SD15, "animatediff": ANIMATEDIFF, "cogvideox": COGVIDEOX_2B}[name]
    cfg = dataclasses.replace(cfg, prediction=prediction)
    p = DDIM_PRESETS[name]
    common = dict(beta_schedule=cfg.beta_schedule, prediction_type=prediction, clip_sample=False,
                  timestep_spacing=p["spacing"], steps_offset=p["steps_offset"],
                  set_alpha_to_one=p["set_alpha_to_one"], **BETAS)
    ref = (CogVideoXDDIMScheduler(rescale_betas_zero_snr=True, snr_shift_scale=3.0, **common)
           if name == "cogvideox" else DDIMScheduler(**common))
    if name == "cogvideox":  # float64 on both sides: the whole path, schedule included
        assert torch.equal(alphas_cumprod(cfg), ref.alphas_cumprod)
    # diffusers' own ᾱ, so the step rule is compared alone (its float32 ᾱ drift: test_end_to_end_...)
    return DDIMSampler(ref.alphas_cumprod, prediction, **p), ref


def _sigma_pair(kind: str, name: str, prediction: str, spacing: str):
    cfg = {"sd15": SD15, "animatediff": ANIMATEDIFF, "zero_snr": ZERO_SNR_V}[name]
    cfg = dataclasses.replace(cfg, prediction=prediction)
    cls = EulerDiscreteScheduler if kind == "euler" else DPMSolverMultistepScheduler
    ref = cls(beta_schedule=cfg.beta_schedule, prediction_type=prediction, timestep_spacing=spacing, steps_offset=1,
              rescale_betas_zero_snr=cfg.zero_terminal_snr, **BETAS)
    ours = EulerSampler if kind == "euler" else DPMSolverPP2MSampler
    return ours(ref.alphas_cumprod, prediction, spacing=spacing, steps_offset=1), ref


def _check_parity(ours, ref, steps: int, shape: tuple[int, ...] = (2, 4, 2, 8, 8),
                  rtol: float = STEP_RTOL) -> tuple[float, float]:
    """Teacher-forced (same x and model output at every step) and free-running comparisons against the
    diffusers loop; returns the worst relative errors (step, trajectory). diffusers is handed the model output
    in float64, so its step arithmetic runs in float64 on the float32 state (its schedulers upcast to the
    output's dtype): the oracle is then its formula, not its float32 rounding."""
    noise = torch.randn(shape, generator=_gen(7))
    ref.set_timesteps(steps)
    x_ref = noise * ref.init_noise_sigma
    traj = []
    ours.sample(_fake_model, noise, steps, callback=lambda i, t, x: traj.append(x))
    ours.set_timesteps(steps)
    assert len(traj) == len(ref.timesteps) == len(ours.timesteps)
    worst_step = worst_traj = 0.0
    for i, t in enumerate(ref.timesteps):
        inp_ref = ref.scale_model_input(x_ref, t)
        assert _rel(ours.scale_model_input(x_ref), inp_ref) < rtol
        pred = _fake_model(inp_ref, t.float().expand(shape[0]))
        mine = ours.step(pred, ours.timesteps[i], x_ref)
        x_ref = ref.step(pred.double(), t, x_ref).prev_sample.float()
        worst_step = max(worst_step, _rel(mine, x_ref))
        worst_traj = max(worst_traj, _rel(traj[i], x_ref))
    assert worst_step <= rtol and worst_traj <= rtol, (worst_step, worst_traj)
    return worst_step, worst_traj


@pytest.mark.parametrize("name, prediction", [("sd15", "epsilon"), ("sd15", "v_prediction"),
                                              ("animatediff", "epsilon"), ("cogvideox", "v_prediction")])
def test_ddim_steps_match_diffusers(name, prediction):
    for steps in (1, 10, 25):
        _check_parity(*_ddim_pair(name, prediction), steps)


@pytest.mark.parametrize("kind", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("name, prediction, spacing", [
    ("sd15", "epsilon", "linspace"), ("sd15", "v_prediction", "leading"), ("animatediff", "epsilon", "linspace"),
    ("zero_snr", "v_prediction", "trailing")])
def test_sigma_sampler_steps_match_diffusers(kind, name, prediction, spacing):
    for steps in (1, 10, 20):  # 20 >= 15: DPM's last step is still first-order (final σ = 0)
        _check_parity(*_sigma_pair(kind, name, prediction, spacing), steps)


def test_euler_zero_snr_first_step_keeps_float32_precision():
    """From σ = 4096 diffusers' float32 Euler step forms x − x̂0 from two ~4096-sized terms: 1.7e-5 (10 steps)
    and 1.7e-3 (1 step) relative off the float64 value of the same formula (measured, diffusers 0.42.1)."""
    for steps in (1, 10):
        ours, ref = _sigma_pair("euler", "zero_snr", "v_prediction", "trailing")
        ours.set_timesteps(steps)
        ref.set_timesteps(steps)
        s, s_next = ref.sigmas[0].item(), ref.sigmas[1].item()
        assert s == pytest.approx(4096.0, rel=1e-6)  # ᾱ_999 = 2^-24
        x = torch.randn(2, 4, 2, 8, 8, generator=_gen(7)) * ours.init_noise_sigma
        pred = _fake_model(ours.scale_model_input(x), ours.timesteps[:1].expand(2))
        x64, v64 = x.double(), pred.double()
        x0 = v64 * (-s / (s * s + 1) ** 0.5) + x64 / (s * s + 1)
        exact = x64 + (x64 - x0) / s * (s_next - s)
        assert _rel(ours.step(pred, ours.timesteps[0], x), exact) < 1e-6
        assert _rel(ref.step(pred, ref.timesteps[0], x).prev_sample, exact) > 1e-5  # what the rewrite avoids


@pytest.mark.parametrize("kind", ["ddim", "euler", "dpmpp_2m"])
def test_end_to_end_with_the_float64_schedule(kind):
    """make_sampler(cfg) (float64 ᾱ) against the plain float32 diffusers loop: the schedule's float32 drift
    (<= 4.7e-7 in ᾱ) does not reach the samples beyond float32 rounding."""
    options = DDIM_PRESETS["sd15"] if kind == "ddim" else {}
    ours = make_sampler(kind, SD15, **options)
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}[kind]
    ref = cls(beta_schedule="scaled_linear", steps_offset=1, clip_sample=False, set_alpha_to_one=False, **BETAS) \
        if kind == "ddim" else cls(beta_schedule="scaled_linear", **BETAS)
    noise = torch.randn(2, 4, 8, 8, generator=_gen(12))
    out = ours.sample(_fake_model, noise, 25)
    ref.set_timesteps(25)
    x = noise * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(_fake_model(ref.scale_model_input(x, t), t.float().expand(2)), t, x).prev_sample
    assert _rel(out, x) < END_TO_END_RTOL, _rel(out, x)


# ---------------------------------------------------------------------------------- sampler behaviour

@pytest.mark.parametrize("kind", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("cfg", [SD15, SD15_V, COGVIDEOX_2B], ids=["eps", "v", "cogvideox"])
def test_samplers_recover_a_single_data_point(kind, cfg):
    """With one data point the exact denoiser is known in closed form; every sampler must land on it."""
    options = {"ddim": dict(spacing="trailing", steps_offset=0, set_alpha_to_one=True)}.get(kind, {})
    if kind != "ddim" and cfg.zero_terminal_snr:
        options = dict(spacing="trailing")
    sampler = make_sampler(kind, cfg, **options)
    x0 = torch.randn(2, 4, 2, 4, 4, generator=_gen(8))
    abar = alphas_cumprod(cfg)

    def exact(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if kind == "ddim":
            a = float(abar[int(t[0])])
        else:  # σ-samplers: the model input x/√(σ²+1) is the VP latent at ᾱ = 1/(σ² + 1)
            sigma = float(sampler.sigmas[(sampler.timesteps == t[0]).nonzero()[0, 0]])
            a = 1 / (sigma * sigma + 1)
        eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
        return eps if cfg.prediction == "epsilon" else a ** 0.5 * eps - (1 - a) ** 0.5 * x0

    out = sampler.sample(exact, torch.randn(x0.shape, generator=_gen(9)), 12)
    assert torch.allclose(out, x0, atol=2e-4), (out - x0).abs().max()


def test_sampler_errors_and_cfg():
    abar = alphas_cumprod(SD15)
    s = EulerSampler(abar)
    s.set_timesteps(5)
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="expects timestep"):
        s.step(x, s.timesteps[1], x)
    for _ in range(5):
        s.step(x, s.timesteps[s._i], x)
    with pytest.raises(ValueError, match="past the 5-step"):
        s.step(x, 0.0, x)
    with pytest.raises(ValueError, match="epsilon model"):
        DDIMSampler(alphas_cumprod(ZERO_SNR_V), "epsilon", spacing="trailing").set_timesteps(10)
    with pytest.raises(ValueError, match="decrease"):
        DDIMSampler(abar.flip(0))
    with pytest.raises(ValueError, match="sampler 'pndm'"):
        make_sampler("pndm", SD15)
    assert cfg_model is flow.cfg_model  # guidance is linear in ε and in v alike
    guided = cfg_model(lambda x, t: x + 1, lambda x, t: x, 7.5)(x, torch.zeros(1))
    assert torch.allclose(guided, x + 7.5)
    assert np.array_equal(spaced_timesteps(4, 1000, "linspace", variant="euler"),
                          np.linspace(0, 999, 4, dtype=np.float32)[::-1].astype(np.float64))
