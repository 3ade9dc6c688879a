"""Statistics over the entries of a tensor where a mask is 1 (completion tokens, kept samples)."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is nonzero (0 when nothing is kept)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the entries where ``mask`` is 1."""
    mask = mask.to(x.dtype)
    return ((x - masked_mean(x, mask)) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over masked entries (nan when the returns do not vary): how much
    of the returns a value function predicts."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask) / var_returns).item()


def nanmean(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Mean over the non-NaN entries (NaN marks a value that is missing, not zero)."""
    valid = ~torch.isnan(x)
    total = torch.where(valid, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / valid.sum()
    return total.sum(dim, keepdim=keepdim) / valid.sum(dim, keepdim=keepdim)


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sample standard deviation (Bessel) over the non-NaN entries; NaN with fewer than two."""
    valid = ~torch.isnan(x)
    mean = nanmean(x, dim, keepdim=True) if dim is not None else nanmean(x)
    squares = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x))
    count = valid.sum() if dim is None else valid.sum(dim, keepdim=keepdim)
    total = squares.sum() if dim is None else squares.sum(dim, keepdim=keepdim)
    return (total / (count - 1)).sqrt()
