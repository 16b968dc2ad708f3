"""CogVideoX inference: the noise schedule of each preset, the two samplers of the reference pipelines
(CogVideoXDDIMScheduler and the stochastic DPM-Solver++(2M) SDE CogVideoXDPMScheduler) and the sampling loop
with classifier-free guidance, plain or "dynamic" (cogvideox.md §5.1, §5.4).

Schedule (`cogvideox_objective`): scaled-linear β 0.00085..0.012 over T = 1000 steps, SNR shift (2B: 3.0,
5B / 5B-I2V: 1.0), then the zero-terminal-SNR rescale, so ᾱ_999 = 0; the model predicts v. Both samplers walk
the trailing grid round(arange(T, 0, −T/N)) − 1 (999, 979, ..., 19 for N = 50) with the previous timestep
t − T // N (diffusers' fixed stride; off the grid when N does not divide T), ᾱ = 1 where that is < 0 (so for
N = 7 the last step, 142 -> 0, ends on ᾱ_0, not on x̂0).

Shapes: B batch, F latent frames, C latent channels, H/W latent height/width (transformer layout [B, F, C, H, W];
the samplers work on any [B, ...]).

A *guided model function* (`sample_cogvideox`) is `model_fn(x, t) -> v` called once per step like the
pipeline calls its transformer: with guidance > 1 it gets x = [x; x] [2B, ...] and t [2B] and must return
[v_uncond; v_cond] (the pipeline's batch order: its conditioning is cat([negative, positive])); with
guidance <= 1 it gets x [B, ...] and returns v_cond. t is the grid timestep as float32.

Random draws: the DPM sampler draws its noise like diffusers' `randn_tensor` on the same generator, in the
same order (two draws on a second-order step, the first discarded, as upstream), in the latent's dtype on
the generator's device; so the same seed gives the same trajectory as the reference pipeline. A list of
generators draws sample b's noise from generators[b] alone, whatever batch it sits in.

Precision: guidance is fp32; each step coefficient is rounded to the dtype of the tensor it scales, as in
diffusers (its coefficients are 0-dim float64 tensors), so fp32 and bf16 latents both reproduce the reference
pipeline bit for bit on CPU (tests/backbones/cogvideox/test_samplers.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

from backbones.objectives.ddpm import DDPMObjectiveConfig, Prediction, alphas_cumprod
from backbones.objectives.ddpm_samplers import DDIMSampler, DDPMSampler, spaced_timesteps

__all__ = ["NUM_FRAMES", "HEIGHT", "WIDTH", "NUM_STEPS", "GUIDANCE_SCALE", "FPS", "LATENT_CHANNELS",
           "OBJECTIVE_PRESETS", "DEFAULT_SAMPLER", "cogvideox_objective", "CogVideoXDDIM", "CogVideoXDPM",
           "make_cogvideox_sampler", "dynamic_guidance_scale", "draw_noise", "initial_latents", "sample_cogvideox"]

GeneratorArg = torch.Generator | list[torch.Generator] | None
GuidedModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]

# Pipeline defaults: diffusers 0.42.1 CogVideoXPipeline.__call__ (height/width = transformer sample size × 8,
# num_frames = sample_frames, 50 steps, guidance_scale 6) and the 8 fps export of THUDM's README (cogvideox.md §5.4)
NUM_FRAMES = 49
HEIGHT = 480
WIDTH = 720
NUM_STEPS = 50
GUIDANCE_SCALE = 6.0
FPS = 8
LATENT_CHANNELS = 16
VAE_SPATIAL = 8    # VAE downsampling: 8× in H and W, 4× in time (+1 causal first frame)
VAE_TEMPORAL = 4

# THUDM/CogVideoX-{2b,5b} scheduler/scheduler_config.json: only snr_shift_scale differs (3.0 / 1.0; cogvideox.md
# §0.2, §5.1); the 5B-I2V takes the 5B's. "tiny" (tests) is the 2B schedule, like its transformer preset.
OBJECTIVE_PRESETS: dict[str, DDPMObjectiveConfig] = {
    name: DDPMObjectiveConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, prediction="v_prediction", zero_terminal_snr=True,
                              snr_shift=shift)
    for name, shift in (("2b", 3.0), ("5b", 1.0), ("5b-i2v", 1.0), ("tiny", 3.0), ("tiny-i2v", 1.0))
}
# THUDM inference/cli_demo.py: "DDIM for 2B, DPM for 5B/5B-I2V"
DEFAULT_SAMPLER: dict[str, Literal["ddim", "dpm"]] = {"2b": "ddim", "5b": "dpm", "5b-i2v": "dpm", "tiny": "ddim",
                                                      "tiny-i2v": "dpm"}


def cogvideox_objective(preset: str) -> DDPMObjectiveConfig:
    """The DDPM objective (schedule + v-prediction) of a preset; a fresh copy the caller may change."""
    if preset not in OBJECTIVE_PRESETS:
        raise ValueError(f"CogVideoX preset {preset!r} is not one of {', '.join(map(repr, OBJECTIVE_PRESETS))}")
    return dataclasses.replace(OBJECTIVE_PRESETS[preset])


# --------------------------------------------------------------------------------------------
# Noise


def draw_noise(shape: tuple[int, ...], generator: GeneratorArg, device: torch.device, dtype: torch.dtype
               ) -> torch.Tensor:
    """N(0, I) [B, ...] drawn as diffusers' `randn_tensor`: on the generator's device then moved; a list of
    generators gives sample b a [1, ...] draw from generators[b] (a list of one acts as the generator)."""
    if isinstance(generator, list):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one generator or "
                             f"one per sample")
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    one = (1,) + tuple(shape[1:])
    return torch.cat([torch.randn(one, generator=g, device=g.device, dtype=dtype).to(device) for g in generator])


def initial_latents(batch: int = 1, num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH,
                    generator: GeneratorArg = None, *, channels: int = LATENT_CHANNELS,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The pipeline's starting noise [B, (num_frames − 1)//4 + 1, C, height/8, width/8] (init_noise_sigma 1),
    the generator's first draw; pass the same generator on to `sample_cogvideox` to continue its stream.
    49 × 480 × 720 gives [B, 13, 16, 60, 90]."""
    if height % VAE_SPATIAL or width % VAE_SPATIAL or height <= 0 or width <= 0:
        raise ValueError(f"height={height}, width={width} must be positive multiples of {VAE_SPATIAL} (the VAE's "
                         f"spatial factor), e.g. {HEIGHT} x {WIDTH}")
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1; 4k + 1 frames ({NUM_FRAMES}) round-trip the VAE")
    shape = (batch, (num_frames - 1) // VAE_TEMPORAL + 1, channels, height // VAE_SPATIAL, width // VAE_SPATIAL)
    return draw_noise(shape, generator, torch.device(device), dtype)


# --------------------------------------------------------------------------------------------
# Samplers


def _grid_timestep(t: float | torch.Tensor, T: int, name: str = "t") -> int:
    v = float(t)
    if v != round(v) or not 0 <= v < T:
        raise ValueError(f"{name}={v:g}: timesteps are integers in [0, {T - 1}]")
    return int(v)


def _scaled(c: float, x: torch.Tensor) -> torch.Tensor:
    """c·x with c first rounded to x's dtype, as diffusers' 0-dim float64 coefficient tensors are (PyTorch casts
    them to the tensor's dtype; a Python float would stay fp32 inside a bf16 op), so bf16 latents round like
    the reference pipeline's; a no-op for fp32."""
    return x * torch.tensor(c, dtype=torch.float64).to(x.dtype).item()


def _x0(prediction: Prediction, a: float, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x̂0 = √ᾱ·x − √(1 − ᾱ)·v̂ or (x − √(1 − ᾱ)·ε̂)/√ᾱ."""
    if prediction == "epsilon":
        return (x - _scaled(math.sqrt(1 - a), pred)) / math.sqrt(a)
    return _scaled(math.sqrt(a), x) - _scaled(math.sqrt(1 - a), pred)


class CogVideoXDDIM(DDIMSampler):
    """CogVideoXDDIMScheduler as the checkpoints configure it: deterministic DDIM (η = 0) on the trailing grid,
    steps_offset 0, set_alpha_to_one (DDIMSampler's grid, stride and final ᾱ). The step is written as diffusers
    writes it, x' = a·x_t + b·x̂0 with a = √((1 − ᾱ')/(1 − ᾱ)), b = √ᾱ' − √ᾱ·a: the same map as DDIMSampler's
    √ᾱ'·x̂0 + √(1 − ᾱ')·ε̂, but with the reference's roundings (see `_scaled`)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: Prediction = "v_prediction") -> None:
        super().__init__(alphas_cumprod, prediction, spacing="trailing", steps_offset=0, set_alpha_to_one=True)

    def step(self, pred: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor,
             generator: GeneratorArg = None) -> torch.Tensor:
        """x_t [B, ...] and the model output at timestep t -> x_{t − T//N}; draws nothing (generator is accepted
        so both CogVideoX samplers share one loop)."""
        if not len(self.timesteps):
            raise ValueError("call set_timesteps(num_steps) before step()")
        t_int = _grid_timestep(t, self.T)
        prev = t_int - self._stride
        a = float(self.abar[t_int])
        a_prev = float(self.abar[prev]) if prev >= 0 else self.final_alpha_bar
        x0 = _x0(self.prediction, a, pred, x)
        ca = math.sqrt((1 - a_prev) / (1 - a))
        cb = math.sqrt(a_prev) - math.sqrt(a) * ca
        self._i += 1
        return _scaled(ca, x) + _scaled(cb, x0)


def _half_log_snr(a: float) -> float:
    """λ = log √(ᾱ/(1 − ᾱ)), ±∞ at ᾱ = 0 / 1 (the zero-SNR start and the final ᾱ = 1)."""
    if a <= 0.0:
        return -math.inf
    if a >= 1.0:
        return math.inf
    return 0.5 * (math.log(a) - math.log1p(-a))


class CogVideoXDPM(DDPMSampler):
    """CogVideoXDPMScheduler (diffusers' port of SAT's VPSDEDPMPP2MSampler): stochastic DPM-Solver++(2M) SDE,
    same schedule and grid as DDIM. With λ = log √(ᾱ/(1 − ᾱ)) and h = λ' − λ (primes: the previous timestep
    t − T//N),

        x' = m1·x − m2·D + σ_n·z,   m1 = √((1 − ᾱ')/(1 − ᾱ))·e^−h,  m2 = (e^−2h − 1)·√ᾱ',
                                    σ_n = √(1 − ᾱ')·√(1 − e^−2h),    z ~ N(0, I),

    D = x̂0 on the first step (no history) and the last (t' < 0: ᾱ' = 1, so x' = x̂0 exactly, the noise
    weighted by 0), else D = (1 + k)·x̂0 − k·x̂0_old with k = 1/(2r), r = (λ − λ_back)/h, t_back the loop's
    previous (larger) timestep. From ᾱ_999 = 0 (λ = −∞) the first step is x' = √ᾱ'·x̂0 + √(1 − ᾱ')·z and the
    second has r = ∞, k = 0: D = x̂0 again."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: Prediction = "v_prediction") -> None:
        super().__init__(alphas_cumprod, prediction, spacing="trailing", steps_offset=0)
        self._stride = 0
        self._old_x0: torch.Tensor | None = None

    def set_timesteps(self, num_steps: int) -> None:
        ts = spaced_timesteps(num_steps, self.T, self.spacing, self.steps_offset, variant="ddim")
        if self.prediction == "epsilon" and float(self.abar[int(ts[0])]) == 0.0:
            raise ValueError(f"an epsilon model cannot be sampled from ᾱ = 0 (timestep {int(ts[0])}, zero terminal "
                             f"SNR): use a v_prediction model")
        self.timesteps = torch.from_numpy(ts).float()
        self._stride = self.T // num_steps
        self._i = 0
        self._old_x0 = None

    def step_with_history(self, pred: torch.Tensor, old_x0: torch.Tensor | None, t: float | torch.Tensor,
                          t_back: float | torch.Tensor | None, x: torch.Tensor, generator: GeneratorArg = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """One solver step with the history passed in (diffusers' `step(model_output, old_pred_original_sample,
        timestep, timestep_back, sample, generator=...)`): returns (x' [B, ...], x̂0 [B, ...]), x̂0 to be
        passed back as old_x0 next step. Draws one noise, or two when second-order (the first unused)."""
        if not self._stride:
            raise ValueError("call set_timesteps(num_steps) before step()")
        t_int = _grid_timestep(t, self.T)
        t_back_int = None if t_back is None else _grid_timestep(t_back, self.T, "t_back")
        if old_x0 is not None and t_back_int is None:
            raise ValueError("a second-order step needs t_back (the previous step's timestep) with old_x0")
        prev = t_int - self._stride
        a = float(self.abar[t_int])
        a_prev = float(self.abar[prev]) if prev >= 0 else 1.0   # set_alpha_to_one
        x0 = _x0(self.prediction, a, pred, x)

        lam, lam_prev = _half_log_snr(a), _half_log_snr(a_prev)
        h = lam_prev - lam
        e2 = math.exp(-2 * h)
        m1 = math.sqrt((1 - a_prev) / (1 - a)) * math.exp(-h)
        m2 = math.expm1(-2 * h) * math.sqrt(a_prev)
        sigma_n = math.sqrt(1 - a_prev) * math.sqrt(1 - e2)

        noise = draw_noise(tuple(x.shape), generator, x.device, x.dtype)
        if old_x0 is None or prev < 0:
            return _scaled(m1, x) - _scaled(m2, x0) + _scaled(sigma_n, noise), x0
        h_last = lam - _half_log_snr(float(self.abar[t_back_int]))
        k = 0.0 if math.isinf(h_last) else h / (2 * h_last)    # 1/(2r); r = ∞ after the zero-SNR first step
        d = _scaled(1 + k, x0) - _scaled(k, old_x0)
        noise = draw_noise(tuple(x.shape), generator, x.device, x.dtype)  # upstream draws again here
        return _scaled(m1, x) - _scaled(m2, d) + _scaled(sigma_n, noise), x0

    def step(self, pred: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor,
             generator: GeneratorArg = None) -> torch.Tensor:
        """x_t [B, ...] and the model output at grid timestep t (in order) -> x', keeping x̂0 and t for the
        next step's history as the pipeline does."""
        i = self._advance(t)
        t_back = self.timesteps[i - 1] if i > 0 else None
        x_prev, self._old_x0 = self.step_with_history(pred, self._old_x0, t, t_back, x, generator)
        return x_prev


def make_cogvideox_sampler(preset: str, kind: Literal["ddim", "dpm"] | None = None) -> CogVideoXDDIM | CogVideoXDPM:
    """The sampler for a preset on its schedule; kind None takes THUDM's choice (DEFAULT_SAMPLER)."""
    kind = DEFAULT_SAMPLER.get(preset, "ddim") if kind is None else kind
    classes = {"ddim": CogVideoXDDIM, "dpm": CogVideoXDPM}
    if kind not in classes:
        raise ValueError(f"CogVideoX sampler {kind!r} is not one of 'ddim', 'dpm'")
    cfg = cogvideox_objective(preset)
    return classes[kind](alphas_cumprod(cfg), cfg.prediction)


# --------------------------------------------------------------------------------------------
# Guidance and the loop


def dynamic_guidance_scale(scale: float, t: float | torch.Tensor, num_steps: int) -> float:
    """g = 1 + w·(1 − cos(π·((N − t)/N)^5))/2 with t the timestep *value* (999 ... 19), not the step index,
    as CogVideoXPipeline and SAT's DynamicCFG compute it: ((N − t)/N)^5 is large and negative, so g jumps
    around [1, 1 + w] ("wave-like", intended by THUDM; cogvideox.md §5.4)."""
    ratio = (num_steps - float(t)) / num_steps
    return 1 + scale * (1 - math.cos(math.pi * ratio ** 5.0)) / 2


def sample_cogvideox(model_fn: GuidedModelFn, latents: torch.Tensor, sampler: CogVideoXDDIM | CogVideoXDPM,
                     steps: int = NUM_STEPS, guidance: float = GUIDANCE_SCALE, dynamic_cfg: bool = False,
                     generator: GeneratorArg = None, callback: StepCallback | None = None,
                     progress: bool = False) -> torch.Tensor:
    """CogVideoXPipeline's denoising loop from `latents` [B, ...] (unit noise, e.g. `initial_latents`) to
    clean latents in latents.dtype. Guidance (guidance > 1, the batch-doubled call described above) is applied
    in fp32: v = v_u + g·(v_c − v_u), g = guidance or, with dynamic_cfg, `dynamic_guidance_scale`. The latent
    is cast back to latents.dtype after every step (the pipeline keeps it in the prompt-embedding dtype).
    generator feeds the DPM sampler's noise; callback(i, t [B], x) runs after step i."""
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance={guidance} must be a finite number >= 0 (6.0 is the default; <= 1 turns "
                         f"classifier-free guidance off)")
    do_cfg = guidance > 1.0
    sampler.set_timesteps(steps)
    x = latents * sampler.init_noise_sigma
    B = x.shape[0]
    timesteps = sampler.timesteps.to(x.device)
    for i in tqdm(range(len(timesteps)), disable=not progress, desc="sampling"):
        t = timesteps[i]
        inp = torch.cat([x, x]) if do_cfg else x
        out = model_fn(inp, t.expand(inp.shape[0])).float()
        if out.shape != inp.shape:
            raise ValueError(f"model_fn returned {tuple(out.shape)} for an input {tuple(inp.shape)}; with "
                             f"guidance > 1 it must return [v_uncond; v_cond] for the doubled batch")
        if do_cfg:
            g = dynamic_guidance_scale(guidance, t, steps) if dynamic_cfg else guidance
            v_uncond, v_cond = out.chunk(2)
            v = v_uncond + g * (v_cond - v_uncond)
        else:
            v = out
        x = sampler.step(v, t, x, generator=generator).to(latents.dtype)
        if callback is not None:
            callback(i, t.expand(B), x)
    return x
