"""DDIM steps with the log-density of the step, for per-sample timesteps.

The maths is diffusers' ``DDIMScheduler.step`` (Song et al. 2021, eq. 12), written for a batch whose
samples may sit at different timesteps (SPO trains on tuples drawn from every step of the chain),
plus the Gaussian log-density of ``prev_sample`` under the step's posterior:

    x_{t-1} = sqrt(a_{t-1}) * x0_hat + sqrt(1 - a_{t-1} - s_t^2) * eps_hat + s_t * z,
    s_t     = eta * sqrt((1 - a_{t-1}) / (1 - a_t) * (1 - a_t / a_{t-1})),

where ``a`` is ``alphas_cumprod`` and the previous timestep is ``t - T / num_inference_steps`` (as
diffusers computes it, whatever the timestep spacing). ``log p`` is averaged, not summed, over all
non-batch dimensions, as SPO (and DDPO before it) does.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape [B] to [B, 1, 1, ...] matching ``like``'s rank."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


def _timesteps_tensor(timestep: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=device).long()
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
    return t


def previous_timestep(scheduler: DDIMScheduler, timestep: torch.Tensor) -> torch.Tensor:
    """The timestep DDIM steps to from ``timestep`` (may be negative after the last step)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) before stepping")
    return timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _alphas(scheduler: DDIMScheduler, timestep: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_cumprod at t and at the previous timestep (final_alpha_cumprod below 0), both [B] float32."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    prev_t = previous_timestep(scheduler, timestep)
    alpha_t = alphas_cumprod[timestep.clamp(0, len(alphas_cumprod) - 1)]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=device, dtype=torch.float32)
    alpha_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final)
    return alpha_t, alpha_prev


def predict_x0_and_eps(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a model output into (x0 prediction, epsilon prediction) for any parameterisation.

    Args:
        model_output: [B, C, H, W] the (guided) UNet output.
        timestep: [B] long timesteps of ``sample``.
        sample: [B, C, H, W] x_t.
        use_clipped_model_output: re-derive epsilon from the clipped/thresholded x0, as diffusers'
            ``DDIMScheduler.step(use_clipped_model_output=True)`` does. Off by default, as in diffusers'
            default and in SPO's sampler and trainer, which never turn it on. Without clipping or
            thresholding in the scheduler's config (SD1.5's) it changes nothing.
    Returns:
        x0_hat, eps_hat, both [B, C, H, W] float32 (x0 clipped/thresholded as the scheduler's config says).
    """
    out = model_output.float()
    x_t = sample.float()
    alpha_t, _ = _alphas(scheduler, timestep, sample.device)
    a = _per_sample(alpha_t, x_t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x_t - (1 - a).sqrt() * out) / a.sqrt()
        eps = out
    elif kind == "sample":
        x0 = out
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
        eps = a.sqrt() * out + (1 - a).sqrt() * x_t
    else:
        raise ValueError(f"prediction_type {kind!r} is not one of epsilon, sample, v_prediction")
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    if use_clipped_model_output and (scheduler.config.thresholding or scheduler.config.clip_sample):
        # diffusers does this only when asked (use_clipped_model_output=True); SPO never asks, so by
        # default the step's direction uses the model's own epsilon even when x0 was clipped.
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    return x0, eps


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} and the log-density of x_{t-1} under that step.

    Args:
        scheduler: a :class:`DDIMScheduler` after ``set_timesteps``.
        model_output: [B, C, H, W] guided UNet output at (sample, timestep).
        timestep: a scalar or [B] per-sample timesteps.
        sample: [B, C, H, W] x_t.
        eta: DDIM stochasticity; must be > 0 for the density to exist (SPO: 1.0).
        prev_sample: [B, C, H, W] a given x_{t-1} to evaluate; drawn from the posterior when ``None``.
        generator: torch generator(s) for the draw.
        use_clipped_model_output: see :func:`predict_x0_and_eps` (off, as in SPO).
    Returns:
        prev_sample: [B, C, H, W] in ``sample``'s dtype.
        log_prob: [B] float32, the Gaussian log-density averaged over C, H, W.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a step with a log-density, got {eta}")
    t = _timesteps_tensor(timestep, sample.shape[0], sample.device)
    x0, eps = predict_x0_and_eps(scheduler, model_output, t, sample, use_clipped_model_output)
    alpha_t, alpha_prev = _alphas(scheduler, t, sample.device)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)  # [B]
    std = _per_sample(eta * variance.clamp(min=0).sqrt(), x0)
    a_prev = _per_sample(alpha_prev, x0)
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    mean = a_prev.sqrt() * x0 + direction  # [B, C, H, W] float32
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev = mean + std * noise
    else:
        prev = prev_sample.float()
    log_prob = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.dim())))
    return prev.to(sample.dtype), log_prob


def ddim_posterior(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the DDIM step x_t -> x_{t-1}, for samplers that draw the noise themselves.

    The same arithmetic as :func:`ddim_step_with_logprob`, so ``mean + std * z`` with z drawn as it draws
    it gives the same x_{t-1} bit for bit.

    Args:
        model_output: [B, C, H, W] guided UNet output at (sample, timestep).
        timestep: a scalar or [B] per-sample timesteps.
        sample: [B, C, H, W] x_t.
    Returns:
        mean: [B, C, H, W] float32; std: [B, 1, 1, 1] float32 (s_t of the module docstring).
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a stochastic step, got {eta}")
    t = _timesteps_tensor(timestep, sample.shape[0], sample.device)
    x0, eps = predict_x0_and_eps(scheduler, model_output, t, sample)
    alpha_t, alpha_prev = _alphas(scheduler, t, sample.device)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)  # [B]
    std = _per_sample(eta * variance.clamp(min=0).sqrt(), x0)
    a_prev = _per_sample(alpha_prev, x0)
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return a_prev.sqrt() * x0 + direction, std


def ddim_step_std(scheduler: DDIMScheduler, timestep: int | torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """s_t of the module docstring for the step leaving each timestep: [n] float32 for [n] (or scalar) ``timestep``.

    The same arithmetic as :func:`ddim_posterior`'s ``std`` (call ``set_timesteps`` first).
    """
    t = torch.as_tensor(timestep).long().reshape(-1)
    alpha_t, alpha_prev = _alphas(scheduler, t, t.device)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    return eta * variance.clamp(min=0).sqrt()
