"""DDPM (variance-preserving, discrete-time) objective: β schedules, ᾱ with CogVideoX's SNR shift and the
zero-terminal-SNR rescale, forward process, ε / v targets, min-SNR weighting, noise offset and the loss.

Used by SD1.5 (ε or v, `scaled_linear` β), AnimateDiff (`linear` β) and CogVideoX (v, SNR shift, zero
terminal SNR). Conventions (diffusers' names):

    x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε        t ∈ {0, …, T−1}, T = num_train_timesteps; ᾱ decreasing in t
    v   = √ᾱ_t·ε − √(1 − ᾱ_t)·x0         ("v_prediction")
    x0  = (x_t − √(1 − ᾱ_t)·ε̂)/√ᾱ_t  or  √ᾱ_t·x_t − √(1 − ᾱ_t)·v̂
    SNR_t = ᾱ_t / (1 − ᾱ_t)

Shapes: B batch, C latent channels, then the spatial dims: [B, C, H, W] images or [B, C, F, H, W] video.

Random draws: sample i's timestep, noise and offset noise come from `generators[i]` only, in that order, on
the generator's device and then moved, so a sample draws the same whatever batch it sits in and whatever
device trains it. ᾱ is float64: the CPU cost is nil and it is the exact value the float32 schedulers of
diffusers round (their cumprod drifts up to 4.7e-7 from it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

Prediction = Literal["epsilon", "v_prediction"]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTIONS = ("epsilon", "v_prediction")


@dataclass
class DDPMObjectiveConfig:
    """The `objective.*` section of DDPM backbones. Defaults are SD1.5's (scheduler_config.json of
    runwayml/stable-diffusion-v1-5); AnimateDiff sets beta_schedule "linear"; CogVideoX sets prediction
    "v_prediction", zero_terminal_snr True and snr_shift 3.0 (2B) or 1.0 (5B)."""

    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    snr_gamma: float = 0.0               # min-SNR-γ weighting (Hang et al. 2023); 0 = off, 5.0 is the paper's value
    noise_offset: float = 0.0            # offset noise: ε += offset·N(0, 1) per (sample, channel); 0 = off
    zero_terminal_snr: bool = False      # rescale so ᾱ_{T−1} = 0 (Lin et al. 2023); needs v_prediction
    snr_shift: float = 1.0               # CogVideoX snr_shift_scale: SNR_t ← SNR_t / s; 1 = off
    timestep_sampling: Literal["uniform"] = "uniform"   # t ~ U{0, …, T−1} per sample

    def validate(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"objective.beta_schedule={self.beta_schedule!r} is not one of 'scaled_linear' "
                             f"(SD1.5, CogVideoX), 'linear' (AnimateDiff)")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"objective.beta_start={self.beta_start}, objective.beta_end={self.beta_end} must "
                             f"satisfy 0 < beta_start <= beta_end < 1 (SD1.5: 0.00085 and 0.012)")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 2:
            raise ValueError(f"objective.num_train_timesteps={self.num_train_timesteps!r} must be an integer "
                             f">= 2 (1000 for every supported model)")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"objective.prediction={self.prediction!r} is not one of 'epsilon' (SD1.5, "
                             f"AnimateDiff), 'v_prediction' (CogVideoX, SD2-v)")
        if not (math.isfinite(self.snr_gamma) and self.snr_gamma >= 0):
            raise ValueError(f"objective.snr_gamma={self.snr_gamma} must be >= 0 (0 turns min-SNR weighting "
                             f"off; 5.0 is the paper's value)")
        if not (math.isfinite(self.noise_offset) and self.noise_offset >= 0):
            raise ValueError(f"objective.noise_offset={self.noise_offset} must be >= 0 (0 turns it off; "
                             f"0.05-0.1 are usual)")
        if not (math.isfinite(self.snr_shift) and self.snr_shift > 0):
            raise ValueError(f"objective.snr_shift={self.snr_shift} must be > 0 (3.0 for CogVideoX-2B, "
                             f"1.0 for no shift)")
        if self.timestep_sampling != "uniform":
            raise ValueError(f"objective.timestep_sampling={self.timestep_sampling!r} is not one of 'uniform'")
        if self.zero_terminal_snr and self.prediction == "epsilon":
            # at ᾱ = 0 the input is pure noise: ε̂ = x_t carries no x0, and x0 = (x_t − ε̂)/0 is undefined
            raise ValueError("objective.zero_terminal_snr=True needs objective.prediction='v_prediction' "
                             "(an ε-model cannot recover x0 at zero SNR); set prediction or turn the rescale off")


# --------------------------------------------------------------------------------------------
# Schedule


def make_betas(cfg: DDPMObjectiveConfig) -> torch.Tensor:
    """β_t, float64 [T]: "linear" β = linspace(β0, β1); "scaled_linear" β = linspace(√β0, √β1)² (what LDM
    and SAT call "linear")."""
    cfg.validate()
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float64) ** 2


def shift_snr(abar: torch.Tensor, scale: float) -> torch.Tensor:
    """ᾱ / (s + (1 − s)·ᾱ), i.e. SNR / s (CogVideoX, "following SD3"); s = 1 returns ᾱ unchanged."""
    if not scale > 0:
        raise ValueError(f"snr shift scale must be > 0, got {scale} (3.0 for CogVideoX-2B, 1.0 for none)")
    return abar / (scale + (1 - scale) * abar)


def rescale_zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 Alg. 1 on √ᾱ: shift so √ᾱ_{T−1} = 0, scale so √ᾱ_0 keeps its value. ᾱ [T] -> ᾱ [T]."""
    s = abar.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    return ((s - sT) * (s0 / (s0 - sT))) ** 2


def alphas_cumprod(cfg: DDPMObjectiveConfig) -> torch.Tensor:
    """ᾱ_t = ∏(1 − β), float64 [T], then the SNR shift, then the zero-terminal rescale: CogVideoXDDIMScheduler's
    order (the rescale must come last so that ᾱ_{T−1} is exactly 0 after the shift)."""
    abar = torch.cumprod(1 - make_betas(cfg), dim=0)
    if cfg.snr_shift != 1.0:
        abar = shift_snr(abar, cfg.snr_shift)
    if cfg.zero_terminal_snr:
        abar = rescale_zero_terminal_snr(abar)
    return abar


def _coeffs(t: torch.Tensor | int, abar: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ_t, √(1 − ᾱ_t)) in x's dtype, shaped [B, 1, …, 1] for t [B] (or 0-dim for a scalar t)."""
    t = torch.as_tensor(t, device=abar.device)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"timesteps must be integers in [0, {len(abar) - 1}], got dtype {t.dtype}")
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(f"t must be a scalar or shaped [B={x.shape[0]}], got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(abar)):
        raise ValueError(f"timesteps {t.tolist()} must lie in [0, {len(abar) - 1}]")
    a = abar[t]
    shape = (-1,) + (1,) * (x.ndim - 1) if t.ndim == 1 else ()
    sa = a.sqrt().to(x.device, x.dtype).view(shape)
    s1 = (1 - a).sqrt().to(x.device, x.dtype).view(shape)
    return sa, s1


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, abar: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε. x0, noise [B, ...]; t int [B] or scalar; abar [T]."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    sa, s1 = _coeffs(t, abar, x0)
    return sa * x0 + s1 * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, abar: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0 (diffusers' `get_velocity(sample=x0, noise, t)`)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    sa, s1 = _coeffs(t, abar, x0)
    return sa * noise - s1 * x0


def target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int, abar: torch.Tensor,
           prediction: Prediction) -> torch.Tensor:
    """What the model is trained to output: ε ("epsilon") or v ("v_prediction")."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return velocity(x0, noise, t, abar)
    raise ValueError(f"prediction {prediction!r} is not one of 'epsilon', 'v_prediction'")


def predicted_x0(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, abar: torch.Tensor,
                 prediction: Prediction) -> torch.Tensor:
    """x̂0 from a model output at x_t: (x_t − √(1−ᾱ)·ε̂)/√ᾱ or √ᾱ·x_t − √(1−ᾱ)·v̂."""
    sa, s1 = _coeffs(t, abar, x_t)
    if prediction == "epsilon":
        return (x_t - s1 * pred) / sa
    if prediction == "v_prediction":
        return sa * x_t - s1 * pred
    raise ValueError(f"prediction {prediction!r} is not one of 'epsilon', 'v_prediction'")


def snr(t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """SNR_t = ᾱ_t / (1 − ᾱ_t), float32 [B] (0 where ᾱ = 0)."""
    t = torch.as_tensor(t)
    a = abar[t.to(abar.device)]
    return (a / (1 - a)).float().to(t.device)


def min_snr_weights(t: torch.Tensor, abar: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Per-sample loss weights float32 [B], as diffusers' train_text_to_image_lora.py computes them:
    min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v (the x0-loss min(SNR, γ) re-expressed on the target).

    Older copies of that script (mid 2023) used min(SNR + 1, γ)/(SNR + 1) for v; this is the current form.
    At SNR = 0 (zero terminal SNR) the v weight is 0 and the ε weight undefined (the config forbids ε there).
    """
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma} (5.0 is the paper's value)")
    s = snr(t, abar)
    w = s.clamp(max=gamma)
    if prediction == "epsilon":
        return w / s
    if prediction == "v_prediction":
        return w / (s + 1)
    raise ValueError(f"prediction {prediction!r} is not one of 'epsilon', 'v_prediction'")


# --------------------------------------------------------------------------------------------
# Training


def draw_training_noise(x0: torch.Tensor, cfg: DDPMObjectiveConfig, generators: list[torch.Generator]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i's t ~ U{0..T−1}, ε ~ N(0, I) [C, ...] and, when cfg.noise_offset > 0, offset·N(0, 1) shaped
    [C, 1, …, 1] added to ε (constant over the spatial and frame dims: diffusers' (B, C, 1, 1), extended to
    [B, C, 1, 1, 1] for video), all from generators[i] in that order. Returns t int64 [B] on x0's device and
    ε float32 [B, ...] on x0's device."""
    B = x0.shape[0]
    if len(generators) != B:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {B}")
    if x0.ndim < 3:
        raise ValueError(f"x0 must be shaped [B, C, ...] with spatial dims, got {tuple(x0.shape)}")
    ts, noises = [], []
    for g in generators:
        ts.append(torch.randint(0, cfg.num_train_timesteps, (1,), generator=g, device=g.device))
        eps = torch.randn(x0.shape[1:], generator=g, device=g.device, dtype=torch.float32)
        if cfg.noise_offset > 0:
            off = torch.randn((x0.shape[1],) + (1,) * (x0.ndim - 2), generator=g, device=g.device)
            eps = eps + cfg.noise_offset * off
        noises.append(eps)
    return torch.cat(ts).to(x0.device), torch.stack(noises).to(x0.device)


@dataclass
class TrainingInputs:
    """One step's inputs: x_t [B, ...] (x0's dtype), t int64 [B], target [B, ...], weights float32 [B] or None."""

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None


def training_inputs(x0: torch.Tensor, cfg: DDPMObjectiveConfig, generators: list[torch.Generator],
                    abar: torch.Tensor | None = None) -> TrainingInputs:
    """Noise x0 [B, ...] at per-sample timesteps; the target includes the offset noise (as diffusers: the
    offset is part of ε). abar: ᾱ [T] from `alphas_cumprod(cfg)` (computed when None)."""
    abar = alphas_cumprod(cfg) if abar is None else abar
    if len(abar) != cfg.num_train_timesteps:
        raise ValueError(f"abar has {len(abar)} entries, objective.num_train_timesteps={cfg.num_train_timesteps}")
    t, noise = draw_training_noise(x0, cfg, generators)
    noise = noise.to(x0.dtype)
    x_t = add_noise(x0, noise, t, abar)
    tgt = target(x0, noise, t, abar, cfg.prediction)
    w = min_snr_weights(t, abar, cfg.snr_gamma, cfg.prediction) if cfg.snr_gamma > 0 else None
    return TrainingInputs(x_t, t, tgt, w)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar fp32: per-sample mean of (pred − target)² over the non-batch dims, times weights [B], batch mean
    (diffusers' snr_gamma branch; with weights None it equals the plain element mean)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    per_sample = (pred.float() - target.float()).square().flatten(1).mean(1)
    if weights is not None:
        if weights.shape != per_sample.shape:
            raise ValueError(f"weights must be shaped [B={pred.shape[0]}], got {tuple(weights.shape)}")
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


def ddpm_loss(model_fn: ModelFn, x0: torch.Tensor, cfg: DDPMObjectiveConfig, generators: list[torch.Generator],
              abar: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss: model_fn(x_t [B, ...], t [B] float32) -> ε̂ or v̂ (per cfg.prediction); conditioning
    (text, image latents) lives in the closure. CogVideoX's official x0 loss weighted by 1/(1 − ᾱ) equals
    this v-MSE exactly (x̂0 − x0 = −√(1 − ᾱ)·(v̂ − v)), so it is trained as plain v-MSE."""
    inp = training_inputs(x0, cfg, generators, abar)
    pred = model_fn(inp.x_t, inp.t.float())
    return weighted_mse(pred, inp.target, inp.weights)
