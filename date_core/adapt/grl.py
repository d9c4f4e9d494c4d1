"""Gradient reversal (DANN) and its coefficient schedule.

The layer is the identity going forward and multiplies the gradient by ``-coeff`` going
back, so one optimiser step trains a domain discriminator to separate the domains and, at
the same time, the feature extractor to confuse it.
"""
from __future__ import annotations

import math

import torch


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:  # type: ignore[override]
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return -ctx.coeff * grad_output, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity on ``x`` (any shape); its gradient is multiplied by ``-coeff``.

    ``coeff = 0`` stops the gradient to the features (the discriminator still learns).
    """
    if coeff < 0:
        raise ValueError(f"the gradient-reversal coefficient must be >= 0, got {coeff}")
    return _GradientReversal.apply(x, float(coeff))


class GradientReversal(torch.nn.Module):
    """Module form of :func:`grad_reverse` with a settable ``coeff``."""

    def __init__(self, coeff: float = 1.0) -> None:
        super().__init__()
        self.coeff = float(coeff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"


def grl_coefficient(step: int, max_steps: int, schedule: str = "dann", gamma: float = 10.0,
                    max_coeff: float = 1.0) -> float:
    """GRL coefficient after ``step`` optimiser steps of ``max_steps``.

    ``dann``: ``max_coeff * (2 / (1 + exp(-gamma * p)) - 1)`` with progress ``p = step / max_steps``
    (Ganin & Lempitsky, 2015): 0 at the start, when the discriminator's signal is noise, rising
    smoothly to ``max_coeff``. ``constant``: always ``max_coeff``. ``linear``: ``max_coeff * p``.
    Past ``max_steps`` the coefficient stays at its final value.
    """
    if max_steps <= 0:
        raise ValueError(f"grl max_steps must be > 0, got {max_steps}")
    p = min(max(step, 0) / max_steps, 1.0)
    if schedule == "dann":
        return max_coeff * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)
    if schedule == "constant":
        return max_coeff
    if schedule == "linear":
        return max_coeff * p
    raise ValueError(f"unknown GRL schedule {schedule!r}; choose dann, constant or linear")
