"""Dropout that draws where it drops instead of a coin per element.

``torch.nn.Dropout`` draws one Bernoulli variable per element, and keeps a float mask of the input's
size for the backward pass. LoRA applies a dropout to the input of every adapted layer, so on a CPU
that is a sizeable share of a training step. The gaps between the dropped elements of independent
Bernoulli(p) trials are independent geometric variables, so drawing about ``p * n`` of them gives
exactly the same distribution of masks for a fraction of the random numbers, and the backward pass
keeps only the dropped positions. The masks themselves differ from ``torch.nn.Dropout``'s for the
same seed (other numbers are drawn), as any change of the order of draws would.
"""

from __future__ import annotations

import math

import torch


def dropped_positions(numel: int, p: float, device=None) -> torch.Tensor:
    """Sorted flat indices of the dropped elements: each of ``numel`` dropped with probability
    ``p``, independently (cumulated geometric gaps: trial k is dropped when a gap ends there)."""
    expected = numel * p
    # Enough gaps to pass the end in all but about one draw in 10^9; else draw more.
    count = int(expected + 6.0 * math.sqrt(expected) + 16)
    ends = torch.empty(count, dtype=torch.float64, device=device).geometric_(p).cumsum(0)
    while ends[-1] < numel:
        more = torch.empty(count, dtype=torch.float64, device=device).geometric_(p).cumsum(0)
        ends = torch.cat([ends, more + ends[-1]])
    return ends[ends <= numel].long() - 1


class _DropAt(torch.autograd.Function):
    """``x * scale`` with the given flat positions zeroed; the gradient is masked the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return _scaled_zeroed(x, positions, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        return _scaled_zeroed(grad, positions, ctx.scale), None, None


def _scaled_zeroed(x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.mul(x, scale, out=out)
    out.view(-1).index_fill_(0, positions, 0.0)
    return out


class GapDropout(torch.nn.Dropout):
    """``torch.nn.Dropout`` (the same p, the same distribution of masks, identity in eval mode),
    drawn as gaps between dropped elements."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        positions = dropped_positions(x.numel(), self.p, device=x.device)
        return _DropAt.apply(x, positions, 1.0 / (1.0 - self.p))


def use_gap_dropout(model: torch.nn.Module) -> int:
    """Replace every plain ``torch.nn.Dropout`` with p > 0 inside ``model`` (LoRA's among them) by a
    :class:`GapDropout` of the same p; returns how many were replaced. Dropout has no weights, so
    checkpoints and adapters are unchanged."""
    plain = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Dropout and child.p > 0
    ]
    for parent, name, child in plain:
        gap = GapDropout(child.p)
        gap.train(child.training)
        setattr(parent, name, gap)
    return len(plain)
