"""Masked, chunked softmax cross-entropy over the Dynamic Class Container (Eq. 10-11, Alg. 1).

The B×S logit matrix is never materialised: one pass over the container in chunks sums the
negatives' exp-logits and, in the same pass, the exp-weighted sum of the centres, which *is*
∂L/∂f (Eq. 11). So the forward costs one B×S×D matmul for the loss and one for the gradient,
backward only rescales, and extra memory is O(B·chunk + B·D), independent of S. No gradient
flows to the container (GCCs are generated, not learned, Eq. 11).

Unit rows bound every logit to [−s, s]. When S·e^s fits fp32 (s + ln S < 80, e.g. s = 64 for
any realistic S) the exponentials are summed without a max shift, which saves two passes over
each chunk; otherwise a running max (online log-sum-exp) keeps them in range.
"""

from __future__ import annotations

import math

import torch

from model.precision import at_least_fp32

_EXP_LIMIT = 80.0  # fp32 exp overflows at ~88.7; keep headroom for non-unit rounding


class _MaskedDccCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f_unit: torch.Tensor, positive_logit: torch.Tensor, centers: torch.Tensor,
                center_labels: torch.Tensor, labels: torch.Tensor, scale: float,
                chunk_size: int, own_in_container: bool) -> tuple[torch.Tensor, torch.Tensor]:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        batch, size = f_unit.shape[0], centers.shape[0]
        unshifted = scale + math.log(size) < _EXP_LIMIT
        with torch.autocast(device_type=f_unit.device.type, enabled=False):
            f_scaled = at_least_fp32(f_unit) * scale
            positive_logit = positive_logit.to(f_scaled.dtype)
            run_max = f_scaled.new_zeros(batch) if unshifted else f_scaled.new_full(
                (batch,), float("-inf"))
            run_sum = f_scaled.new_zeros(batch)
            weighted = f_scaled.new_zeros(f_scaled.shape) if need_grad else None
            masked = torch.zeros((), dtype=torch.long, device=f_unit.device)
            for start in range(0, size, chunk_size):
                block = centers[start:start + chunk_size].to(f_scaled.dtype)
                logits = torch.mm(f_scaled, block.t())
                # Same label as the sample: the conflicts w_cft⁺ (Alg. 1) *and* its own w⁺
                # slot, which enters separately below as the margin logit.
                same = center_labels[start:start + chunk_size][None, :] == labels[:, None]
                masked += torch.count_nonzero(same)
                if unshifted:
                    probs = logits.exp_().masked_fill_(same, 0.0)
                    run_sum += probs.sum(dim=1)
                    if weighted is not None:
                        weighted.addmm_(probs, block)
                    continue
                logits.masked_fill_(same, float("-inf"))
                new_max = torch.maximum(run_max, logits.amax(dim=1))
                shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                rescale = torch.exp(run_max - shift)
                probs = logits.sub_(shift[:, None]).exp_()
                run_sum = run_sum * rescale + probs.sum(dim=1)
                if weighted is not None:
                    weighted.mul_(rescale[:, None]).addmm_(probs, block)
                run_max = new_max
            lse = torch.logaddexp(run_max + torch.log(run_sum), positive_logit)
            loss = (lse - positive_logit).mean()
            if weighted is not None:
                # Σ_j p_j⁻·s·w_j⁻ (Eq. 11, negatives) and p⁺ − 1 for the positive logit.
                grad_f = weighted.mul_((torch.exp(run_max - lse) * scale / batch)[:, None])
                grad_positive = (torch.exp(positive_logit - lse) - 1.0) / batch
                ctx.save_for_backward(grad_f, grad_positive)
            if own_in_container:
                masked -= batch  # every sample's own w⁺ slot is not a conflict
        ctx.mark_non_differentiable(masked)
        return loss, masked

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_masked: torch.Tensor):
        grad_f, grad_positive = ctx.saved_tensors
        return (grad_f * grad_loss, grad_positive * grad_loss, None, None, None, None, None,
                None)


def masked_dcc_cross_entropy(f_unit: torch.Tensor, positive_logit: torch.Tensor,
                             centers: torch.Tensor, center_labels: torch.Tensor,
                             labels: torch.Tensor, scale: float,
                             chunk_size: int = 65536, *, own_in_container: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10 over all S container entries; returns (mean loss, number of masked conflicts).

    f_unit [B, D]: unit identity features; positive_logit [B]: margin logit s·ψ(θ) of each
    sample's own w⁺, by default already in the container with label labels[i] (push before
    the loss); centers [S, D] unit rows in any float dtype (the math is fp32); center_labels
    [S] (−1 = empty); labels [B]. Negatives are s·cos(f_i, w_j) for every j whose label differs
    from labels[i]; same-label entries other than the own w⁺ are the masked conflicts (Alg. 1).
    ``own_in_container=False``: the own w⁺ is not in ``centers`` (loss before the push, the
    official code's order), so every same-label entry counts as a conflict.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _MaskedDccCrossEntropy.apply(f_unit, positive_logit, centers, center_labels, labels,
                                        float(scale), int(chunk_size), bool(own_in_container))
