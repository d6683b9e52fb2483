"""ddim_step_with_logprob against the closed-form Gaussian density and diffusers' own DDIM step."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from spotune.diffusion.ddim import ddim_step_with_logprob, predict_x0_and_eps
from spotune.models.tiny import sd15_ddim_scheduler


def _scheduler(prediction_type: str = "epsilon", steps: int = 20) -> DDIMScheduler:
    s = DDIMScheduler.from_config(sd15_ddim_scheduler().config, prediction_type=prediction_type)
    s.set_timesteps(steps)
    return s


def _closed_form(s: DDIMScheduler, eps: torch.Tensor, t: int, x: torch.Tensor, prev: torch.Tensor, eta: float):
    """The DDIM posterior written out for a single timestep, epsilon parameterisation."""
    ac = s.alphas_cumprod.double()
    t_prev = t - 1000 // s.num_inference_steps
    a_t = ac[t]
    a_prev = ac[t_prev] if t_prev >= 0 else torch.as_tensor(s.final_alpha_cumprod).double()
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * var.sqrt()
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps.double()
    density = -((prev.double() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return density.mean(dim=(1, 2, 3)), mean


@pytest.mark.parametrize("t", [951, 501, 1])
def test_log_prob_matches_closed_form(t):
    s = _scheduler()
    g = torch.Generator().manual_seed(0)
    x, eps, prev = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    _, logp = ddim_step_with_logprob(s, eps, t, x, eta=1.0, prev_sample=prev)
    expected, _ = _closed_form(s, eps, t, x, prev, 1.0)
    torch.testing.assert_close(logp.double(), expected, rtol=1e-4, atol=1e-4)


def test_sampled_prev_is_mean_plus_std_noise_and_density_is_highest_at_mean():
    s = _scheduler()
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    _, mean = _closed_form(s, eps, 501, x, x, 1.0)
    _, logp_mean = ddim_step_with_logprob(s, eps, 501, x, 1.0, prev_sample=mean.float())
    prev, logp_sample = ddim_step_with_logprob(s, eps, 501, x, 1.0, generator=torch.Generator().manual_seed(5))
    assert (logp_mean > logp_sample).all()
    # Averaged over dimensions, a draw sits half a nat below the peak in expectation.
    assert torch.allclose(logp_mean - logp_sample, torch.full_like(logp_mean, 0.5), atol=0.1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prev_sample_equals_diffusers_step(prediction_type):
    s = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in (951, 451, 1):
        ours, _ = ddim_step_with_logprob(s, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
        theirs = s.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        x0, _ = predict_x0_and_eps(s, out, torch.full((2,), t), x)
        torch.testing.assert_close(x0, s.step(out, t, x, eta=0.0).pred_original_sample, rtol=1e-5, atol=1e-5)


def test_per_sample_timesteps_equal_one_call_per_timestep():
    s = _scheduler()
    g = torch.Generator().manual_seed(3)
    x, eps, prev = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    ts = torch.tensor([951, 451, 1])
    _, joint = ddim_step_with_logprob(s, eps, ts, x, 1.0, prev_sample=prev)
    for i, t in enumerate(ts.tolist()):
        _, single = ddim_step_with_logprob(s, eps[i : i + 1], t, x[i : i + 1], 1.0, prev_sample=prev[i : i + 1])
        torch.testing.assert_close(joint[i : i + 1], single)


def test_log_prob_is_differentiable_in_the_model_output():
    s = _scheduler()
    x, prev = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    _, logp = ddim_step_with_logprob(s, eps, 501, x, 1.0, prev_sample=prev)
    logp.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0


def test_bad_arguments():
    s = _scheduler()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(s, x, 501, x, eta=0.0)
    with pytest.raises(ValueError, match="timestep"):
        ddim_step_with_logprob(s, x, torch.tensor([1, 2, 3]), x, eta=1.0)


@pytest.mark.parametrize("use_clipped", [False, True])
def test_clipped_x0_follows_diffusers_use_clipped_model_output(use_clipped):
    """With clip_sample on, epsilon is re-derived from the clipped x0 only when asked, as in diffusers."""
    s = DDIMScheduler.from_config(sd15_ddim_scheduler().config, clip_sample=True, clip_sample_range=0.5)
    s.set_timesteps(20)
    g = torch.Generator().manual_seed(4)
    x, out = 3 * torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = 451
    _, eps_model = predict_x0_and_eps(s, out, torch.full((2,), t), x)
    torch.testing.assert_close(eps_model, out)  # the default (SPO's): the model's own epsilon
    ours, _ = ddim_step_with_logprob(s, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7),
                                     use_clipped_model_output=use_clipped)
    theirs = s.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7),
                    use_clipped_model_output=use_clipped).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    other, _ = ddim_step_with_logprob(s, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(7),
                                      use_clipped_model_output=not use_clipped)
    assert not torch.allclose(other, theirs, atol=1e-3)  # the clip is active here, so the choice matters
