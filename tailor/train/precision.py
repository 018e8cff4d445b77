"""The dtype a training step computes in."""

from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matrix products on t's device run in: autocast's (bf16 in training) where it is on,
    else t's own. For hand-written autograd functions, whose backward runs outside autocast."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype
