"""How SPO's and GradSPO's losses weight the timesteps of SD1.5's 20-step DDIM schedule.

    python bench/timestep_weights.py            # the Markdown table of docs/gradspo.md, and its autograd check

At the start of training (policy = reference = the sampling model, and for GradSPO = the EMA model too),
both losses push the policy's noise prediction eps along -delta, delta = (z_w - z_l) / 2 the half-difference
of the winner's and loser's standard-normal draws. With D = C*H*W and the logit
beta * (log r_w - log r_l):

    SPO:      d logit / d eps = beta / D * (2 c_t / s_t) * delta
    GradSPO:  d logit / d eps = beta / D * (-4 g sqrt(1 - abar_t)) * delta         (g = grad_scale)

where s_t is the DDIM step's standard deviation (eta 1) and c_t = sqrt(1 - abar_prev - s_t^2)
- sqrt(abar_prev) sqrt(1 - abar_t) / sqrt(abar_t) is the weight of eps in the step's mean (negative).
How fast each log ratio moves away from 0 as eps moves by e (and so how soon the clip at 1 +- eps
stops the gradient) is the curvature: SPO c_t^2 / (2 s_t^2) * mean(e^2), GradSPO 1 * mean(e^2).

The script prints those weights from the scheduler's alphas and checks the two gradient weights against
autograd through the project's own ``ddim_step_with_logprob`` + ``spo_loss`` and ``gradspo_loss``.
"""

from __future__ import annotations

import math

import torch

from spotune.diffusion.ddim import ddim_posterior, ddim_step_with_logprob
from spotune.losses import gradspo_loss, spo_loss
from spotune.models.tiny import sd15_ddim_scheduler

STEPS, DIVERT, GRAD_SCALE, BETA = 20, 4, 0.5, 10.0


def analytic(scheduler, t: int) -> dict[str, float]:
    ac = scheduler.alphas_cumprod.double()
    prev = t - scheduler.config.num_train_timesteps // STEPS
    a_t = float(ac[t])
    a_prev = float(ac[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    s = math.sqrt(var)
    c = math.sqrt(max(0.0, 1 - a_prev - var)) - math.sqrt(a_prev) * math.sqrt(1 - a_t) / math.sqrt(a_t)
    return {"abar": a_t, "s": s, "c": c, "spo": 2 * abs(c) / s, "gradspo": 4 * GRAD_SCALE * math.sqrt(1 - a_t),
            "spo_curv": c * c / (2 * var), "gradspo_curv": 1.0}


def autograd(scheduler, t: int, d: int = 64) -> tuple[float, float]:
    """|d logit / d eps| / (beta / D) along delta, measured with the project's loss code (float64 would be
    exact; float32 is what the code runs in)."""
    g = torch.Generator().manual_seed(t)
    x_t = torch.randn(1, d, 1, 1, generator=g)
    eps = torch.randn(1, d, 1, 1, generator=g)
    tt = torch.tensor([t])
    mean, std = ddim_posterior(scheduler, eps, tt, x_t, 1.0)
    z_w, z_l = torch.randn(1, d, 1, 1, generator=g), torch.randn(1, d, 1, 1, generator=g)
    delta = (z_w - z_l) / 2
    x_w, x_l = mean + std * z_w, mean + std * z_l
    # SPO: logit = beta * ((logp_w - logp_w_ref) - (logp_l - logp_l_ref)); loss = -log sigmoid(logit),
    # so at logit 0, d loss / d eps = -(1/2) d logit / d eps.
    e = eps.clone().requires_grad_(True)
    _, lw = ddim_step_with_logprob(scheduler, e, tt, x_t, 1.0, prev_sample=x_w)
    _, ll = ddim_step_with_logprob(scheduler, e, tt, x_t, 1.0, prev_sample=x_l)
    ref_w = ddim_step_with_logprob(scheduler, eps, tt, x_t, 1.0, prev_sample=x_w)[1]
    ref_l = ddim_step_with_logprob(scheduler, eps, tt, x_t, 1.0, prev_sample=x_l)[1]
    spo_loss(lw, ref_w, ll, ref_l, BETA, 0.1)[0].backward()
    spo = float(-2 * (e.grad * delta).sum() / (delta * delta).sum()) / (BETA / d)
    e2 = eps.clone().requires_grad_(True)
    loss, _ = gradspo_loss(e2, eps, eps, delta, scheduler.alphas_cumprod[tt].float(), BETA, 0.1, GRAD_SCALE)
    loss.backward()
    grad = float(-2 * (e2.grad * delta).sum() / (delta * delta).sum()) / (BETA / d)
    return abs(spo), abs(grad)


def main() -> None:
    scheduler = sd15_ddim_scheduler()
    scheduler.set_timesteps(STEPS)
    rows, worst = [], 0.0
    for t in scheduler.timesteps[DIVERT:].tolist():
        w = analytic(scheduler, t)
        spo_ag, grad_ag = autograd(scheduler, t)
        worst = max(worst, abs(spo_ag / w["spo"] - 1), abs(grad_ag / w["gradspo"] - 1))
        rows.append((t, w))
    total_spo = sum(w["spo"] for _, w in rows)
    total_grad = sum(w["gradspo"] for _, w in rows)
    print("| t | abar_t | s_t | SPO 2\\|c_t\\|/s_t | GradSPO 4g sqrt(1-abar_t) | SPO share | GradSPO share | SPO curvature c_t^2/(2 s_t^2) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t, w in rows:
        print(f"| {t} | {w['abar']:.4f} | {w['s']:.4f} | {w['spo']:.3f} | {w['gradspo']:.3f} | "
              f"{100 * w['spo'] / total_spo:.1f}% | {100 * w['gradspo'] / total_grad:.1f}% | {w['spo_curv']:.3f} |")
    print(f"\nautograd through the project's losses agrees with the formulas to {worst:.1e} (relative, float32)")


if __name__ == "__main__":
    main()
