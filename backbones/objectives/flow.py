"""Flow matching (rectified flow): training objective, first-frame conditioning, samplers.

Shared by every flow-matching backbone (Wan2.x first). Conventions are the ones the released Wan
weights were trained with (fixed by the upstream inference code):

    x_σ = (1 − σ)·x0 + σ·ε        σ = 1 is pure noise, σ = 0 is data
    v   = ε − x0                  the model predicts this velocity
    x0  = x_σ − σ·v               how a sampler reads the prediction
    model timestep = σ·T          T = num_train_timesteps = 1000

Shapes: B batch, C latent channels, F latent frames, H/W latent height/width,
L = (F/pt)·(H/ph)·(W/pw) patch tokens for a DiT patch (pt, ph, pw), N sampling steps.

A *model function* for the samplers is `model_fn(x [B, C, F, H, W] float32, t [B] float32) -> v [B, C, F, H, W]`:
`t` is the one timestep of the current step repeated per sample, exactly as the DiT should see it
(FlowUniPC: the truncated integer int64(σ·1000) as a float, like upstream; Euler: σ·1000).
Per-token timesteps (TI2V: 0 on the clean first frame) are built by `with_token_timesteps`,
classifier-free guidance by `cfg_model`; both wrap a model function into another one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TokenModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]

# Training σ range. Both ends carry no learnable signal (at σ→0 the noise, at σ→1 the data is
# unrecoverable), and σ·1000 then stays inside [1, 999], the integer timesteps the DiT sees at
# inference (UniPC's first step is int64(999.8) = 999).
TRAIN_SIGMA_MIN = 1e-3
TRAIN_SIGMA_MAX = 0.999


# --------------------------------------------------------------------------------------------
# Objective


@dataclass
class FlowObjectiveConfig:
    """The `objective.*` section of flow-matching backbones."""

    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    shift: float = 5.0                   # uniform sampling: sigma shift (the sampler's grid)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    first_frame_prob: float = 0.2        # probability that a video sample is conditioned on its clean first frame

    def validate(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"objective.shift={self.shift} must be > 0 (5 for Wan2.2 TI2V-5B, 1 for no shift)")
        if not self.logit_std > 0:
            raise ValueError(f"objective.logit_std={self.logit_std} must be > 0, e.g. 1.0")
        if not math.isfinite(self.logit_mean):
            raise ValueError(f"objective.logit_mean={self.logit_mean} must be a finite number, e.g. 0.0")
        if not 0.0 <= self.first_frame_prob <= 1.0:
            raise ValueError(f"objective.first_frame_prob={self.first_frame_prob} must be a probability in [0, 1]")


def shift_sigmas(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """σ' = s·σ / (1 + (s − 1)·σ); s > 1 moves mass toward noise (σ = 0 and 1 are fixed points)."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift} (5.0 for Wan2.2 TI2V-5B, 1.0 for no shift)")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(n: int, generator: torch.Generator, mode: str = "logit_normal", shift: float = 5.0,
                  logit_mean: float = 0.0, logit_std: float = 1.0,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Training noise levels, float32 [n], clamped to [TRAIN_SIGMA_MIN, TRAIN_SIGMA_MAX].

    mode "logit_normal": σ = sigmoid(N(logit_mean, logit_std²)) (SD3 / Wan report); `shift` is
        NOT applied (the logit-normal already sets where the mass sits; move it with logit_mean).
    mode "uniform": σ = shift_sigmas(U(0, 1), shift), i.e. uniform over the shifted grid the
        sampler walks (DiffSynth-style).
    Draws happen on the generator's device, then move to `device`, so a CPU generator gives the
    same numbers whatever the target device.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if mode == "logit_normal":
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        u = torch.randn(n, generator=generator, device=generator.device, dtype=torch.float32)
        sigma = torch.sigmoid(u * logit_std + logit_mean)
    elif mode == "uniform":
        u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float32)
        sigma = shift_sigmas(u, shift)
    else:
        raise ValueError(f"sigma sampling mode {mode!r} is not one of 'logit_normal', 'uniform'")
    return sigma.clamp(TRAIN_SIGMA_MIN, TRAIN_SIGMA_MAX).to(device if device is not None else sigma.device)


def sigma_to_timestep(sigma: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Model timestep for training: σ·T as float (not truncated; only the UniPC sampler truncates)."""
    return sigma.float() * num_train_timesteps


def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """σ (scalar or [B]) -> [B, 1, ..., 1] broadcastable against x [B, ...]."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or shaped [B={x.shape[0]}], got {tuple(s.shape)}")
    return s.view(-1, *([1] * (x.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε. x0, noise [B, ...]; sigma scalar or [B]."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity target v = ε − x0 (noise minus data), so that x0 = x_σ − σ·v."""
    return noise - x0


# --------------------------------------------------------------------------------------------
# First-frame (TI2V) conditioning


def first_frame_mask(B: int, F: int, H: int, W: int, cond: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mask [B, 1, F, H, W]: 0 on the first latent frame of samples with cond[b] True, 1 elsewhere.

    Same role as upstream `masks_like(...)[1]` (mask2): latent = (1 − mask)·z + mask·x.
    """
    if cond.shape != (B,) or cond.dtype != torch.bool:
        raise ValueError(f"cond must be a bool tensor shaped [B={B}], got {cond.dtype} {tuple(cond.shape)}")
    mask = torch.ones(B, 1, F, H, W, dtype=dtype, device=cond.device)
    mask[cond, :, 0] = 0
    return mask


def token_timesteps(t: torch.Tensor | float, mask: torch.Tensor, patch: tuple[int, int, int] = (1, 2, 2),
                    seq_len: int | None = None) -> torch.Tensor:
    """Per-token timesteps [B, L] (or [B, seq_len]) in the DiT's row-major (f, h, w) token order.

    Token (f, h, w) gets mask[b, 0, f·pt, h·ph, w·pw] · t[b], so conditioned first-frame tokens
    get 0. Padding tokens up to seq_len get t, like upstream. t: scalar or [B]; mask [B, 1, F, H, W].
    """
    if mask.ndim != 5 or mask.shape[1] != 1:
        raise ValueError(f"mask must be shaped [B, 1, F, H, W], got {tuple(mask.shape)}")
    B, _, F, H, W = mask.shape
    pt, ph, pw = patch
    if F % pt or H % ph or W % pw:
        raise ValueError(f"latent grid (F, H, W)=({F}, {H}, {W}) is not divisible by patch {patch}")
    t = torch.as_tensor(t, device=mask.device).float()
    if t.ndim == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"t must be a scalar or shaped [B={B}], got {tuple(t.shape)}")
    tokens = (mask[:, 0, ::pt, ::ph, ::pw].float() * t.view(B, 1, 1, 1)).flatten(1)  # [B, L]
    if seq_len is not None:
        L = tokens.shape[1]
        if seq_len < L:
            raise ValueError(f"seq_len={seq_len} is shorter than the {L} tokens of the latent")
        tokens = torch.cat([tokens, t[:, None].expand(B, seq_len - L)], dim=1)
    return tokens


def impose_first_frame(x: torch.Tensor, z_first: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1 − mask)·z_first + mask·x: x [B, C, F, H, W], z_first [B, C, 1, H, W], mask [B, 1, F, H, W].

    The upstream arithmetic form (not torch.where) so results match it bit for bit; with a 0/1 mask
    it still returns z_first and x exactly where the mask is 0 and 1.
    """
    return (1 - mask) * z_first + mask * x


def condition_training_batch(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, p: float,
                             generator: torch.Generator, patch: tuple[int, int, int] = (1, 2, 2),
                             num_train_timesteps: int = 1000
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint T2V/I2V training batch: with probability p a sample keeps its first latent frame clean.

    x0, noise [B, C, F, H, W]; sigma [B]. Returns
      x_t [B, C, F, H, W]    noised latent, first frame = x0 exactly for conditioned samples,
      t_tokens [B, L]        σ·T per token, 0 on the conditioned first-frame tokens,
      loss_mask [B, 1, F, H, W]  0 on the conditioned first frame (nothing to learn there),
      cond [B] bool.
    The clean frame is exact: upstream's unused training branch hints at a slightly noised one
    (exp(N(−3.5, 0.5)) ≈ 0.03) but how it enters is unpublished. B uniforms are drawn from the
    generator whatever p is, so the random stream does not depend on p. A sample with a single latent
    frame (an image) is never conditioned.
    """
    if x0.ndim != 5:
        raise ValueError(f"x0 must be shaped [B, C, F, H, W], got {tuple(x0.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"conditioning probability p must be in [0, 1], got {p}")
    B, _, F, H, W = x0.shape
    u = torch.rand(B, generator=generator, device=generator.device)
    # a one-frame sample conditioned on its only frame would have nothing left to learn (loss 0 and an
    # optimizer step on nothing): such samples are never conditioned
    cond = ((u < p) & (F > 1)).to(x0.device)
    mask = first_frame_mask(B, F, H, W, cond, dtype=x0.dtype)
    x_t = impose_first_frame(add_noise(x0, noise, sigma), x0[:, :, :1], mask)
    t_tokens = token_timesteps(sigma_to_timestep(sigma, num_train_timesteps), mask, patch)
    return x_t, t_tokens, mask, cond


def masked_mse(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar fp32 MSE: mean over the kept elements of each sample, then mean over the batch.

    Per-sample normalisation keeps every sample's weight equal, so a conditioned sample (one frame
    fewer) is not down-weighted against the others. pred/target [B, C, F, H, W]; loss_mask
    broadcastable to them ([B, 1, F, H, W]); a sample with nothing kept contributes 0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    err = (pred.float() - target.float()).square()
    if loss_mask is None:
        return err.mean()
    m = loss_mask.float().expand_as(err)
    kept = m.flatten(1).sum(1)
    per_sample = (err * m).flatten(1).sum(1) / kept.clamp_min(1)
    return per_sample.mean()


# --------------------------------------------------------------------------------------------
# Model-function wrappers


def with_token_timesteps(token_model_fn: TokenModelFn, mask: torch.Tensor | None = None,
                         patch: tuple[int, int, int] = (1, 2, 2), seq_len: int | None = None) -> ModelFn:
    """Turn `f(x, t_tokens [B, L])` into a model function `g(x, t [B])` for the samplers.

    mask [B, 1, F, H, W] (e.g. from `first_frame_mask`) zeroes the conditioned tokens; None gives
    every token t (T2V).
    """
    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = mask if mask is not None else torch.ones_like(x[:, :1])
        return token_model_fn(x, token_timesteps(t, m, patch, seq_len))
    return model_fn


def cfg_model(cond_fn: ModelFn, uncond_fn: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance: uncond + scale·(cond − uncond), two separate forwards like upstream."""
    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond = uncond_fn(x, t)
        return uncond + scale * (cond_fn(x, t) - uncond)
    return model_fn


# --------------------------------------------------------------------------------------------
# Samplers


class FlowSampler:
    """Base: a σ grid `sigmas` [N+1] (float32, last 0), model timesteps `timesteps` [N] (float32),
    and a `step(v, x)` that advances one grid point. Subclasses fill the grid in `set_timesteps`."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def set_timesteps(self, num_steps: int) -> None:
        raise NotImplementedError

    def step(self, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, model_fn: ModelFn, latents: torch.Tensor, steps: int, *,
               condition: tuple[torch.Tensor, torch.Tensor] | None = None,
               callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
        """Integrate from noise `latents` [B, C, F, H, W] (σ = sigmas[0]) to data; returns float32.

        condition = (z_first [B, C, 1, H, W], mask [B, 1, F, H, W]) re-imposes the clean first frame
        before the first step and after every step (upstream TI2V); pair it with a model function
        from `with_token_timesteps(..., mask)` so those tokens also get timestep 0.
        callback(i, t [B], x) runs after step i with the new latent.
        """
        if latents.ndim != 5:
            raise ValueError(f"latents must be shaped [B, C, F, H, W], got {tuple(latents.shape)}")
        B, C, F, H, W = latents.shape
        x = latents.float()
        if condition is not None:
            z_first, mask = condition
            if z_first.shape != (B, C, 1, H, W) or mask.shape != (B, 1, F, H, W):
                raise ValueError(f"condition must be (z_first [B, C, 1, H, W]={(B, C, 1, H, W)}, mask "
                                 f"[B, 1, F, H, W]={(B, 1, F, H, W)}), got {tuple(z_first.shape)} and "
                                 f"{tuple(mask.shape)}")
            z_first, mask = z_first.float().to(x.device), mask.float().to(x.device)
            x = impose_first_frame(x, z_first, mask)
        self.set_timesteps(steps)
        timesteps = self.timesteps.to(x.device)
        for i in tqdm(range(steps), disable=not progress, desc="sampling"):
            t = timesteps[i].expand(B)
            v = model_fn(x, t)
            x = self.step(v.float(), x)
            if condition is not None:
                x = impose_first_frame(x, z_first, mask)
            if callback is not None:
                callback(i, t, x)
        return x


class FlowEulerSampler(FlowSampler):
    """First-order Euler on σ = shift(linspace(1, 0, N+1)): x_{i+1} = x_i + (σ_{i+1} − σ_i)·v.

    The model gets σ·T as a float (not truncated). Exact for straight-line (single-x0) flows.
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000) -> None:
        shift_sigmas(0.0, shift)  # validates shift
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        self._i = 0

    def set_timesteps(self, num_steps: int) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        s = shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), self.shift)
        self.sigmas = s.float()
        self.timesteps = (s[:-1] * self.num_train_timesteps).float()
        self._i = 0

    def step(self, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = self._i
        if i >= len(self.timesteps):
            raise ValueError(f"step {i} is past the {len(self.timesteps)}-step schedule; call set_timesteps again")
        dt = float(self.sigmas[i + 1]) - float(self.sigmas[i])
        self._i += 1
        return x + dt * velocity


def _lam(sigma: float) -> float:
    """Flow-matching half log-SNR λ = log(α/σ) with α = 1 − σ (not the VP α = sqrt(1 − σ²))."""
    return math.log(1.0 - sigma) - math.log(sigma)


def _unipc_coeffs(h: float, rks: list[float], order: int, corrector: bool) -> tuple[float, float, list[float]]:
    """(h·φ1, B(h), ρ) for UniP (corrector=False) or UniC of `order`, bh2 variant, x0-prediction.

    rks: (λ_{s_k} − λ_{s0}) / h for the older points, then 1.0. The order-2 predictor uses the
    fixed ρ = 0.5 and the order-1 corrector ρ = 0.5, like upstream; otherwise ρ solves R ρ = b.
    """
    hh = -h  # x0-prediction integrates in −λ
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)  # bh2
    h_phi_k = h_phi_1 / hh - 1.0
    b, factorial = [], 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = torch.tensor([[rk ** i for rk in rks] for i in range(order)], dtype=torch.float64)
    bt = torch.tensor(b, dtype=torch.float64)
    if corrector:
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, bt).tolist()
    elif order == 1:
        rhos = []
    elif order == 2:
        rhos = [0.5]
    else:
        rhos = torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
    return h_phi_1, b_h, rhos


class FlowUniPCSampler(FlowSampler):
    """UniPC (bh2, x0-prediction, UniC corrector after every step but the first) for flow models,
    with Wan's FlowUniPCMultistepScheduler schedule and step rule.

    Schedule: σ_max is the first entry of the shift-1 training grid 1 − linspace(1, 1/T, T)[::-1]
    stored as float32 (0.999…); σ = shift(linspace(σ_max, 0, N+1)[:-1]) in float64; model timesteps
    int64(σ·T) (truncated) given to the model as float; σ stored float32 with a final 0 appended.
    Solver scalars (λ, φ, ρ) are computed in float64 from those float32 σ (upstream uses float32;
    the difference is rounding, ~1e-7 relative).
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 5.0, solver_order: int = 2,
                 lower_order_final: bool = True) -> None:
        shift_sigmas(0.0, shift)  # validates shift
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order} (Wan uses 2)")
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.solver_order = solver_order
        self.lower_order_final = lower_order_final
        self._reset()

    def _reset(self) -> None:
        self._i = 0
        self._m: list[torch.Tensor] = []  # x0 predictions of the last `solver_order` steps, oldest first
        self._last_sample: torch.Tensor | None = None  # input of the last predictor step
        self._order = 0  # order used by the last predictor step; the next corrector reuses it

    def set_timesteps(self, num_steps: int) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        T = self.num_train_timesteps
        sigma_max = float(torch.tensor(1.0 - 1.0 / T, dtype=torch.float32))  # upstream keeps the grid in float32
        s = torch.linspace(sigma_max, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        s = shift_sigmas(s, self.shift)
        self.timesteps = (s * T).to(torch.int64).float()  # truncation, as upstream feeds the DiT
        self.sigmas = torch.cat([s, s.new_zeros(1)]).float()
        self._s = [float(v) for v in self.sigmas]
        self._reset()

    def step(self, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One UniPC step: velocity v and latent x at σ_i -> latent at σ_{i+1}."""
        i, n = self._i, len(self.timesteps)
        if i >= n:
            raise ValueError(f"step {i} is past the {n}-step schedule; call set_timesteps again")
        m = x - self._s[i] * velocity  # x0 prediction
        if i > 0 and self._last_sample is not None:
            x = self._correct(m, self._order)
        self._m = (self._m + [m])[-self.solver_order:]
        order = min(self.solver_order, n - i) if self.lower_order_final else self.solver_order
        self._order = min(order, len(self._m))  # warm-up: only as many points as seen so far
        self._last_sample = x
        x_next = self._predict(x, self._order)
        self._i += 1
        return x_next

    def _predict(self, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP from σ_i (with x0 history m_i, m_{i−1}, …) to σ_{i+1}."""
        i, s = self._i, self._s
        s0, t = s[i], s[i + 1]
        m0 = self._m[-1]
        if t == 0.0:
            # λ_t = +∞: the exponential integrator lands on its x0 estimate (the order-1 limit;
            # lower_order_final guarantees order 1 here, as upstream)
            return m0.clone()
        h = _lam(t) - _lam(s0)
        rks = [(_lam(s[i - k]) - _lam(s0)) / h for k in range(1, order)]
        h_phi_1, b_h, rhos = _unipc_coeffs(h, rks + [1.0], order, corrector=False)
        x_next = (t / s0) * x - ((1.0 - t) * h_phi_1) * m0
        if order > 1:
            res = sum(rho * (self._m[-(k + 1)] - m0) / rk for k, (rho, rk) in enumerate(zip(rhos, rks), 1))
            x_next = x_next - ((1.0 - t) * b_h) * res
        return x_next

    def _correct(self, m_this: torch.Tensor, order: int) -> torch.Tensor:
        """UniC: redo the last step σ_{i−1} -> σ_i from its input, adding the new x0 estimate m_this."""
        i, s = self._i, self._s
        s0, t = s[i - 1], s[i]
        m0 = self._m[-1]
        h = _lam(t) - _lam(s0)
        rks = [(_lam(s[i - 1 - k]) - _lam(s0)) / h for k in range(1, order)]
        h_phi_1, b_h, rhos = _unipc_coeffs(h, rks + [1.0], order, corrector=True)
        res = rhos[-1] * (m_this - m0)
        for k, (rho, rk) in enumerate(zip(rhos[:-1], rks), 1):
            res = res + rho * (self._m[-(k + 1)] - m0) / rk
        return (t / s0) * self._last_sample - ((1.0 - t) * h_phi_1) * m0 - ((1.0 - t) * b_h) * res
