"""Stable Video Diffusion's sampler: diffusers' EulerDiscreteScheduler as SVD's scheduler_config.json configures
it (svd-framer.md §4.2: v_prediction, use_karras_sigmas, sigma_min 0.002, sigma_max 700, timestep_type
continuous, timestep_spacing leading), and the img2vid pipeline's sampling loop (per-frame linear CFG ramp),
plus the pipeline's inference defaults and added-time ids (§4.4).

With continuous timesteps and v_prediction the DDPM betas of that config play no part: the grid is Karras
(ρ = 7) from σ_max to σ_min then 0, the UNet timestep is c_noise = ¼·ln σ, the input is x/√(σ² + 1), and the
step is deterministic Euler (s_churn 0) on D = c_skip·x + c_out·F with σ_data = 1 (`edm.denoised`).
`SVDDPMSolverSampler` is a drop-in alternative on the same grid and preconditioning: multistep DPM-Solver++
(diffusers' EDMDPMSolverMultistepScheduler). `svd_sampler(name)` builds either from its `SVD_SAMPLERS` name.

Shapes: latents [B, F, C, h, w] (frames before channels, as SVD's UNet takes them); N sampling steps.
A model function is `model_fn(x [B', F, C, h, w] float32 (already scaled), t [B'] float32 c_noise) -> F` of the
same shape as x; the image latents concatenated on channels, the CLIP embedding and added-time ids live in the
closure. With CFG on, B' = 2B and rows [:B] are unconditional, [B:] conditional (the pipeline's order).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .edm import EDMModelFn
from .flow import StepCallback, cfg_model

__all__ = ["SVD_DECODE_CHUNK_SIZE", "SVD_FPS", "SVD_MAX_GUIDANCE", "SVD_MIN_GUIDANCE", "SVD_MOTION_BUCKET_ID",
           "SVD_NOISE_AUG_STRENGTH", "SVD_NUM_STEPS", "SVD_SAMPLERS", "SVD_SIGMA_MAX", "SVD_SIGMA_MIN",
           "SVDDPMSolverSampler", "SVDEulerSampler", "SVDSampler", "added_time_ids", "cfg_model",
           "frame_guidance_scales", "karras_sigmas", "sample_svd", "svd_sampler"]

# StableVideoDiffusionPipeline.__call__ defaults (diffusers 0.42.1, svd-framer.md §4.4)
SVD_NUM_STEPS = 25
SVD_FPS = 7                       # the user-facing value; the UNet's first added-time id is fps − 1 = 6
SVD_MOTION_BUCKET_ID = 127
SVD_NOISE_AUG_STRENGTH = 0.02
SVD_MIN_GUIDANCE = 1.0            # first frame
SVD_MAX_GUIDANCE = 3.0            # last frame; CFG runs iff this is > 1
SVD_DECODE_CHUNK_SIZE: int | None = None   # None = num_frames (the pipeline's default; its docs example uses 8)

# scheduler/scheduler_config.json of stabilityai/stable-video-diffusion-img2vid(-xt) (svd-framer.md §4.2)
SVD_SIGMA_MIN = 0.002
SVD_SIGMA_MAX = 700.0
KARRAS_RHO = 7.0

Spacing = Literal["leading", "linspace", "trailing"]


def karras_sigmas(num_steps: int, sigma_min: float = SVD_SIGMA_MIN, sigma_max: float = SVD_SIGMA_MAX,
                  rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. 2022 eq. 5 grid, descending, with a final 0: float32 [N + 1]. Computed in float64 numpy
    and rounded once, as diffusers does (so the float32 values are bit-equal to its `sigmas`)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1 (SVD uses {SVD_NUM_STEPS})")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max} "
                         f"(SVD: {SVD_SIGMA_MIN} and {SVD_SIGMA_MAX})")
    if not rho > 0:
        raise ValueError(f"rho={rho} must be > 0 (7 is the paper's and diffusers' value)")
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))


class _KarrasEDMSampler:
    """What both SVD samplers share: the Karras grid, c_noise timesteps, c_in input scaling and the step
    bookkeeping (`step_index`, schedule/order guards). Subclasses implement `step` and `_init_noise_sigma`."""

    def __init__(self, sigma_min: float = SVD_SIGMA_MIN, sigma_max: float = SVD_SIGMA_MAX,
                 rho: float = KARRAS_RHO) -> None:
        karras_sigmas(1, sigma_min, sigma_max, rho)  # validates the range
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.sigmas = torch.empty(0)
        self.timesteps = torch.empty(0)
        self.init_noise_sigma = 1.0
        self._i = 0

    def _init_noise_sigma(self) -> float:
        raise NotImplementedError

    def _reset(self) -> None:
        """Per-run solver state, cleared by set_timesteps."""

    def set_timesteps(self, num_steps: int) -> None:
        self.sigmas = karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho)
        self.timesteps = 0.25 * self.sigmas[:-1].log()
        self.init_noise_sigma = self._init_noise_sigma()
        self._i = 0
        self._reset()

    @property
    def step_index(self) -> int:
        return self._i

    def _current(self) -> int:
        if not len(self.timesteps):
            raise ValueError("call set_timesteps(num_steps) first")
        if self._i >= len(self.timesteps):
            raise ValueError(f"step {self._i} is past the {len(self.timesteps)}-step schedule; call set_timesteps "
                             f"again")
        return self._i

    def _check_timestep(self, t: float | torch.Tensor) -> int:
        i = self._current()
        if float(t) != float(self.timesteps[i]):
            raise ValueError(f"step {i} expects timestep {float(self.timesteps[i]):g}, got {float(t):g}; pass the "
                             f"sampler's timesteps in order")
        return i

    def scale_model_input(self, x: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas[self._current()]
        return x / ((sigma ** 2 + 1) ** 0.5).to(x.device)

    def step(self, model_output: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, model_fn: EDMModelFn, noise: torch.Tensor, steps: int = SVD_NUM_STEPS, *,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
        """Unguided sampling (one forward a step); see `sample_svd` for the pipeline's guided loop."""
        return sample_svd(model_fn, noise, self, steps, 1.0, 1.0, callback=callback, progress=progress)


class SVDEulerSampler(_KarrasEDMSampler):
    """Deterministic Euler on the Karras grid for an EDM-v model with σ_data = 1.

    `set_timesteps(N)` fills `sigmas` [N + 1] and `timesteps` [N] = ¼·ln σ (float32, what the UNet sees);
    `scale_model_input(x)` divides by √(σ_i² + 1) for the current step i; `step(F, t, x)` returns
    x + (σ_{i+1} − σ_i)·(x − D)/σ_i. Arithmetic is float32 in diffusers' order, so results are bit-equal to
    EulerDiscreteScheduler. init_noise_sigma is √(σ_max² + 1) for SVD's "leading" spacing (σ_max for
    "linspace"/"trailing": spacing only changes this, since the Karras grid replaces the spaced timesteps)."""

    def __init__(self, sigma_min: float = SVD_SIGMA_MIN, sigma_max: float = SVD_SIGMA_MAX, rho: float = KARRAS_RHO,
                 spacing: Spacing = "leading") -> None:
        if spacing not in ("leading", "linspace", "trailing"):
            raise ValueError(f"timestep spacing {spacing!r} is not one of 'leading' (SVD), 'linspace', 'trailing'")
        super().__init__(sigma_min, sigma_max, rho)
        self.spacing = spacing

    def _init_noise_sigma(self) -> float:
        smax = self.sigmas.max()
        init = smax if self.spacing in ("linspace", "trailing") else (smax ** 2 + 1) ** 0.5  # float32, as diffusers
        return float(init)

    def step(self, model_output: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One Euler step from x (float32 [B, ...]) at grid timestep t; returns float32."""
        i = self._check_timestep(t)
        x = x.float()
        sigma = self.sigmas[i].to(x.device)
        sigma_next = self.sigmas[i + 1].to(x.device)
        # diffusers' v_prediction branch, term for term (edm.denoised with σ_data = 1)
        d = model_output.float() * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
        derivative = (x - d) / sigma
        self._i += 1
        return x + derivative * (sigma_next - sigma)


class SVDDPMSolverSampler(_KarrasEDMSampler):
    """Multistep DPM-Solver++ (data prediction, deterministic) on the Karras grid for an EDM-v model with
    σ_data = 1: diffusers' EDMDPMSolverMultistepScheduler(sigma_max=700, sigma_data=1, prediction_type=
    "v_prediction", algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
    final_sigmas_type="zero").

    The model sees exactly what it sees under `SVDEulerSampler`: input c_in·x = x/√(σ² + 1) and timestep
    c_noise = ¼·ln σ (float32 `timesteps`), the continuous EDM preconditioning SVD was trained with. (FramerTurbo's
    `dpm++` choice instead builds a DPM-Solver scheduler from SVD's DDPM betas and feeds the UNet discrete timesteps
    0…999: that is wrong for this model, whose time embedding was trained on ¼·ln σ ∈ [−1.55, 1.64].)

    With λ = −ln σ, h = λ_{i+1} − λ_i = ln(σ_i/σ_{i+1}) and D_i = c_skip·x + c_out·F (the denoised estimate at
    σ_i):
        first order  (DDIM)  x_{i+1} = (σ_{i+1}/σ_i)·x_i + (1 − e^{−h})·D_i
        second order (midpoint, multistep)
                             x_{i+1} = (σ_{i+1}/σ_i)·x_i + (1 − e^{−h})·(D_i + ½·(D_i − D_{i−1})/r),
                             r = h_{i−1}/h,  h_{i−1} = ln(σ_{i−1}/σ_i)
    Order 2 uses the first-order update on the first step (no history) and on the last step, whose σ_{i+1} = 0
    (h = ∞: x_N = D_{N−1}; diffusers' lower-order final steps — with a zero final σ its `lower_order_final` rule
    for < 15 steps changes nothing further at order ≤ 2). Coefficients are computed in float64 from the float32
    grid, applied to float32 tensors. init_noise_sigma is √(σ_max² + 1), as diffusers' property.
    The sampler keeps the previous D between steps, so a run must use one batch shape throughout."""

    def __init__(self, solver_order: int = 2, sigma_min: float = SVD_SIGMA_MIN, sigma_max: float = SVD_SIGMA_MAX,
                 rho: float = KARRAS_RHO) -> None:
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order not in (1, 2):
            raise ValueError(f"solver_order={solver_order!r} must be 1 or 2 (2, the default, is DPM-Solver++(2M))")
        super().__init__(sigma_min, sigma_max, rho)
        self.solver_order = solver_order
        self._prev_d: torch.Tensor | None = None

    def _init_noise_sigma(self) -> float:
        return (float(self.sigma_max) ** 2 + 1) ** 0.5

    def _reset(self) -> None:
        self._prev_d = None

    def step(self, model_output: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One DPM-Solver++ step from x (float32 [B, ...]) at grid timestep t; returns float32."""
        i = self._check_timestep(t)
        if model_output.shape != x.shape:
            raise ValueError(f"model_output {tuple(model_output.shape)} and x {tuple(x.shape)} must have the same "
                             f"shape")
        x = x.float()
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        c_skip = 1.0 / (sigma * sigma + 1.0)
        c_out = -sigma / math.sqrt(sigma * sigma + 1.0)
        d = x * c_skip + model_output.float() * c_out
        prev = self._prev_d
        if prev is not None and prev.shape != d.shape:
            raise ValueError(f"batch shape changed mid-run: step {i} got {tuple(d.shape)}, the previous step "
                             f"{tuple(prev.shape)}; call set_timesteps to start a new run")
        if sigma_next == 0.0:
            out = d                                           # h = ∞: σ_{i+1}/σ_i = 0, 1 − e^{−h} = 1
        else:
            ratio = sigma_next / sigma                        # e^{−h}
            if self.solver_order == 1 or prev is None:
                out = x * ratio + d * (1.0 - ratio)
            else:
                h = math.log(sigma / sigma_next)
                h_prev = math.log(float(self.sigmas[i - 1]) / sigma)
                r = h_prev / h
                out = x * ratio + d * (1.0 - ratio) + (d - prev) * (0.5 * (1.0 - ratio) / r)
        self._prev_d = d
        self._i += 1
        return out


SVDSampler = SVDEulerSampler | SVDDPMSolverSampler

SVD_SAMPLERS = ("euler", "dpm++")


def svd_sampler(name: str) -> SVDSampler:
    """The sampler for a name in SVD_SAMPLERS, with SVD's defaults: "euler" (the SVD pipeline's scheduler) or
    "dpm++" (DPM-Solver++(2M) with the same EDM preconditioning)."""
    if name == "euler":
        return SVDEulerSampler()
    if name == "dpm++":
        return SVDDPMSolverSampler()
    raise ValueError(f"unknown SVD sampler {name!r}; valid choices: {', '.join(repr(n) for n in SVD_SAMPLERS)}")


def frame_guidance_scales(min_guidance: float, max_guidance: float, num_frames: int, batch: int,
                          ndim: int = 5, dtype: torch.dtype = torch.float32,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """The pipeline's per-frame CFG scale: linspace(min, max, F) repeated per sample, shaped [B, F, 1, …, 1]
    with `ndim` dims in all (its `_append_dims` to the latents' ndim)."""
    if ndim < 2:
        raise ValueError(f"ndim={ndim} must be >= 2 (latents are [B, F, ...])")
    g = torch.linspace(min_guidance, max_guidance, num_frames).unsqueeze(0)  # float32 first, as the pipeline
    g = g.to(device, dtype).repeat(batch, 1)
    return g[(...,) + (None,) * (ndim - 2)]


def sample_svd(model_fn: EDMModelFn, noise: torch.Tensor, sampler: SVDSampler | None = None,
               steps: int = SVD_NUM_STEPS, min_guidance: float = SVD_MIN_GUIDANCE,
               max_guidance: float = SVD_MAX_GUIDANCE, num_frames: int | None = None, *,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """StableVideoDiffusionPipeline's denoising loop. noise: unit Gaussian [B, F, C, h, w], scaled here by
    init_noise_sigma (its prepare_latents); sampler: SVDEulerSampler (None: the default) or SVDDPMSolverSampler.
    CFG is on iff max_guidance > 1: then each step runs one forward on the batch-doubled input [uncond; cond] and
    combines uncond + g·(cond − uncond) with g the per-frame ramp [B, F, 1, 1, 1]. callback(i, t [B], x) runs
    after step i with the new latent. Returns float32 latents."""
    if noise.ndim != 5:
        raise ValueError(f"noise must be shaped [B, F, C, h, w], got {tuple(noise.shape)}")
    B, F = noise.shape[:2]
    if num_frames is not None and num_frames != F:
        raise ValueError(f"num_frames={num_frames} but noise has {F} frames (shape {tuple(noise.shape)})")
    do_cfg = max_guidance > 1
    if not do_cfg and min_guidance > 1:
        # the pipeline decides CFG on max_guidance alone and would fail here (un-doubled embeddings)
        raise ValueError(f"min_guidance={min_guidance} > 1 needs max_guidance > 1 to turn CFG on, got "
                         f"max_guidance={max_guidance}")
    sampler = SVDEulerSampler() if sampler is None else sampler
    sampler.set_timesteps(steps)
    x = noise.float() * sampler.init_noise_sigma
    guidance = frame_guidance_scales(min_guidance, max_guidance, F, B, x.ndim, x.dtype, x.device)
    timesteps = sampler.timesteps.to(x.device)
    for i in tqdm(range(len(timesteps)), disable=not progress, desc="sampling"):
        t = timesteps[i]
        x_in = torch.cat([x, x]) if do_cfg else x
        x_in = sampler.scale_model_input(x_in)
        out = model_fn(x_in, t.expand(x_in.shape[0])).float()
        if do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = sampler.step(out, t, x)
        if callback is not None:
            callback(i, t.expand(B), x)
    return x


def added_time_ids(fps: float | torch.Tensor = SVD_FPS,
                   motion_bucket_id: float | torch.Tensor = SVD_MOTION_BUCKET_ID,
                   noise_aug_strength: float | torch.Tensor = SVD_NOISE_AUG_STRENGTH, batch: int = 1, *,
                   dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """[B, 3] rows (fps − 1, motion_bucket_id, noise_aug_strength), as the pipeline builds them: it subtracts 1
    from the user's fps before `_get_add_time_ids`, so pass 7 to get 6 (§8.2 #5: training should do the same).
    Each value is a scalar or a [B] tensor (per-sample σ_cond in training). With CFG the pipeline concatenates
    the rows twice ([uncond; cond] share them); a model_fn closure does that itself."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} must be an integer >= 1")
    cols = []
    for name, v in (("fps", fps), ("motion_bucket_id", motion_bucket_id), ("noise_aug_strength", noise_aug_strength)):
        v = torch.as_tensor(v, dtype=torch.float64)
        if v.ndim == 0:
            v = v.expand(batch)
        if v.shape != (batch,):
            raise ValueError(f"{name} must be a scalar or shaped [B={batch}], got {tuple(v.shape)}")
        cols.append(v)
    cols[0] = cols[0] - 1
    return torch.stack(cols, dim=1).to(device, dtype)

