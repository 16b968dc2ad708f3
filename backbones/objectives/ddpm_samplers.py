"""Samplers for DDPM-trained (ε- or v-prediction) models: DDIM (η = 0), Euler and DPM-Solver++ 2M, with the
timestep grids and step rules of diffusers' DDIMScheduler / CogVideoXDDIMScheduler, EulerDiscreteScheduler and
DPMSolverMultistepScheduler, so a LoRA trained here samples like it does in the reference pipelines.

Noise levels: ᾱ_t from `ddpm.alphas_cumprod`; DDIM walks ᾱ directly; Euler and DPM walk the VE level
σ_t = √((1 − ᾱ_t)/ᾱ_t) (x_σ = x_t/√ᾱ_t = x0 + σ·ε), interpolated at the grid timesteps and ending at σ = 0.
DPM uses the VP pair α = 1/√(σ² + 1), s = σ·α and λ = log(α/s).

A *model function* is `model_fn(x [B, ...] float32, t [B] float32) -> ε̂ or v̂ [B, ...]` (per the sampler's
`prediction`), where t is the grid timestep (integer-valued for DDIM/DPM, fractional for Euler with linspace
spacing) and x is already scaled (`scale_model_input`: Euler divides by √(σ² + 1)). Classifier-free guidance
is `cfg_model` (flow's: uncond + s·(cond − uncond) is the same on ε or v, as in the SD and CogVideoX pipelines).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .ddpm import PREDICTIONS, DDPMObjectiveConfig, Prediction, alphas_cumprod
from .flow import ModelFn, StepCallback, cfg_model

__all__ = ["DDIM_PRESETS", "DDIMSampler", "DDPMSampler", "DPMSolverPP2MSampler", "EulerSampler", "cfg_model",
           "make_sampler", "spaced_timesteps"]

Spacing = Literal["leading", "linspace", "trailing"]
SPACINGS = ("leading", "linspace", "trailing")

# DDIM settings each family's scheduler config gives (DDIMScheduler.from_config of the model folder; clip_sample
# is False in all three and not implemented):
#   sd15: runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (steps_offset 1, set_alpha_to_one false;
#         leading is the DDIM default the json leaves in place), confirmed with diffusers 0.42.1;
#   animatediff: AnimateDiff configs/inference/inference-v2.yaml (steps_offset 1, no set_alpha_to_one, so the
#         DDIMScheduler default True) and SWIFT's DDIMScheduler(...) (animatediff-sd15.md §4.3);
#   cogvideox: THUDM/CogVideoX-2b scheduler_config.json (trailing, steps_offset 0, set_alpha_to_one true).
DDIM_PRESETS: dict[str, dict[str, object]] = {
    "sd15": {"spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False},
    "animatediff": {"spacing": "leading", "steps_offset": 1, "set_alpha_to_one": True},
    "cogvideox": {"spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True},
}

# σ-based samplers cannot start at ᾱ = 0 (σ = ∞); diffusers' zero-SNR Euler/DPM put ᾱ_{T−1} at the smallest
# positive fp16 subnormal instead (σ_max ≈ 4096), and so do we
ZERO_SNR_ALPHA_BAR = 2.0 ** -24


def spaced_timesteps(num_steps: int, num_train_timesteps: int, spacing: Spacing, steps_offset: int = 0, *,
                     variant: Literal["ddim", "euler", "dpm"] = "ddim") -> np.ndarray:
    """The N-step timestep grid, descending, float64 [N], exactly as the diffusers scheduler family builds it
    (numpy arithmetic kept, since rounding at .5 depends on it):

      linspace  ddim: round(linspace(0, T−1, N)); euler: the same unrounded (float32); dpm: round(linspace(0,
                T−1, N+1)) without its 0
      leading   ddim/euler: arange(N)·(T // N) + steps_offset; dpm: arange(N+1)·(T // (N+1)) without 0, + offset
      trailing  round(arange(T, 0, −T/N)) − 1 (all three)
    """
    T, N = num_train_timesteps, num_steps
    if isinstance(N, bool) or not isinstance(N, int) or not 1 <= N <= T:
        raise ValueError(f"num_steps={N!r} must be an integer in [1, {T}]")
    if spacing not in SPACINGS:
        raise ValueError(f"timestep spacing {spacing!r} is not one of 'leading', 'linspace', 'trailing'")
    if steps_offset < 0:
        raise ValueError(f"steps_offset={steps_offset} must be >= 0 (1 for SD1.5 and AnimateDiff, 0 for CogVideoX)")
    if spacing == "linspace":
        if variant == "dpm":
            ts = np.linspace(0, T - 1, N + 1).round()[::-1][:-1]
        elif variant == "euler":
            ts = np.linspace(0, T - 1, N, dtype=np.float32)[::-1].astype(np.float64)
        else:
            ts = np.linspace(0, T - 1, N).round()[::-1]
    elif spacing == "leading":
        if variant == "dpm":
            ts = (np.arange(0, N + 1) * (T // (N + 1))).round()[::-1][:-1] + steps_offset
        else:
            ts = (np.arange(0, N) * (T // N)).round()[::-1] + steps_offset
    else:
        # numpy's float arange yields an (N+1)-th point ≈ 0 (timestep −1) for some N (61, 103, ...): diffusers
        # then indexes ᾱ[−1]; the first N points are its grid everywhere else
        ts = (np.round(np.arange(T, 0, -T / N)) - 1)[:N]
    ts = np.array(ts, dtype=np.float64)  # a copy: reversed views have negative strides torch cannot wrap
    if ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"{spacing} spacing with num_steps={N}, steps_offset={steps_offset} gives timesteps "
                         f"outside [0, {T - 1}] ({ts.max():g}); use fewer steps or steps_offset=0")
    return ts


def _check_abar(abar: torch.Tensor) -> torch.Tensor:
    if abar.ndim != 1 or len(abar) < 2 or not abar.dtype.is_floating_point:
        raise ValueError(f"alphas_cumprod must be a float tensor [T], T >= 2, got {abar.dtype} {tuple(abar.shape)}")
    abar = abar.detach().double().cpu()
    if not (abar[-1] >= 0 and abar[0] <= 1 and (abar[1:] <= abar[:-1]).all()):
        raise ValueError("alphas_cumprod must decrease within [0, 1]; build it with ddpm.alphas_cumprod(cfg)")
    return abar


class DDPMSampler:
    """Base: `set_timesteps(N)` fills `timesteps` [N] (float32, what the model sees); `step(pred, t, x)` maps
    the model output at grid timestep t and the latent x to the next latent; `sample` runs the loop."""

    timesteps: torch.Tensor
    init_noise_sigma: float = 1.0

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: Prediction, spacing: Spacing,
                 steps_offset: int) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction {prediction!r} is not one of 'epsilon', 'v_prediction'")
        if spacing not in SPACINGS:
            raise ValueError(f"timestep spacing {spacing!r} is not one of 'leading', 'linspace', 'trailing'")
        self.abar = _check_abar(alphas_cumprod)
        self.T = len(self.abar)
        self.prediction = prediction
        self.spacing = spacing
        self.steps_offset = steps_offset
        self.timesteps = torch.empty(0)
        self._i = 0

    def set_timesteps(self, num_steps: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def step(self, pred: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _advance(self, t: float | torch.Tensor) -> int:
        """Index of the current step; t must be its grid timestep (catches a loop out of sync)."""
        i = self._i
        if i >= len(self.timesteps):
            raise ValueError(f"step {i} is past the {len(self.timesteps)}-step schedule; call set_timesteps again")
        if float(t) != float(self.timesteps[i]):
            raise ValueError(f"step {i} expects timestep {float(self.timesteps[i]):g}, got {float(t):g}; pass "
                             f"the sampler's timesteps in order")
        self._i += 1
        return i

    def sample(self, model_fn: ModelFn, noise: torch.Tensor, steps: int, *, callback: StepCallback | None = None,
               progress: bool = False) -> torch.Tensor:
        """Integrate from unit Gaussian `noise` [B, ...] (scaled here by `init_noise_sigma`, as diffusers'
        prepare_latents does) to data; returns float32. Wrap model_fn with `cfg_model` for guidance.
        callback(i, t [B], x) runs after step i with the new latent."""
        self.set_timesteps(steps)
        x = noise.float() * self.init_noise_sigma
        timesteps = self.timesteps.to(x.device)
        for i in tqdm(range(len(timesteps)), disable=not progress, desc="sampling"):
            t = timesteps[i].expand(x.shape[0])
            pred = model_fn(self.scale_model_input(x), t)
            x = self.step(pred.float(), timesteps[i], x)
            if callback is not None:
                callback(i, t, x)
        return x


class DDIMSampler(DDPMSampler):
    """Deterministic DDIM (η = 0): x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev)·ε̂.

    Like diffusers (DDIMScheduler and CogVideoXDDIMScheduler alike) the previous timestep is t − T // N
    whatever the spacing: the next grid point for leading and for trailing when N divides T, slightly off for
    linspace. After the last step ᾱ_prev is 1 (`set_alpha_to_one`) or ᾱ_0. Defaults are SD1.5's; see
    DDIM_PRESETS. CogVideoXDDIMScheduler's step (a·x_t + b·x̂0) is this same update written differently.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: Prediction = "epsilon",
                 spacing: Spacing = "leading", steps_offset: int = 1, set_alpha_to_one: bool = False) -> None:
        super().__init__(alphas_cumprod, prediction, spacing, steps_offset)
        self.final_alpha_bar = 1.0 if set_alpha_to_one else float(self.abar[0])

    def set_timesteps(self, num_steps: int) -> None:
        ts = spaced_timesteps(num_steps, self.T, self.spacing, self.steps_offset, variant="ddim")
        if self.prediction == "epsilon" and float(self.abar[int(ts[0])]) == 0.0:
            raise ValueError(f"an epsilon model cannot be sampled from ᾱ = 0 (timestep {int(ts[0])}, zero terminal "
                             f"SNR): use a v_prediction model or another spacing")
        self.timesteps = torch.from_numpy(ts).float()
        self._stride = self.T // num_steps
        self._i = 0

    def step(self, pred: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not len(self.timesteps):
            raise ValueError("call set_timesteps(num_steps) before step()")
        t_val = float(t)
        if t_val != round(t_val) or not 0 <= t_val < self.T:
            raise ValueError(f"DDIM timesteps are integers in [0, {self.T - 1}], got {t_val:g}")
        t_int = int(t_val)
        prev = t_int - self._stride
        a = float(self.abar[t_int])
        a_prev = float(self.abar[prev]) if prev >= 0 else self.final_alpha_bar
        sa, s1 = math.sqrt(a), math.sqrt(1 - a)
        if self.prediction == "epsilon":
            eps = pred
            x0 = (x - s1 * pred) / sa
        else:
            x0 = sa * x - s1 * pred
            eps = sa * pred + s1 * x
        self._i += 1
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


class _SigmaSampler(DDPMSampler):
    """Shared by Euler and DPM: the VE σ grid [N+1] (float32, last 0) interpolated at the timesteps."""

    sigmas: torch.Tensor
    _variant: Literal["euler", "dpm"]

    def _fill(self, num_steps: int) -> np.ndarray:
        ts = spaced_timesteps(num_steps, self.T, self.spacing, self.steps_offset, variant=self._variant)
        abar = self.abar.clone()
        if abar[-1] == 0:
            abar[-1] = ZERO_SNR_ALPHA_BAR
        base = ((1 - abar) / abar).sqrt().numpy()
        sig = np.interp(ts, np.arange(self.T), base)
        self.sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
        self._s = [float(s) for s in self.sigmas]
        self._i = 0
        return ts


class EulerSampler(_SigmaSampler):
    """EulerDiscreteScheduler (no churn): x_{i+1} = x_i + (σ_{i+1} − σ_i)·(x_i − x̂0)/σ_i in the VE latent.

    The model sees x/√(σ² + 1) and the (possibly fractional) grid timestep. The default "linspace" spacing is
    what EulerDiscreteScheduler.from_config gives for the SD1.5 folder (its json sets no spacing; checked with
    diffusers 0.42.1). init_noise_sigma is σ_max for linspace/trailing and √(σ_max² + 1) for leading."""

    _variant = "euler"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: Prediction = "epsilon",
                 spacing: Spacing = "linspace", steps_offset: int = 0) -> None:
        super().__init__(alphas_cumprod, prediction, spacing, steps_offset)

    def set_timesteps(self, num_steps: int) -> None:
        ts = self._fill(num_steps)
        self.timesteps = torch.from_numpy(ts).float()
        smax = max(self._s)
        self.init_noise_sigma = smax if self.spacing in ("linspace", "trailing") else math.sqrt(smax * smax + 1)

    def scale_model_input(self, x: torch.Tensor) -> torch.Tensor:
        s = self._s[self._i]
        return x / math.sqrt(s * s + 1)

    def step(self, pred: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = self._advance(t)
        s, s_next = self._s[i], self._s[i + 1]
        # x + (σ' − σ)·(x − x̂0)/σ with x̂0 substituted: the same update as diffusers, but without forming
        # x − x̂0 from two large float32 terms (from a zero-SNR start, σ = 4096, that cancels ~8 bits)
        if self.prediction == "epsilon":
            return x + (s_next - s) * pred
        c = 1.0 / (s * s + 1)
        return ((1 + s * s_next) * c) * x + ((s_next - s) * math.sqrt(c)) * pred


class DPMSolverPP2MSampler(_SigmaSampler):
    """DPM-Solver++ (2M, midpoint), DPMSolverMultistepScheduler's defaults: first step first-order (no history),
    then second-order multistep on x̂0; the last step, to σ = 0, is first-order and lands on x̂0 (diffusers'
    final_sigmas_type "zero" forces `lower_order_final` there for any N, not only for N < 15)."""

    _variant = "dpm"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: Prediction = "epsilon",
                 spacing: Spacing = "linspace", steps_offset: int = 0) -> None:
        super().__init__(alphas_cumprod, prediction, spacing, steps_offset)
        self._prev_x0: torch.Tensor | None = None

    def set_timesteps(self, num_steps: int) -> None:
        self.timesteps = torch.from_numpy(self._fill(num_steps)).float()
        self._prev_x0 = None

    @staticmethod
    def _vp(sigma: float) -> tuple[float, float, float]:
        """(α, s, λ) of a VE σ > 0."""
        alpha = 1.0 / math.sqrt(sigma * sigma + 1)
        s = sigma * alpha
        return alpha, s, math.log(alpha) - math.log(s)

    def step(self, pred: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = self._advance(t)
        a0, s0, lam0 = self._vp(self._s[i])
        x0 = (x - s0 * pred) / a0 if self.prediction == "epsilon" else a0 * x - s0 * pred
        prev_x0, self._prev_x0 = self._prev_x0, x0
        if self._s[i + 1] == 0.0:
            return x0  # λ = +∞: (s_t/s_0)·x → 0 and α_t → 1
        a_t, s_t, lam_t = self._vp(self._s[i + 1])
        h = lam_t - lam0
        phi = math.expm1(-h)  # e^{−h} − 1
        if prev_x0 is None:
            return (s_t / s0) * x - (a_t * phi) * x0
        _, _, lam1 = self._vp(self._s[i - 1])
        r0 = (lam0 - lam1) / h
        d1 = (x0 - prev_x0) * (1.0 / r0)
        return (s_t / s0) * x - (a_t * phi) * x0 - (0.5 * a_t * phi) * d1


def make_sampler(kind: Literal["ddim", "euler", "dpmpp_2m"], cfg: DDPMObjectiveConfig,
                 **options: object) -> DDPMSampler:
    """A sampler on cfg's schedule and prediction; options go to its constructor (spacing, steps_offset,
    set_alpha_to_one), e.g. make_sampler("ddim", cfg, **DDIM_PRESETS["cogvideox"])."""
    classes = {"ddim": DDIMSampler, "euler": EulerSampler, "dpmpp_2m": DPMSolverPP2MSampler}
    if kind not in classes:
        raise ValueError(f"sampler {kind!r} is not one of {', '.join(map(repr, classes))}")
    return classes[kind](alphas_cumprod(cfg), cfg.prediction, **options)
