"""EDM objective with v-type preconditioning and EDM c_noise (SGM's `VScalingWithEDMcNoise`): what Stable Video
Diffusion (and Framer, built on it) was trained with. Conventions (svd-framer.md §4.1, σ_data = 1 for SVD):

    x_σ = x0 + σ·ε                                  variance-exploding, σ ∈ (0, ∞)
    model input  c_in·x_σ,  timestep c_noise        c_in = 1/√(σ² + σ_d²),  c_noise = ¼·ln σ
    D(x_σ, σ) = c_skip·x_σ + c_out·F                c_skip = σ_d²/(σ² + σ_d²),  c_out = −σ·σ_d/√(σ² + σ_d²)
    loss = λ(σ)·‖D − x0‖²                           λ = (σ² + σ_d²)/(σ·σ_d)²  ("edm")

c_out is negative: the network output F is a v-prediction, regressing (σ_d·ε − σ·x0/σ_d)/√(σ² + σ_d²) (with
σ_d = 1: αε − s·x0), the sign diffusers' EulerDiscreteScheduler uses for v_prediction (`model_output·(−σ/√(σ²+1))
+ sample/(σ²+1)`). λ·c_out² = 1, so the "edm" loss on D is plain MSE on F against `v_target` (tested).

Shapes: B batch, then any latent dims ([B, F, C, h, w] for SVD's UNet, frames before channels).

Random draws: every function that draws takes one generator per sample and draws from generators[i] only, on
the generator's device, then moves the result, so a sample draws the same numbers whatever batch and device it
sits in. Per generator, in call order:
    draw_cond_sigmas      one N(0, 1) scalar (always drawn, also with a fixed cond_sigma, so streams stay aligned)
    augment_condition     ε_cond shaped like the condition image [C, H, W] (or [F, C, H, W])
    training_inputs       one N(0, 1) scalar for ln σ, then ε shaped x0[i]
A trainer that uses all three should call them in that order (conditioning first, as the pipeline noises the
image before it encodes it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .ddpm import weighted_mse

# model_fn(c_in·x_σ [B, ...], c_noise [B]) -> F [B, ...]; conditioning lives in the closure
EDMModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSS_WEIGHTINGS = ("edm", "none")


@dataclass
class EDMObjectiveConfig:
    """The `objective.*` section of EDM backbones (SVD, Framer). Defaults are the SVD fine-tuning repos'
    (SVD_Xtend train_svd_lora.py, svd-framer.md §4.3), which §8.2 #1 and §8.3 recommend over FramerTurbo's
    DDPM/ε loop: ln σ ~ N(0.7, 1.6²), λ(σ) = (σ² + 1)/σ², and the conditioning image noised with
    ln σ_cond ~ N(−3.0, 0.5²)."""

    p_mean: float = 0.7                  # ln σ ~ N(p_mean, p_std²) (k-diffusion rand_log_normal)
    p_std: float = 1.6
    sigma_data: float = 1.0              # SVD: 1.0 (and SVDEulerSampler assumes 1, as diffusers does)
    loss_weighting: Literal["edm", "none"] = "edm"
    cond_sigma_p_mean: float = -3.0      # noise augmentation of the conditioning image: ln σ_cond ~ N(mean, std²)
    cond_sigma_p_std: float = 0.5
    cond_sigma_fixed: float | None = None  # a fixed σ_cond instead (0.02 = SVD inference's noise_aug_strength)

    def validate(self) -> None:
        for key in ("p_mean", "p_std", "sigma_data", "cond_sigma_p_mean", "cond_sigma_p_std"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"objective.{key}={v!r} must be a finite number")
        if not self.p_std > 0:
            raise ValueError(f"objective.p_std={self.p_std} must be > 0 (1.6 for SVD fine-tuning)")
        if not self.sigma_data > 0:
            raise ValueError(f"objective.sigma_data={self.sigma_data} must be > 0 (1.0 for SVD)")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"objective.loss_weighting={self.loss_weighting!r} is not one of 'edm' "
                             f"(λ = (σ² + σ_d²)/(σ·σ_d)², SVD), 'none'")
        if not self.cond_sigma_p_std > 0:
            raise ValueError(f"objective.cond_sigma_p_std={self.cond_sigma_p_std} must be > 0 (0.5 for SVD "
                             f"fine-tuning); set objective.cond_sigma_fixed for a constant σ_cond")
        f = self.cond_sigma_fixed
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f)
                              or f < 0):
            raise ValueError(f"objective.cond_sigma_fixed={f!r} must be None or a number >= 0 (0.02 is SVD "
                             f"inference's noise_aug_strength)")


# --------------------------------------------------------------------------------------------
# Parameterisation


def edm_scalings(sigma: torch.Tensor, sigma_data: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise), each shaped like sigma (> 0), in sigma's dtype."""
    sigma = torch.as_tensor(sigma)
    if not sigma.dtype.is_floating_point:
        sigma = sigma.float()
    sd2 = sigma_data * sigma_data
    r = sigma * sigma + sd2
    c_skip = sd2 / r
    c_out = -sigma * sigma_data / r.sqrt()
    c_in = 1 / r.sqrt()
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] (or scalar) -> [B, 1, …, 1] in x's dtype and device."""
    v = torch.as_tensor(v).to(x.device, x.dtype)
    if v.ndim == 0:
        return v
    if v.ndim != 1 or v.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or shaped [B={x.shape[0]}], got {tuple(v.shape)}")
    return v.view(-1, *([1] * (x.ndim - 1)))


def denoised(model_output: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor,
             sigma_data: float = 1.0) -> torch.Tensor:
    """D = c_skip·x_σ + c_out·F, float32. model_output and x_noisy [B, ...]; sigma [B] or scalar."""
    if model_output.shape != x_noisy.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and x_noisy {tuple(x_noisy.shape)} must have "
                         f"the same shape")
    c_skip, c_out, _, _ = edm_scalings(torch.as_tensor(sigma, dtype=torch.float32), sigma_data)
    x = x_noisy.float()
    return _per_sample(c_skip, x) * x + _per_sample(c_out, x) * model_output.float()


def v_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """The F for which D = x0: (σ_d·ε − σ·x0/σ_d)/√(σ² + σ_d²), float32."""
    x0, noise = x0.float(), noise.float()
    s = _per_sample(torch.as_tensor(sigma, dtype=torch.float32), x0)
    return (sigma_data * noise - s * x0 / sigma_data) / (s * s + sigma_data * sigma_data).sqrt()


def loss_weights(sigma: torch.Tensor, cfg: EDMObjectiveConfig) -> torch.Tensor:
    """λ(σ) float32 [B]: (σ² + σ_d²)/(σ·σ_d)² for "edm", ones for "none"."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if cfg.loss_weighting == "none":
        return torch.ones_like(sigma)
    if cfg.loss_weighting == "edm":
        sd = cfg.sigma_data
        return (sigma * sigma + sd * sd) / (sigma * sd) ** 2
    raise ValueError(f"objective.loss_weighting={cfg.loss_weighting!r} is not one of 'edm', 'none'")


# --------------------------------------------------------------------------------------------
# Random draws


def _check_generators(generators: list[torch.Generator], batch: int | None = None) -> None:
    if not generators:
        raise ValueError("need one torch.Generator per sample, got none")
    if batch is not None and len(generators) != batch:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {batch}")


def _lognormal(g: torch.Generator, mean: float, std: float) -> torch.Tensor:
    return (torch.randn(1, generator=g, device=g.device, dtype=torch.float32) * std + mean).exp()


def draw_sigmas(generators: list[torch.Generator], cfg: EDMObjectiveConfig,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Training σ float32 [B]: ln σ_i ~ N(p_mean, p_std²), one N(0, 1) draw from generators[i]."""
    _check_generators(generators)
    sig = torch.cat([_lognormal(g, cfg.p_mean, cfg.p_std).cpu() for g in generators])
    return sig.to(device) if device is not None else sig


def draw_cond_sigmas(generators: list[torch.Generator], cfg: EDMObjectiveConfig,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Noise-augmentation level of the conditioning image, float32 [B]: ln σ_cond ~ N(cond_sigma_p_mean,
    cond_sigma_p_std²), or cfg.cond_sigma_fixed (drawn anyway, see the module docstring). The same value
    goes into the third added-time id (`edm_samplers.added_time_ids`)."""
    cfg.validate()
    _check_generators(generators)
    sig = torch.cat([_lognormal(g, cfg.cond_sigma_p_mean, cfg.cond_sigma_p_std).cpu() for g in generators])
    if cfg.cond_sigma_fixed is not None:
        sig = torch.full_like(sig, float(cfg.cond_sigma_fixed))
    return sig.to(device) if device is not None else sig


def augment_condition(image: torch.Tensor, sigma_cond: torch.Tensor,
                      generators: list[torch.Generator]) -> torch.Tensor:
    """image + σ_cond·ε, the pipeline's noise augmentation (applied to the [−1, 1] pixels before the VAE).
    image [B, ...]; sigma_cond [B] or scalar; ε_i [...] from generators[i]. Returns image's dtype."""
    _check_generators(generators, image.shape[0])
    eps = torch.stack([torch.randn(image.shape[1:], generator=g, device=g.device, dtype=torch.float32).cpu()
                       for g in generators]).to(image.device)
    return (image.float() + _per_sample(sigma_cond, eps) * eps).to(image.dtype)


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class EDMTrainingInputs:
    """One step's inputs. x_noisy = x0 + σ·ε and model_input = c_in·x_noisy [B, ...] (x0's dtype); sigma,
    c_noise and weights float32 [B]; target = x0 [B, ...] (D regresses it); noise ε [B, ...] (x0's dtype)."""

    x_noisy: torch.Tensor
    sigma: torch.Tensor
    model_input: torch.Tensor
    c_noise: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor
    noise: torch.Tensor


def training_inputs(x0: torch.Tensor, cfg: EDMObjectiveConfig, generators: list[torch.Generator]
                    ) -> EDMTrainingInputs:
    """Noise x0 [B, ...] at per-sample σ. Per generator: ln σ (one scalar), then ε shaped x0[i]."""
    cfg.validate()
    B = x0.shape[0]
    _check_generators(generators, B)
    if x0.ndim < 2:
        raise ValueError(f"x0 must be shaped [B, ...] with at least one latent dim, got {tuple(x0.shape)}")
    sigmas, noises = [], []
    for g in generators:
        sigmas.append(_lognormal(g, cfg.p_mean, cfg.p_std).cpu())
        noises.append(torch.randn(x0.shape[1:], generator=g, device=g.device, dtype=torch.float32).cpu())
    sigma = torch.cat(sigmas).to(x0.device)                       # [B] float32
    noise = torch.stack(noises).to(x0.device, x0.dtype)           # [B, ...]
    _, _, c_in, c_noise = edm_scalings(sigma, cfg.sigma_data)
    x_noisy = x0 + _per_sample(sigma, x0) * noise
    model_input = _per_sample(c_in, x0) * x_noisy
    return EDMTrainingInputs(x_noisy, sigma, model_input, c_noise, x0, loss_weights(sigma, cfg), noise)


def edm_loss(model_output: torch.Tensor, inputs: EDMTrainingInputs, cfg: EDMObjectiveConfig,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar fp32 λ-weighted denoising loss (svd-framer.md §4.3): D = denoised(F, x_σ, σ); per sample the mean
    of (D − x0)² over all non-batch elements, times λ(σ_i), then the mean over the batch:
        loss = (1/B)·Σ_i λ(σ_i)·mean_j (D_ij − x0_ij)².
    `mask` ([B, F] or any leading shape of the output, 1 = known): the per-sample mean runs over the known elements
    only, so elements without ground truth (the middle frames of an image pair) get no loss and no gradient."""
    d = denoised(model_output, inputs.x_noisy, inputs.sigma, cfg.sigma_data)
    if mask is None:
        return weighted_mse(d, inputs.target, inputs.weights)
    if mask.shape != d.shape[:mask.ndim] or mask.ndim < 2:
        raise ValueError(f"mask {tuple(mask.shape)} must be a leading part [B, F, ...] of the output shape "
                         f"{tuple(d.shape)}")
    m = mask.to(d.device, torch.float32).reshape(*mask.shape, *([1] * (d.ndim - mask.ndim))).expand_as(d)
    sq = (d - inputs.target.float()).square() * m
    per_sample = sq.flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
    return (per_sample * inputs.weights.to(per_sample)).mean()


def edm_training_loss(model_fn: EDMModelFn, x0: torch.Tensor, cfg: EDMObjectiveConfig,
                      generators: list[torch.Generator]) -> tuple[torch.Tensor, EDMTrainingInputs]:
    """training_inputs, one forward model_fn(c_in·x_σ, c_noise [B]) -> F, and edm_loss. Returns (loss, inputs)."""
    inputs = training_inputs(x0, cfg, generators)
    return edm_loss(model_fn(inputs.model_input, inputs.c_noise), inputs, cfg), inputs
