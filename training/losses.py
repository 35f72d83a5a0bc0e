"""Metric-learning loss used alongside cross-entropy."""

from __future__ import annotations

import torch


def supervised_contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020, the L_out form) over one batch.

    Args:
        embeddings: (B, D) L2-normalised embeddings.
        labels: (B,) int class per row.
        temperature: softmax temperature.

    Returns:
        Scalar loss averaged over anchors that have at least one positive in the batch (0 when none has).
    """
    b = embeddings.shape[0]
    logits = embeddings.float() @ embeddings.float().T / temperature
    self_mask = torch.eye(b, dtype=torch.bool, device=embeddings.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return embeddings.sum() * 0.0
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0.0).sum(dim=1)[has_pos] / n_pos[has_pos]
    return -mean_log_prob_pos.mean()
