"""AttFC head: attention loader (Eq. 8-9), Dynamic Class Container, masked loss
(Alg. 1, Eq. 10-11) and the momentum class encoder (Eq. 12); ARCHITECTURE.md maps each step.

Nothing here is N-sized: memory is the container (S×D), the class encoder and O(B·chunk).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from model.heads.collective import Ranks, all_gather
from model.heads.dcc_ce import masked_dcc_cross_entropy
from model.heads.interface import HeadOptions, HeadOutput
from model.heads.margin_ce import margin_head_output, sample_norms
from model.margins import Margin
from model.names import STRATEGIES, UPDATE_ORDERS
from model.precision import at_least_fp32


def _attention(f: torch.Tensor, K: torch.Tensor) -> torch.Tensor:  # noqa: N803 (paper's K)
    return torch.softmax(F.cosine_similarity(f[:, None, :], K, dim=-1), dim=1)


def _constant(f: torch.Tensor, K: torch.Tensor) -> torch.Tensor:  # noqa: N803
    return K.new_full(K.shape[:2], 1.0 / K.shape[1])


def _single(f: torch.Tensor, K: torch.Tensor) -> torch.Tensor:  # noqa: N803
    alpha = K.new_zeros(K.shape[:2])
    alpha[:, 0] = 1.0
    return alpha


# Name -> α rule; keys are model/names.py's STRATEGIES, in that order (a test checks).
WEIGHTINGS = {"attention": _attention, "constant": _constant, "single": _single}


def check_strategy(strategy: str) -> None:
    """The one check of a GCC strategy name."""
    if strategy not in WEIGHTINGS:
        raise ValueError(f"unknown GCC strategy {strategy!r}: expected one of "
                         f"{', '.join(STRATEGIES)}")


def attention_weights(f: torch.Tensor, K: torch.Tensor,  # noqa: N803 (paper's K)
                      strategy: str = "attention") -> torch.Tensor:
    """α [B, k] for f [B, D] and class features K [B, k, D].

    attention: softmax_k(cos(f, K_j)) (Eq. 8); constant: 1/k (Table 4); single: all weight on
    the first class image (DCQ-style, Table 4 "single image").
    """
    check_strategy(strategy)
    return WEIGHTINGS[strategy](f, K)


def generate_gcc(f: torch.Tensor, K: torch.Tensor,  # noqa: N803 (paper's K)
                 strategy: str = "attention") -> tuple[torch.Tensor, torch.Tensor]:
    """Generative class centre w⁺ = Σ_j α_j K_j (Eq. 9) -> (w⁺ [B, D], α [B, k]).

    K is not normalised; α is returned too because the head logs how much it varies. The sum
    runs in fp32 on every device: autocast would otherwise run it in bf16 (its matmul).
    """
    alpha = attention_weights(f, K, strategy)
    with torch.autocast(K.device.type, enabled=False):
        return torch.einsum("bk,bkd->bd", at_least_fp32(alpha), at_least_fp32(K)), alpha


def dcc_capacity(num_classes: int, sample_rate: float, batch_size: int) -> int:
    """S = r·N rounded *down* to a multiple of B, at least B.

    Rounding down reproduces the paper's W-sizes (Table 2: 93,431 ids, r=0.3, B=384 -> 27,648;
    1,029,950 -> 308,736); a multiple of B means every push writes one contiguous block and the
    oldest B entries are exactly the ones replaced.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return max(batch_size, int(sample_rate * num_classes) // batch_size * batch_size)


class DynamicClassContainer(nn.Module):
    """FIFO queue of S class centres with their labels (−1 = never written).

    Buffers ``centers`` [S, D], ``labels`` [S] and ``ptr`` (next slot) are in ``state_dict()``
    so a resumed run continues the same queue. Rows start random normal, scaled to unit length
    (only directions matter for cos); the head pushes unit GCCs, so logits are plain dot products.
    """

    def __init__(self, capacity: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if capacity < 1 or dim < 1:
            raise ValueError(f"DCC needs capacity >= 1 and dim >= 1, got {capacity}, {dim}")
        self.capacity = capacity
        self.register_buffer("centers", F.normalize(torch.randn(capacity, dim), dim=1).to(dtype))
        self.register_buffer("labels", torch.full((capacity,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, centers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Write n centres over the oldest n entries (FIFO, wrapping); return their slots [n].

        Centres with a non-finite value (a step the trainer is about to skip) leave the
        container as it was, or every later loss over it would be NaN for S/n steps. Stays on
        the device (no host sync): the pointer and that choice are tensors.
        """
        n = centers.shape[0]
        if n > self.capacity:
            raise ValueError(f"cannot push {n} centres into a DCC of capacity {self.capacity}")
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.capacity
        finite = torch.isfinite(centers).all()
        self.centers.index_copy_(0, slots, torch.where(finite, centers.to(self.centers.dtype),
                                                       self.centers[slots]))
        self.labels.index_copy_(0, slots, torch.where(finite, labels.to(self.labels.dtype),
                                                      self.labels[slots]))
        self.ptr.copy_(torch.where(finite, (self.ptr + n) % self.capacity, self.ptr))
        return slots


class AttFCHead(nn.Module):
    """AttFC classification head (the step as pinned in ARCHITECTURE.md, "AttFC").

    Per step: K = C(class images) (no grad); w⁺ = GCC(f, K) detached and pushed into the DCC
    *before* the logits, so each sample's own w⁺ is its positive (Alg. 1, Eq. 10); loss over
    all S entries with same-label conflicts masked. ``update_order="official"`` is the
    authors' released code (MoCo's order): the positive is still cos(f, own w⁺) with the
    margin, but the negatives are the S entries *before* this step's push (the oldest B
    included, the batch's other w⁺ not), and the push follows the loss.
    ``after_optimizer_step`` applies Eq. 12 to parameters and copies the feature encoder's
    buffers (BN running stats) into the class encoder, so C in eval mode is consistent with
    its averaged weights. C runs in the head's mode: in training its BN layers use the
    statistics of the B·k class images, as MoCo's key encoder does (its own running-stat
    updates are then overwritten by the copy).

    On several ranks (``ranks``) every push is the whole global batch: each rank's GCCs and
    labels all-gathered in rank order, so every rank holds the same container, and each rank's
    loss is that of its own samples over the whole container. ``batch_size`` is then the
    global batch, which sizes the container as one process with that batch would.

    A step taken as micro-batches (``begin_step`` … ``end_step``) pushes the whole batch's
    GCCs once, as the single-batch step does: in the paper's order before the first
    micro-batch's loss, from features the step computes first without gradient (``stage``),
    so every micro-batch's negatives hold all of them; in the official order after the last,
    every micro-batch scoring against the container as it was before the step.
    """

    needs_class_images = True
    summed_stats = ("masked_conflicts",)  # counts: across ranks they add up (the rest average)
    weight_rows = None  # no class matrix: every rank holds the whole head

    def __init__(self, feature_encoder: nn.Module, num_classes: int, embedding_size: int,
                 batch_size: int, margin: Margin, sample_rate: float = 0.3, k: int = 2,
                 class_encoder_momentum: float = 0.999, strategy: str = "attention",
                 dcc_dtype: torch.dtype = torch.float32, chunk_size: int = 65536,
                 update_order: str = "paper", ranks: Ranks | None = None) -> None:
        super().__init__()
        self.ranks = ranks if ranks is not None and ranks.world_size > 1 else None
        check_strategy(strategy)
        if update_order not in UPDATE_ORDERS:
            raise ValueError(f"unknown update order {update_order!r}: expected one of "
                             f"{', '.join(UPDATE_ORDERS)}")
        self.update_order = update_order
        if not 0 <= class_encoder_momentum < 1:
            raise ValueError(f"class_encoder_momentum must be in [0, 1), got "
                             f"{class_encoder_momentum}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.class_encoder = copy.deepcopy(feature_encoder).requires_grad_(False)
        self.dcc = DynamicClassContainer(dcc_capacity(num_classes, sample_rate, batch_size),
                                         embedding_size, dtype=dcc_dtype)
        self.num_classes = num_classes
        self.margin = margin
        self.k = k
        self.class_encoder_momentum = class_encoder_momentum
        self.strategy = strategy
        self.chunk_size = chunk_size
        # Decided once: the class encoder is a copy, so it has the feature encoder's layout.
        self._channels_last = _is_channels_last(self.class_encoder)
        # An accumulated step: the pre-pass's (K, own GCCs, labels) per micro-batch (paper
        # order), or the GCCs to push at its end (official order); None between steps.
        self._staged: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._forwards = 0  # micro-batches of the staged step trained so far

    @property
    def stages_features(self) -> bool:
        """Paper order: every micro-batch's negatives include the whole batch's new GCCs,
        which need every micro-batch's features first (official order: the container
        before the push, the same for every micro-batch)."""
        return self.update_order == "paper"

    @classmethod
    def from_options(cls, options: HeadOptions) -> AttFCHead:
        if options.feature_encoder is None:
            raise ValueError("the attfc head needs feature_encoder (copied into the class encoder)")
        return cls(options.feature_encoder, options.num_classes, options.embedding_size,
                   options.batch_size, options.margin, sample_rate=options.sample_rate,
                   k=options.k, class_encoder_momentum=options.class_encoder_momentum,
                   strategy=options.strategy, dcc_dtype=options.dcc_dtype,
                   chunk_size=options.chunk_size, update_order=options.update_order,
                   ranks=options.ranks)

    def encode_classes(self, class_images: torch.Tensor) -> torch.Tensor:
        """C(class images [B, k, 3, H, W]) -> K [B, k, D] fp32, without autograd.

        The "single" strategy encodes only the first class image (k = 1).
        """
        if class_images.dim() < 3 or class_images.shape[1] != self.k:
            raise ValueError(f"class_images must be [B, {self.k}, 3, H, W], "
                             f"got {tuple(class_images.shape)}")
        if self.strategy == "single":
            class_images = class_images[:, :1]
        batch, k = class_images.shape[:2]
        images = class_images.flatten(0, 1)
        if images.dim() == 4 and self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            K = self.class_encoder(images)
        return at_least_fp32(K).view(batch, k, -1)

    def begin_step(self, labels: torch.Tensor) -> None:
        """Micro-batches follow: one push of the whole batch's GCCs for the step."""
        self._staged, self._pending, self._forwards = [], [], 0

    @torch.no_grad()
    def stage(self, features: torch.Tensor, labels: torch.Tensor,
              class_images: torch.Tensor | None) -> None:
        """Paper order, before any loss: a micro-batch's K and GCCs from its features
        (computed without gradient); the first forward pushes every micro-batch's."""
        if class_images is None:
            raise ValueError("the attfc head needs class_images [B, k, 3, H, W]")
        K = self.encode_classes(class_images)
        gcc, _ = generate_gcc(F.normalize(at_least_fp32(features), dim=1), K, self.strategy)
        self._staged.append((K, self._as_stored(gcc), labels))

    def end_step(self) -> None:
        """Official order: the step's GCCs enter the container, all B in one push."""
        if self._pending:
            self._push(torch.cat([own for own, _ in self._pending]),
                       torch.cat([labels for _, labels in self._pending]))
        self._staged = self._pending = None

    def _as_stored(self, gcc: torch.Tensor) -> torch.Tensor:
        """A GCC as the container stores it (unit, its dtype), whichever order uses it."""
        return F.normalize(gcc, dim=1).to(self.dcc.centers.dtype)

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                class_images: torch.Tensor | None = None) -> HeadOutput:
        if class_images is None and not self._staged:
            raise ValueError("the attfc head needs class_images [B, k, 3, H, W]")
        norms, _ = sample_norms(self.margin, features, self.ranks)
        f_unit = F.normalize(at_least_fp32(features), dim=1)
        paper_order = self.update_order == "paper"
        with torch.no_grad():
            if self._staged:  # an accumulated step in the paper's order
                if self._forwards == 0:  # the whole batch's GCCs, before the first loss
                    self._push(torch.cat([gccs for _, gccs, _ in self._staged]),
                               torch.cat([staged for _, _, staged in self._staged]))
                K, own, _ = self._staged[self._forwards]
                self._forwards += 1
                _, alpha = generate_gcc(f_unit, K, self.strategy)
            else:
                K = self.encode_classes(class_images)
                gcc, alpha = generate_gcc(f_unit, K, self.strategy)
                own = self._as_stored(gcc)
                if paper_order:
                    self._push(own, labels)
            class_cos = F.cosine_similarity(f_unit[:, None, :], K, dim=-1)
        positive_cos = (f_unit * own.to(f_unit.dtype)).sum(dim=1)
        loss, masked = masked_dcc_cross_entropy(
            f_unit, self.margin(positive_cos, norms), self.dcc.centers, self.dcc.labels, labels,
            self.margin.scale, self.chunk_size, own_in_container=paper_order)
        if not paper_order:
            if self._pending is None:  # a single-batch step
                self._push(own, labels)
            else:
                self._pending.append((own, labels))
        spread = (alpha.amax(dim=1) - alpha.amin(dim=1)).mean()
        return margin_head_output(loss, self.margin, norms,
                                  {"attention_spread": spread, "masked_conflicts": masked},
                                  class_scores=(alpha, class_cos))

    @torch.no_grad()
    def _push(self, own: torch.Tensor, labels: torch.Tensor) -> None:
        """This step's GCCs into the container: on several ranks, every rank's, in rank order."""
        if self.ranks is not None:
            own, labels = all_gather(own, self.ranks), all_gather(labels, self.ranks)
        self.dcc.push(own, labels)

    @torch.no_grad()
    def after_optimizer_step(self, feature_encoder: nn.Module) -> None:
        """Eq. 12: θ_C ← γ·θ_C + (1−γ)·θ_F for every parameter; buffers are copied from F."""
        c_params = list(self.class_encoder.parameters())
        f_params = list(feature_encoder.parameters())
        c_buffers = list(self.class_encoder.buffers())
        f_buffers = list(feature_encoder.buffers())
        if len(c_params) != len(f_params) or len(c_buffers) != len(f_buffers):
            raise ValueError("feature_encoder does not match the class encoder's architecture")
        if c_params:
            gamma = self.class_encoder_momentum
            torch._foreach_mul_(c_params, gamma)
            torch._foreach_add_(c_params, [p.detach() for p in f_params], alpha=1.0 - gamma)
        if c_buffers:  # one fused launch instead of ~3 per BN layer (r100: ~750)
            torch._foreach_copy_(c_buffers, f_buffers)


def _is_channels_last(module: nn.Module) -> bool:
    """Whether ``module``'s convs are channels-last (then feed it NHWC images)."""
    conv = next((p for p in module.parameters() if p.dim() == 4), None)
    return conv is not None and conv.is_contiguous(memory_format=torch.channels_last) \
        and not conv.is_contiguous()
