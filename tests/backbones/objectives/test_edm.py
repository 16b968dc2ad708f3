"""backbones.objectives.edm + edm_samplers: EDM-v parameterisation, per-sample draws, the λ-weighted loss, and
SVD's Euler sampler / pipeline loop.

Oracles: diffusers (0.42.1 here) EulerDiscreteScheduler built from SVD's scheduler_config.json (svd-framer.md
§4.2) and StableVideoDiffusionPipeline.__call__'s loop re-stated below (not imported: the pipeline module pulls
in transformers, ~9 s here).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from backbones.objectives.edm import (EDMObjectiveConfig, augment_condition, denoised, draw_cond_sigmas,
                                      draw_sigmas, edm_loss, edm_scalings, edm_training_loss, loss_weights,
                                      training_inputs, v_target)
from backbones.objectives.edm_samplers import (SVD_DECODE_CHUNK_SIZE, SVD_FPS, SVD_MAX_GUIDANCE, SVD_MIN_GUIDANCE,
                                               SVD_MOTION_BUCKET_ID, SVD_NOISE_AUG_STRENGTH, SVD_NUM_STEPS,
                                               SVDEulerSampler, added_time_ids, frame_guidance_scales,
                                               karras_sigmas, sample_svd)

# stabilityai/stable-video-diffusion-img2vid(-xt) scheduler/scheduler_config.json, field by field from §4.2
SVD_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "use_karras_sigmas": True, "sigma_min": 0.002, "sigma_max": 700.0, "timestep_type": "continuous",
    "interpolation_type": "linear", "timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False,
}
# 25-step σ grid as printed in §4.2 (computed there with diffusers 0.42.1), to its printed precision
SPEC_SIGMAS_25 = [700, 545.73, 421.57, 322.45, 244.02, 182.55, 134.85, 98.27, 70.54, 49.81, 34.54, 23.47, 15.59,
                  10.10, 6.354, 3.870, 2.269, 1.273, 0.678, 0.339, 0.157, 0.066, 0.025, 0.0079, 0.002, 0]


def _diffusers_scheduler(steps: int) -> EulerDiscreteScheduler:
    sch = EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)
    sch.set_timesteps(steps)
    return sch


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _toy_unet(x: torch.Tensor, t: torch.Tensor, cond_flag: torch.Tensor) -> torch.Tensor:
    """Deterministic stand-in for the UNet: depends on x, the c_noise timestep and whether a row is conditional,
    and varies per frame so the per-frame guidance ramp matters."""
    t = torch.as_tensor(t, dtype=torch.float32)
    t = t.view(-1, 1, 1, 1, 1) if t.ndim == 1 else t
    f = torch.arange(x.shape[1], dtype=torch.float32).view(1, -1, 1, 1, 1)
    c = cond_flag.view(-1, 1, 1, 1, 1)
    return 0.6 * torch.tanh(x) * torch.cos(t) + 0.3 * torch.sin(2 * t + f) + c * (0.2 * x + 0.1 * f)


# --------------------------------------------------------------------------------------------
# Sampler vs diffusers


@pytest.mark.parametrize("steps", [25, 14, 5, 1])
def test_sigmas_timesteps_init_sigma_match_diffusers(steps):
    ref = _diffusers_scheduler(steps)
    ours = SVDEulerSampler()
    ours.set_timesteps(steps)
    assert torch.equal(ours.sigmas, ref.sigmas)          # bit-equal: same float64 numpy recipe, one rounding
    assert torch.equal(ours.timesteps, ref.timesteps.float())
    assert ours.init_noise_sigma == float(ref.init_noise_sigma)
    assert torch.equal(karras_sigmas(steps), ref.sigmas)


def test_schedule_pinned_numbers_from_spec():
    s = SVDEulerSampler()
    s.set_timesteps(SVD_NUM_STEPS)
    assert len(s.sigmas) == 26 and s.sigmas[-1] == 0
    for got, want in zip(s.sigmas.tolist(), SPEC_SIGMAS_25):
        assert got == pytest.approx(want, rel=6e-3, abs=5e-4)
    assert float(s.timesteps[0]) == pytest.approx(1.6378, abs=1e-4)     # ¼·ln 700
    assert float(s.timesteps[-1]) == pytest.approx(-1.5537, abs=1e-4)   # ¼·ln 0.002
    assert s.init_noise_sigma == pytest.approx(math.sqrt(700.0 ** 2 + 1), rel=1e-7)  # 700.0007, "leading"
    lin = SVDEulerSampler(spacing="linspace")
    lin.set_timesteps(25)
    assert lin.init_noise_sigma == 700.0


def test_scale_model_input_and_step_match_diffusers():
    steps = SVD_NUM_STEPS
    ref = _diffusers_scheduler(steps)
    ours = SVDEulerSampler()
    ours.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 6, generator=g) * ref.init_noise_sigma
    x_ref = x.clone()
    for t_ref, t in zip(ref.timesteps, ours.timesteps):
        assert torch.equal(ours.scale_model_input(x), ref.scale_model_input(x_ref, t_ref))
        out = torch.randn(x.shape, generator=g)                 # the same v-prediction into both
        step_ref = ref.step(out, t_ref, x_ref)
        x_new = ours.step(out, t, x)
        torch.testing.assert_close(x_new, step_ref.prev_sample, atol=1e-6, rtol=0)
        # edm.denoised is the scheduler's v_prediction x̂0
        torch.testing.assert_close(denoised(out, x, torch.tensor(ours.sigmas[ours.step_index - 1].item())),
                                   step_ref.pred_original_sample, atol=1e-6, rtol=1e-6)
        x, x_ref = x_new, step_ref.prev_sample
    assert x.abs().max() < 50  # landed on a "denoised" scale, not σ_max's


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """The pipeline module's helper, restated."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def _pipeline_loop(noise: torch.Tensor, steps: int, min_g: float, max_g: float) -> tuple[torch.Tensor, list]:
    """StableVideoDiffusionPipeline.__call__'s loop, re-stated with diffusers' scheduler (batch_size B,
    num_videos_per_prompt 1); the UNet call is the toy with the pipeline's [uncond; cond] rows."""
    sch = _diffusers_scheduler(steps)
    B, F = noise.shape[:2]
    latents = noise * sch.init_noise_sigma                                   # prepare_latents
    do_cfg = max_g > 1
    guidance_scale = torch.linspace(min_g, max_g, F).unsqueeze(0)
    guidance_scale = guidance_scale.to(latents.device, latents.dtype)
    guidance_scale = guidance_scale.repeat(B, 1)
    guidance_scale = _append_dims(guidance_scale, latents.ndim)
    flags = torch.cat([torch.zeros(B), torch.ones(B)]) if do_cfg else torch.ones(B)
    seen = []
    for t in sch.timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = sch.scale_model_input(latent_model_input, t)
        seen.append(latent_model_input.clone())
        noise_pred = _toy_unet(latent_model_input, t, flags)
        if do_cfg:
            noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
        latents = sch.step(noise_pred, t, latents).prev_sample
    return latents, seen


@pytest.mark.parametrize("min_g,max_g", [(SVD_MIN_GUIDANCE, SVD_MAX_GUIDANCE), (1.0, 1.0), (2.5, 1.5)])
def test_sample_svd_matches_pipeline_loop(min_g, max_g):
    B, F = 2, 4
    noise = torch.randn(B, F, 4, 3, 5, generator=torch.Generator().manual_seed(3))
    ref, ref_inputs = _pipeline_loop(noise, 5, min_g, max_g)
    do_cfg = max_g > 1
    calls, cbs = [], []

    def model_fn(x, t):
        assert x.shape[0] == (2 * B if do_cfg else B) and t.shape == (x.shape[0],)
        calls.append(x.clone())
        flags = torch.cat([torch.zeros(B), torch.ones(B)]) if do_cfg else torch.ones(B)
        return _toy_unet(x, t, flags)

    out = sample_svd(model_fn, noise, SVDEulerSampler(), 5, min_g, max_g, num_frames=F,
                     callback=lambda i, t, x: cbs.append((i, t.shape)))
    assert len(calls) == 5 and cbs == [(i, (B,)) for i in range(5)]
    for a, b in zip(calls, ref_inputs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_guidance_ramp_shape_and_cfg_switch():
    g = frame_guidance_scales(SVD_MIN_GUIDANCE, SVD_MAX_GUIDANCE, 5, 3)
    assert g.shape == (3, 5, 1, 1, 1)
    assert g[:, 0].flatten().tolist() == [1.0] * 3 and g[:, -1].flatten().tolist() == [3.0] * 3
    torch.testing.assert_close(g[1, :, 0, 0, 0], torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    noise = torch.randn(1, 2, 1, 2, 2)
    with pytest.raises(ValueError, match="min_guidance"):
        sample_svd(lambda x, t: x, noise, None, 2, 2.0, 1.0)
    with pytest.raises(ValueError, match="num_frames"):
        sample_svd(lambda x, t: x, noise, None, 2, num_frames=3)
    # unguided .sample is sample_svd with guidance 1 → 1 (one forward of B rows a step)
    fn = lambda x, t: _toy_unet(x, t, torch.ones(x.shape[0]))
    torch.testing.assert_close(SVDEulerSampler().sample(fn, noise, 3), sample_svd(fn, noise, None, 3, 1.0, 1.0))


def test_step_guards():
    s = SVDEulerSampler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.scale_model_input(torch.zeros(1))
    s.set_timesteps(2)
    x = torch.zeros(1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="expects timestep"):
        s.step(x, s.timesteps[1], x)
    s.step(x, s.timesteps[0], x)
    s.step(x, s.timesteps[1], x)
    with pytest.raises(ValueError, match="past the 2-step"):
        s.step(x, s.timesteps[1], x)
    with pytest.raises(ValueError, match="sigma_min"):
        SVDEulerSampler(sigma_min=800.0)
    with pytest.raises(ValueError, match="spacing"):
        SVDEulerSampler(spacing="uniform")


def test_inference_constants_and_added_time_ids():
    assert (SVD_NUM_STEPS, SVD_FPS, SVD_MOTION_BUCKET_ID, SVD_NOISE_AUG_STRENGTH) == (25, 7, 127, 0.02)
    assert (SVD_MIN_GUIDANCE, SVD_MAX_GUIDANCE, SVD_DECODE_CHUNK_SIZE) == (1.0, 3.0, None)
    ids = added_time_ids(SVD_FPS, SVD_MOTION_BUCKET_ID, SVD_NOISE_AUG_STRENGTH, 2)
    # the pipeline: fps = fps - 1; torch.tensor([[fps, motion_bucket_id, noise_aug_strength]]).repeat(B, 1)
    assert torch.equal(ids, torch.tensor([[6, 127, 0.02]], dtype=torch.float32).repeat(2, 1))
    per = added_time_ids(7, 127, torch.tensor([0.01, 0.05]), 2, dtype=torch.float16)
    assert per.dtype == torch.float16 and per[:, 2].tolist() == [torch.tensor(0.01).half().item(),
                                                                  torch.tensor(0.05).half().item()]
    with pytest.raises(ValueError, match="noise_aug_strength"):
        added_time_ids(7, 127, torch.zeros(3), 2)


# --------------------------------------------------------------------------------------------
# Objective


def test_edm_scalings_formulas():
    sigma = torch.tensor([0.002, 0.3, 1.0, 7.5, 700.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma)
    torch.testing.assert_close(c_skip, 1 / (sigma ** 2 + 1))
    torch.testing.assert_close(c_out, -sigma / (sigma ** 2 + 1).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma ** 2 + 1).sqrt())
    torch.testing.assert_close(c_noise, 0.25 * sigma.log())
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sd)
    torch.testing.assert_close(c_skip, sd ** 2 / (sigma ** 2 + sd ** 2))
    torch.testing.assert_close(c_out, -sigma * sd / (sigma ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(c_noise, 0.25 * sigma.log())


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_v_target_is_the_perfect_output_and_edm_weight_cancels(sigma_data):
    cfg = EDMObjectiveConfig(sigma_data=sigma_data)
    x0 = torch.randn(3, 2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    inp = training_inputs(x0, cfg, _gens(4, 5, 6))
    v = v_target(x0, inp.noise, inp.sigma, sigma_data)
    torch.testing.assert_close(denoised(v, inp.x_noisy, inp.sigma, sigma_data), x0, atol=1e-4, rtol=1e-4)
    # λ·c_out² = 1: the "edm" loss on D is plain MSE of F against v_target, per sample
    f = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    want = (f - v).square().flatten(1).mean(1).mean()
    torch.testing.assert_close(edm_loss(f, inp, cfg), want, rtol=1e-4, atol=1e-6)


def test_training_inputs_draw_order_and_batch_independence():
    cfg = EDMObjectiveConfig()
    x0 = torch.randn(2, 3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    inp = training_inputs(x0, cfg, _gens(10, 11))
    for i, seed in enumerate((10, 11)):
        g = torch.Generator().manual_seed(seed)   # per generator: ln σ scalar, then ε shaped x0[i]
        sigma = (torch.randn(1, generator=g) * 1.6 + 0.7).exp()[0]
        eps = torch.randn(x0.shape[1:], generator=g)
        assert inp.sigma[i] == sigma and torch.equal(inp.noise[i], eps)
        torch.testing.assert_close(inp.x_noisy[i], x0[i] + sigma * eps)
        torch.testing.assert_close(inp.model_input[i], (x0[i] + sigma * eps) / torch.sqrt(sigma ** 2 + 1))
        torch.testing.assert_close(inp.c_noise[i], 0.25 * sigma.log())
        torch.testing.assert_close(inp.weights[i], (sigma ** 2 + 1) / sigma ** 2)
    assert torch.equal(inp.target, x0)
    alone = training_inputs(x0[1:], cfg, _gens(11))
    assert torch.equal(alone.x_noisy[0], inp.x_noisy[1]) and torch.equal(alone.sigma[0], inp.sigma[1])
    assert torch.equal(draw_sigmas(_gens(10, 11), cfg), inp.sigma)  # draw_sigmas = the first draw of each
    with pytest.raises(ValueError, match="one generator per sample"):
        training_inputs(x0, cfg, _gens(1))


def test_sigma_distribution_is_lognormal():
    cfg = EDMObjectiveConfig()
    ln = draw_sigmas(_gens(*range(4000)), cfg).log()
    assert abs(ln.mean().item() - 0.7) < 0.08 and abs(ln.std().item() - 1.6) < 0.08
    ln_c = draw_cond_sigmas(_gens(*range(4000)), cfg).log()
    assert abs(ln_c.mean().item() + 3.0) < 0.03 and abs(ln_c.std().item() - 0.5) < 0.03


def test_cond_sigma_and_augmentation():
    cfg = EDMObjectiveConfig()
    gens = _gens(7, 8)
    s = draw_cond_sigmas(gens, cfg)
    img = torch.rand(2, 3, 4, 4) * 2 - 1
    aug = augment_condition(img, s, gens)
    ref = _gens(7, 8)
    for i, g in enumerate(ref):
        sc = (torch.randn(1, generator=g) * 0.5 - 3.0).exp()[0]
        assert s[i] == sc
        torch.testing.assert_close(aug[i], img[i] + sc * torch.randn(3, 4, 4, generator=g))  # pipeline's formula
    fixed = dataclasses.replace(cfg, cond_sigma_fixed=0.02)
    gens_f, gens_r = _gens(7), _gens(7)
    assert draw_cond_sigmas(gens_f, fixed).tolist() == [pytest.approx(0.02)]
    draw_cond_sigmas(gens_r, cfg)                        # a fixed σ_cond still consumes its draw
    assert torch.equal(torch.randn(3, generator=gens_f[0]), torch.randn(3, generator=gens_r[0]))


def test_loss_weighting_and_reduction_by_hand():
    # two samples, two elements each: D = c_skip·x + c_out·F, then per-sample mean, λ, batch mean
    x0 = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    x_noisy = torch.tensor([[2.0, 0.0], [0.5, 3.0]])
    f = torch.tensor([[0.1, 0.2], [-0.3, 0.4]])
    sigma = torch.tensor([1.0, 2.0])
    cfg = EDMObjectiveConfig()
    inp = training_inputs(torch.zeros(2, 2), cfg, _gens(0, 1))
    inp = dataclasses.replace(inp, x_noisy=x_noisy, sigma=sigma, target=x0, weights=loss_weights(sigma, cfg))
    # σ = 1: c_skip 1/2, c_out −1/√2, λ 2;  σ = 2: c_skip 1/5, c_out −2/√5, λ 5/4
    d0 = [0.5 * 2.0 - 0.1 / math.sqrt(2), 0.5 * 0.0 - 0.2 / math.sqrt(2)]
    d1 = [0.2 * 0.5 + 0.3 * 2 / math.sqrt(5), 0.2 * 3.0 - 0.4 * 2 / math.sqrt(5)]
    m0 = ((d0[0] - 1.0) ** 2 + (d0[1] + 1.0) ** 2) / 2
    m1 = ((d1[0] - 0.5) ** 2 + (d1[1] - 2.0) ** 2) / 2
    assert inp.weights.tolist() == [2.0, 1.25]
    assert edm_loss(f, inp, cfg).item() == pytest.approx((2.0 * m0 + 1.25 * m1) / 2, rel=1e-6)
    none = dataclasses.replace(cfg, loss_weighting="none")
    inp_none = dataclasses.replace(inp, weights=loss_weights(sigma, none))
    assert edm_loss(f, inp_none, none).item() == pytest.approx((m0 + m1) / 2, rel=1e-6)
    sd = dataclasses.replace(cfg, sigma_data=0.5)
    torch.testing.assert_close(loss_weights(sigma, sd), (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2)


def test_edm_training_loss_calls_model_with_scaled_input_and_c_noise():
    cfg = EDMObjectiveConfig()
    x0 = torch.randn(2, 3, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    seen = {}

    def model_fn(x, t):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    loss, inp = edm_training_loss(model_fn, x0, cfg, _gens(1, 2))
    assert torch.equal(seen["x"], inp.model_input) and torch.equal(seen["t"], inp.c_noise)
    # F = 0: D = x_σ/(σ² + 1)
    d = inp.x_noisy / (inp.sigma ** 2 + 1).view(-1, 1, 1, 1, 1)
    want = ((d - x0).square().flatten(1).mean(1) * inp.weights).mean()
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("field,value", [("p_std", 0.0), ("p_mean", float("nan")), ("sigma_data", -1.0),
                                         ("loss_weighting", "snr"), ("cond_sigma_p_std", 0.0),
                                         ("cond_sigma_p_mean", float("inf")), ("cond_sigma_fixed", -0.1)])
def test_validate_names_the_key(field, value):
    cfg = dataclasses.replace(EDMObjectiveConfig(), **{field: value})
    with pytest.raises(ValueError, match=rf"objective\.{field}"):
        cfg.validate()
    EDMObjectiveConfig().validate()
