"""The preference-model loss of PickScore and SPO's step-aware model, as a pure function."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def spm_pair_loss(
    text_features: torch.Tensor,
    image_0_features: torch.Tensor,
    image_1_features: torch.Tensor,
    logit_scale: torch.Tensor,
    label_0: torch.Tensor,
    label_1: torch.Tensor,
    num_pairs: torch.Tensor,
    weight_total: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Two-way cross-entropy of the pair's CLIP scores against the human labels.

    For each pair, with unit vectors ``u`` (text) and ``v0``, ``v1`` (images) and ``s = exp(logit_scale)``::

        p      = softmax([s * <u, v0>, s * <u, v1>])
        loss_i = -(label_0 * log p_0 + label_1 * log p_1) + [tie] * log 0.5
        loss   = sum_i w_i * loss_i / sum_i w_i,      w_i = 1 / num_pairs_i

    The ``log 0.5`` term (``-log 2``) makes a perfectly judged tie (p = 0.5, 0.5) cost 0, as a perfectly
    judged decisive pair does. The weights stop captions with many judgements from dominating.

    Args:
        text_features: [B, D] projected text features (normalised here).
        image_0_features, image_1_features: [B, D] projected image features (normalised here).
        logit_scale: scalar, the log of the temperature (CLIP's ``logit_scale`` parameter).
        label_0, label_1: [B] 1/0, 0/1 or 0.5/0.5; 0/0 for a kept unlabelled row, whose term is the
            constant log 0.5 (no gradient; its weight still counts in the normalisation, as in SPO).
        num_pairs: [B] how many pairs the dataset holds for each example's caption.
        weight_total: the sum of weights to normalise by; ``None`` uses this batch's sum. Data-parallel
            training passes the mean over processes of each process's sum, so the gradient DDP averages
            is the gradient of the loss normalised over the global batch.
    Returns:
        loss: scalar.
        stats: detached ``accuracy`` (decisive pairs whose preferred image scores higher; nan when none)
        and ``prob_preferred`` (mean p of the preferred image over decisive pairs).
    """
    u = F.normalize(text_features.float(), dim=-1)
    v0 = F.normalize(image_0_features.float(), dim=-1)
    v1 = F.normalize(image_1_features.float(), dim=-1)
    scale = logit_scale.float().exp()
    logits = scale * torch.stack([(u * v0).sum(-1), (u * v1).sum(-1)], dim=-1)  # [B, 2]
    log_p = torch.log_softmax(logits, dim=-1)  # [B, 2]
    label_0, label_1 = label_0.float(), label_1.float()
    is_tie = (label_0 == label_1).float()
    per_pair = -(label_0 * log_p[:, 0] + label_1 * log_p[:, 1]) + is_tie * math.log(0.5)  # [B]
    weights = 1.0 / num_pairs.float()
    total = weights.sum() if weight_total is None else weight_total
    loss = (weights * per_pair).sum() / total

    with torch.no_grad():
        decisive = is_tie == 0
        preferred = (label_1 > label_0).long()  # 0 or 1
        p_pref = log_p.exp().gather(1, preferred[:, None])[:, 0]
        if decisive.any():
            accuracy = (p_pref[decisive] > 0.5).float().mean()
            prob = p_pref[decisive].mean()
        else:
            accuracy = prob = torch.tensor(float("nan"), device=loss.device)
    return loss, {"accuracy": accuracy, "prob_preferred": prob}
