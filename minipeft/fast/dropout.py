"""Dropout drawn four elements per random number: the fast twin of core/model.py's `dropout` (F.dropout).

    y = x · m / (1 − p'),   m_i = 1 if u_i ≥ round(p · 2¹⁵) else 0,   u_i uniform in [0, 2¹⁵)

The same function as F.dropout (Srivastava et al. 2014), drawn faster. PyTorch's CPU dropout asks its
Mersenne Twister for one random number per element, which costs more than the matmuls around it (a fifth
of a MiniLM LoRA step). Here one 64-bit draw serves four elements: each gets 15 of its bits, a uniform
integer u in [0, 2¹⁵), and is kept when u ≥ round(p · 2¹⁵). So the drop rate is p rounded to a multiple
of 2⁻¹⁵ (0.1 → 0.100006), p' above, and the scale uses that rate, keeping the expectation exact. Like
F.dropout on the CPU, the mask is a tensor in x's dtype, kept for backward when x needs a gradient.
"""
import math

import torch


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """x with each element zeroed with probability ≈ p and the others scaled by 1/(1 − p'); x itself in
    eval mode (training False) or with p = 0."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    return x * dropout_mask(x.shape, p, x.dtype, x.device)


def dropout_mask(shape, p: float, dtype, device) -> torch.Tensor:
    """A tensor of `shape`: 0 with probability p' = round(p · 2¹⁵) / 2¹⁵, else 1 / (1 − p')."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 random bits each
    # four 16-bit pieces per word; the top bit of each piece is dropped (the word's top bit is always 0)
    bits = words.view(torch.int16)[:n].view(shape).bitwise_and_(0x7FFF)  # uniform in [0, 2^15)
    cut = round(p * 2**15)
    return bits.ge(cut).to(dtype).mul_(2**15 / (2**15 - cut))
