"""Masked, chunked softmax cross-entropy over the Dynamic Class Container (Eq. 10-11, Alg. 1).

The B×S logit matrix is never materialised: one pass over the container in chunks keeps a
running log-sum-exp of the negatives and, at the same time, the softmax-weighted sum of the
centres, which *is* ∂L/∂f (Eq. 11). So forward costs one B×S×D matmul pass for the loss and one
for the gradient, backward only rescales, and extra memory is O(B·chunk + B·D), independent of
S. No gradient flows to the container (GCCs are generated, not learned, Eq. 11).
"""

from __future__ import annotations

import torch


def _chunk_negative_logits(f_unit: torch.Tensor, block: torch.Tensor, block_labels: torch.Tensor,
                           labels: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s·cos for one chunk with every entry of the sample's own label set to −inf.

    That mask covers the conflicts w_cft⁺ (Alg. 1) *and* the sample's own w⁺ slot (its label
    was just written there), which enters the softmax separately as the margin logit. Returns
    the logits [B, c] and how many entries were masked (own slots included).
    """
    logits = torch.mm(f_unit, block.t()).mul_(scale)
    same_label = block_labels[None, :] == labels[:, None]
    logits.masked_fill_(same_label, float("-inf"))
    return logits, torch.count_nonzero(same_label)


class _MaskedDccCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f_unit: torch.Tensor, positive_logit: torch.Tensor, centers: torch.Tensor,
                center_labels: torch.Tensor, labels: torch.Tensor, scale: float,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        batch = f_unit.shape[0]
        with torch.autocast(device_type=f_unit.device.type, enabled=False):
            f_unit = f_unit.float()
            positive_logit = positive_logit.float()
            run_max = f_unit.new_full((batch,), float("-inf"))
            run_sum = f_unit.new_zeros(batch)
            weighted = f_unit.new_zeros(f_unit.shape) if need_grad else None
            masked = torch.zeros((), dtype=torch.long, device=f_unit.device)
            for start in range(0, centers.shape[0], chunk_size):
                block = centers[start:start + chunk_size].float()
                logits, same = _chunk_negative_logits(
                    f_unit, block, center_labels[start:start + chunk_size], labels, scale)
                masked += same
                new_max = torch.maximum(run_max, logits.amax(dim=1))
                shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                rescale = torch.exp(run_max - shift)
                probs = logits.sub_(shift[:, None]).exp_()  # unnormalised, relative to shift
                run_sum = run_sum * rescale + probs.sum(dim=1)
                if weighted is not None:
                    weighted.mul_(rescale[:, None]).addmm_(probs, block)
                run_max = new_max
            negative_lse = run_max + torch.log(run_sum)
            lse = torch.logaddexp(negative_lse, positive_logit)
            loss = (lse - positive_logit).mean()
            if weighted is not None:
                # Σ_j p_j⁻ · s · w_j⁻ (Eq. 11, negatives part) and p⁺ for the positive logit.
                grad_f = weighted.mul_((torch.exp(run_max - lse) * scale / batch)[:, None])
                grad_positive = (torch.exp(positive_logit - lse) - 1.0) / batch
                ctx.save_for_backward(grad_f, grad_positive)
            masked -= batch  # every sample's own w⁺ slot is not a conflict
        ctx.mark_non_differentiable(masked)
        return loss, masked

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_masked: torch.Tensor):
        grad_f, grad_positive = ctx.saved_tensors
        return grad_f * grad_loss, grad_positive * grad_loss, None, None, None, None, None


def masked_dcc_cross_entropy(f_unit: torch.Tensor, positive_logit: torch.Tensor,
                             centers: torch.Tensor, center_labels: torch.Tensor,
                             labels: torch.Tensor, scale: float,
                             chunk_size: int = 32768) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10 over all S container entries; returns (mean loss, number of masked conflicts).

    f_unit [B, D]: unit identity features; positive_logit [B]: margin logit s·ψ(θ) of each
    sample's own w⁺, which must already be in the container with label labels[i] (push before
    the loss); centers [S, D] unit rows in any float dtype (the math is fp32); center_labels
    [S] (−1 = empty); labels [B]. Negatives are s·cos(f_i, w_j) for every j whose label differs
    from labels[i]; same-label entries other than the own w⁺ are the masked conflicts (Alg. 1).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _MaskedDccCrossEntropy.apply(f_unit, positive_logit, centers, center_labels, labels,
                                        float(scale), int(chunk_size))
