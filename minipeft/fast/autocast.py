"""Autocast as the fast twins need it: their matmuls run in the dtype autocast would choose, with autocast
itself switched off around them (fast/nf4.py's Linear4bit forward, fast/losses.py's tiled loss)."""
import contextlib

import torch


def autocast_off(device_type: str):
    """A context with autocast off on this device type (nothing to switch off where autocast does not exist,
    e.g. on the meta device)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's when autocast is on for x's device, else x's own."""
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # not on "meta"
    return torch.get_autocast_dtype(device) if autocast else x.dtype
