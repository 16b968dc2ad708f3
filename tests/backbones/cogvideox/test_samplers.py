"""backbones.cogvideox.samplers: the per-preset schedule, CogVideoX DDIM and DPM-Solver++(2M) SDE, dynamic CFG
and the sampling loop.

Oracles: diffusers 0.42.1 CogVideoXDDIMScheduler / CogVideoXDPMScheduler built from the checkpoints' scheduler
config (cogvideox.md §5.1), and CogVideoXPipeline itself run on a tiny random diffusers transformer (the loop:
noise draw order, CFG batch order, dynamic CFG, dtype casts). Errors are measured against the diffusers side.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import (CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline,
                       CogVideoXTransformer3DModel)

from backbones.cogvideox.samplers import (DEFAULT_SAMPLER, FPS, GUIDANCE_SCALE, HEIGHT, NUM_FRAMES, NUM_STEPS,
                                          WIDTH, CogVideoXDDIM, CogVideoXDPM, cogvideox_objective,
                                          dynamic_guidance_scale, initial_latents, make_cogvideox_sampler,
                                          sample_cogvideox)
from backbones.objectives.ddpm import alphas_cumprod
from tests.oracle import randomize_

# THUDM/CogVideoX-2b scheduler/scheduler_config.json (cogvideox.md §5.1); the 5B's differs in snr_shift_scale only
SCHEDULER_CONFIG = {"_class_name": "CogVideoXDDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                    "rescale_betas_zero_snr": True, "set_alpha_to_one": True, "timestep_spacing": "trailing",
                    "steps_offset": 0, "clip_sample": False, "clip_sample_range": 1.0, "sample_max_value": 1.0,
                    "trained_betas": None, "snr_shift_scale": 3.0}
SHIFT = {"2b": 3.0, "5b": 1.0, "5b-i2v": 1.0, "tiny": 3.0}
# ᾱ_t at t = 0, 250, 500, 750, 999 (cogvideox.md §5.1, [V:cogvideox_verify_results.json], diffusers 0.42.1)
ABAR_TABLE = {3.0: [0.997454, 0.389054, 0.095328, 0.010839, 0.0],
              1.0: [0.999150, 0.652457, 0.241019, 0.032799, 0.0]}
SHAPE = (2, 3, 4, 6, 8)  # [B, F, C, H, W]
# Measured with diffusers 0.42.1, torch 2.13 CPU: teacher-forced DDIM and DPM steps, DPM trajectories (5 and 50
# steps, noise included) and the tiny-pipeline loops (fp32 and bf16) all 0.0 (bit-identical); the toy-model loops
# against diffusers' schedulers <= 1.2e-6 absolute on values up to 2.8 (the hand loop's own arithmetic). bf16
# without the reference's coefficient rounding (samplers._scaled) was 1.6e-2..3.7e-2 off after 6 steps.
STEP_RTOL = 1e-6
TRAJ_ATOL = 1e-5
PIPELINE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def _schedulers(preset: str = "2b") -> tuple[CogVideoXDDIMScheduler, CogVideoXDPMScheduler]:
    cfg = dict(SCHEDULER_CONFIG, snr_shift_scale=SHIFT[preset])
    return CogVideoXDDIMScheduler.from_config(cfg), CogVideoXDPMScheduler.from_config(cfg)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth deterministic stand-in for the denoiser's v."""
    tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1))) / 1000
    return 0.5 * torch.tanh(x) * torch.cos(3 * tt) + 0.2 * x * tt + 0.1 * torch.sin(5 * tt)


# ---------------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("preset", ["2b", "5b", "5b-i2v", "tiny"])
def test_objective_matches_the_checkpoint_scheduler(preset):
    cfg = cogvideox_objective(preset)
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == \
        ("scaled_linear", 0.00085, 0.012, 1000)
    assert cfg.prediction == "v_prediction" and cfg.zero_terminal_snr and cfg.snr_shift == SHIFT[preset]
    ours = alphas_cumprod(cfg)
    for ref in _schedulers(preset):
        assert ref.alphas_cumprod.dtype == torch.float64
        assert torch.equal(ours, ref.alphas_cumprod)  # float64 recipe on both sides: bit-identical
    assert ours[999].item() == 0.0
    assert ours[[0, 250, 500, 750, 999]].tolist() == pytest.approx(ABAR_TABLE[SHIFT[preset]], abs=6e-7)
    cfg.snr_shift = 7.0  # a copy: the preset table is untouched
    assert cogvideox_objective(preset).snr_shift == SHIFT[preset]


def test_unknown_preset_and_sampler_kind():
    with pytest.raises(ValueError, match="'2B' is not one of '2b', '5b', '5b-i2v', 'tiny'"):
        cogvideox_objective("2B")
    with pytest.raises(ValueError, match="'euler' is not one of 'ddim', 'dpm'"):
        make_cogvideox_sampler("2b", "euler")  # type: ignore[arg-type]
    assert isinstance(make_cogvideox_sampler("2b"), CogVideoXDDIM)
    assert isinstance(make_cogvideox_sampler("5b"), CogVideoXDPM) and DEFAULT_SAMPLER["5b-i2v"] == "dpm"
    assert torch.equal(make_cogvideox_sampler("5b", "ddim").abar, alphas_cumprod(cogvideox_objective("5b")))


def test_pipeline_defaults():
    params = inspect.signature(CogVideoXPipeline.__call__).parameters
    assert params["num_inference_steps"].default == NUM_STEPS == 50
    assert params["guidance_scale"].default == GUIDANCE_SCALE == 6.0
    assert params["use_dynamic_cfg"].default is False
    assert (NUM_FRAMES, HEIGHT, WIDTH, FPS) == (49, 480, 720, 8)
    z = initial_latents(1, generator=_gen(0))
    assert z.shape == (1, 13, 16, 60, 90) and z.dtype == torch.float32
    assert torch.equal(z, torch.randn(1, 13, 16, 60, 90, generator=_gen(0)))
    with pytest.raises(ValueError, match="multiples of 8"):
        initial_latents(1, height=484)


# ---------------------------------------------------------------------------------- grids

@pytest.mark.parametrize("steps", [50, 25, 7, 1])
def test_timesteps_match_diffusers(steps):
    expected = {50: list(range(999, 0, -20)), 25: list(range(999, 0, -40))}
    for ref in _schedulers():
        ref.set_timesteps(steps)
        for ours in (make_cogvideox_sampler("2b", "ddim"), make_cogvideox_sampler("2b", "dpm")):
            ours.set_timesteps(steps)
            assert ours.timesteps.dtype == torch.float32
            assert ours.timesteps.long().tolist() == ref.timesteps.tolist()
            if steps in expected:
                assert ours.timesteps.long().tolist() == expected[steps]


# ---------------------------------------------------------------------------------- DDIM

@pytest.mark.parametrize("steps", [50, 7])
@pytest.mark.parametrize("preset", ["2b", "5b"])
def test_ddim_step_matches_diffusers(preset, steps):
    """Teacher-forced: the same x_t and v at every grid step, fresh random inputs each step."""
    ref = _schedulers(preset)[0]
    ours = make_cogvideox_sampler(preset, "ddim")
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    g = _gen(1)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        x, v = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        mine = ours.step(v, ours.timesteps[i], x)
        prev, x0 = ref.step(v, t, x, return_dict=False)
        worst = max(worst, _rel(mine, prev))
    assert worst <= STEP_RTOL, worst
    # the last step lands on x̂0 (ᾱ_prev = 1, set_alpha_to_one) when its t − 1000//N < 0: 19 − 20 for N = 50;
    # for N = 7 it is 142 − 142 = 0, so diffusers' fixed stride ends on ᾱ_0 instead (cogvideox.md §5.4)
    assert ours.final_alpha_bar == 1.0
    assert (_rel(mine, x0) <= STEP_RTOL) == (steps == 50)


# ---------------------------------------------------------------------------------- DPM

@pytest.mark.parametrize("i", [0, 1, 2, 17, 48, 49])
@pytest.mark.parametrize("preset", ["2b", "5b"])
def test_dpm_step_with_history_matches_diffusers(preset, i):
    """diffusers' step signature with explicit history and noise: the same generator stream on both sides."""
    ref = _schedulers(preset)[1]
    ours = make_cogvideox_sampler(preset, "dpm")
    ref.set_timesteps(50)
    ours.set_timesteps(50)
    g = _gen(i)
    x, v, old = (torch.randn(SHAPE, generator=g) for _ in range(3))
    old = None if i == 0 else old
    t_ref, t_back_ref = ref.timesteps[i], (ref.timesteps[i - 1] if i else None)
    t, t_back = ours.timesteps[i], (ours.timesteps[i - 1] if i else None)
    g_ref, g_ours = _gen(100 + i), _gen(100 + i)
    prev_ref, x0_ref = ref.step(v, old, t_ref, t_back_ref, x, generator=g_ref, return_dict=False)
    prev, x0 = ours.step_with_history(v, old, t, t_back, x, generator=g_ours)
    assert _rel(x0, x0_ref) <= STEP_RTOL
    assert _rel(prev, prev_ref) <= STEP_RTOL, _rel(prev, prev_ref)
    assert torch.equal(g_ours.get_state(), g_ref.get_state())  # same number of draws (2 on second-order steps)
    assert torch.isfinite(prev).all()
    if i == 49:  # t' < 0: ᾱ' = 1, x' = x̂0 exactly
        assert torch.equal(prev, x0)


def _diffusers_dpm_loop(ref: CogVideoXDPMScheduler, noise: torch.Tensor, steps: int, generator) -> list[torch.Tensor]:
    """CogVideoXPipeline's DPM branch, model = _fake_model, no guidance."""
    ref.set_timesteps(steps)
    x, old, out = noise.clone(), None, []
    for i, t in enumerate(ref.timesteps):
        v = _fake_model(x, t.float().expand(x.shape[0]))
        x, old = ref.step(v, old, t, ref.timesteps[i - 1] if i > 0 else None, x, generator=generator,
                          return_dict=False)
        out.append(x)
    return out


@pytest.mark.parametrize("steps", [5, 50])
@pytest.mark.parametrize("preset", ["2b", "5b"])
def test_dpm_trajectory_matches_diffusers_with_the_same_seed(preset, steps):
    noise = torch.randn(SHAPE, generator=_gen(3))
    ref_traj = _diffusers_dpm_loop(_schedulers(preset)[1], noise, steps, _gen(42))
    ours = make_cogvideox_sampler(preset, "dpm")
    traj: list[torch.Tensor] = []
    g = _gen(42)
    ours.set_timesteps(steps)
    x = noise.clone()
    for t in ours.timesteps:
        x = ours.step(_fake_model(x, t.expand(x.shape[0])), t, x, generator=g)
        traj.append(x)
    assert len(traj) == len(ref_traj) == steps
    err = max((a - b).abs().max().item() for a, b in zip(traj, ref_traj))
    assert err <= TRAJ_ATOL, err
    # the noise matters: another seed moves the result by O(1)
    other = _diffusers_dpm_loop(_schedulers(preset)[1], noise, steps, _gen(43))
    assert (other[-2] - ref_traj[-2]).abs().max() > 0.1


def test_dpm_per_sample_generators():
    """Sample b's noise comes from generators[b] alone: batched = one at a time = diffusers with the list."""
    noise = torch.randn(SHAPE, generator=_gen(3))
    ref_traj = _diffusers_dpm_loop(_schedulers()[1], noise, 5, [_gen(10), _gen(11)])

    def run(x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        s = make_cogvideox_sampler("2b", "dpm")
        return sample_cogvideox(_fake_model, x, s, steps=5, guidance=1.0, generator=gens)

    both = run(noise, [_gen(10), _gen(11)])
    assert (both - ref_traj[-1]).abs().max() <= TRAJ_ATOL
    for b in range(2):
        alone = run(noise[b:b + 1], [_gen(10 + b)])
        assert (alone - both[b:b + 1]).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        run(noise, [_gen(0), _gen(1), _gen(2)])


def test_dpm_errors():
    s = make_cogvideox_sampler("2b", "dpm")
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step_with_history(x, None, 999, None, x)
    s.set_timesteps(50)
    with pytest.raises(ValueError, match="expects timestep 999, got 979"):
        s.step(x, 979, x)
    with pytest.raises(ValueError, match="needs t_back"):
        s.step_with_history(x, x, 979, None, x)
    with pytest.raises(ValueError, match=r"t=979.5"):
        s.step_with_history(x, None, 979.5, None, x)


# ---------------------------------------------------------------------------------- dynamic CFG and the loop

def test_dynamic_guidance_is_the_timestep_value_form():
    w, n = 6.0, 50
    for t in (999, 979, 519, 19):
        r = (n - t) / n
        assert dynamic_guidance_scale(w, t, n) == pytest.approx(1 + w * math.sin(math.pi * r ** 5 / 2) ** 2, rel=1e-12)
    g = [dynamic_guidance_scale(w, t, n) for t in range(999, 0, -20)]
    assert all(1 <= x <= 1 + w for x in g)
    assert max(abs(a - b) for a, b in zip(g, g[1:])) > 1.0  # wave-like, not a smooth ramp
    # a step-index form ((N − i)/N) would start at 1 + w·(1 − cos π)/2 = 1 + w
    assert dynamic_guidance_scale(w, 0, n) == pytest.approx(1 + w)
    assert dynamic_guidance_scale(w, 999, n) != pytest.approx(1 + w)


class _ToyModel:
    """Linear in x and t; for a doubled batch the first half (uncond) and second half (cond) differ."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        tt = t.float().reshape(-1, *([1] * (x.ndim - 1))) / 1000
        v_cond = 0.8 * x + 0.3 * tt + 0.05
        if x.shape[0] == 2 * SHAPE[0]:
            v_uncond = 0.9 * x - 0.2 * tt
            return torch.cat([v_uncond[:SHAPE[0]], v_cond[SHAPE[0]:]])
        return v_cond


def _hand_loop(kind: str, noise: torch.Tensor, steps: int, w: float, dynamic: bool, seed: int) -> torch.Tensor:
    """The pipeline's loop written out on diffusers' schedulers, model pieces computed directly."""
    ddim, dpm = _schedulers()
    ref = ddim if kind == "ddim" else dpm
    ref.set_timesteps(steps)
    g, x, old = _gen(seed), noise.clone(), None
    for i, t in enumerate(ref.timesteps):
        tt = t.item() / 1000
        v_c = 0.8 * x + 0.3 * tt + 0.05
        if w > 1:
            v_u = 0.9 * x - 0.2 * tt
            gs = 1 + w * (1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2 if dynamic else w
            v = v_u + gs * (v_c - v_u)
        else:
            v = v_c
        if kind == "ddim":
            x = ref.step(v, t, x, return_dict=False)[0]
        else:
            x, old = ref.step(v, old, t, ref.timesteps[i - 1] if i else None, x, generator=g, return_dict=False)
    return x


@pytest.mark.parametrize("guidance", [6.0, 1.0])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_loop_matches_hand_computation(kind, dynamic, guidance):
    noise = torch.randn(SHAPE, generator=_gen(5))
    model = _ToyModel()
    seen: list[float] = []
    out = sample_cogvideox(model, noise, make_cogvideox_sampler("2b", kind), steps=10, guidance=guidance,
                           dynamic_cfg=dynamic, generator=_gen(9), callback=lambda i, t, x: seen.append(t[0].item()))
    ref = _hand_loop(kind, noise, 10, guidance, dynamic, 9)
    assert (out - ref).abs().max() <= TRAJ_ATOL, (out - ref).abs().max()
    assert seen == list(range(999, 0, -100))
    assert model.batches == [2 * SHAPE[0] if guidance > 1 else SHAPE[0]] * 10
    if guidance > 1:  # guidance changes the answer, and so does its dynamic form
        plain = _hand_loop(kind, noise, 10, guidance, not dynamic, 9)
        assert (plain - ref).abs().max() > 1e-2


def test_loop_rejects_a_model_that_ignores_the_doubled_batch():
    with pytest.raises(ValueError, match=r"\[v_uncond; v_cond\]"):
        sample_cogvideox(lambda x, t: x[: x.shape[0] // 2], torch.zeros(SHAPE), make_cogvideox_sampler("2b"),
                         steps=2, guidance=6.0)


def _tiny_pipeline(kind: str, preset: str) -> CogVideoXPipeline:
    tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                     time_embed_dim=8, text_embed_dim=8, num_layers=1, sample_width=6,
                                     sample_height=4, sample_frames=5, max_text_seq_length=3)
    randomize_(tr, 0)
    ddim, dpm = _schedulers(preset)
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr.eval(),
                             scheduler=ddim if kind == "ddim" else dpm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("kind, preset", [("ddim", "2b"), ("dpm", "5b")])
def test_loop_matches_the_cogvideox_pipeline(kind, preset, dynamic, dtype):
    """diffusers' own __call__ (latent output) against initial_latents + sample_cogvideox on the same
    transformer and seed: noise order, CFG order and scale, the DPM history and noise, the casts (in bf16 the
    pipeline keeps latents and draws noise in the prompt dtype; CFG stays fp32)."""
    pipe = _tiny_pipeline(kind, preset)
    pipe.transformer.to(dtype)
    pos, neg = torch.randn(2, 2, 3, 8, generator=_gen(7)).to(dtype).unbind(0)  # [B=2, 3 tokens, 8]
    steps, size = 6, dict(num_frames=5, height=32, width=48)
    with torch.no_grad():
        ref = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=6.0,
                   use_dynamic_cfg=dynamic, generator=_gen(11), output_type="latent", return_dict=False)[0]

    ctx = torch.cat([neg, pos])

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return pipe.transformer(hidden_states=x, encoder_hidden_states=ctx, timestep=t, return_dict=False)[0]

    g = _gen(11)
    z = initial_latents(2, generator=g, channels=4, dtype=dtype, **size)
    assert z.shape == (2, 2, 4, 4, 6)
    with torch.no_grad():
        ours = sample_cogvideox(model_fn, z, make_cogvideox_sampler(preset, kind), steps=steps, guidance=6.0,
                                dynamic_cfg=dynamic, generator=g)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == dtype
    assert _rel(ours, ref) <= PIPELINE_RTOL[dtype], _rel(ours, ref)
