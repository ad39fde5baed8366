"""Where each token sits and which keys it sees: rotary position embeddings (RoPE), the positions of tokens after a
KV cache or a method's virtual tokens, and the attention mask (causal, sliding window, padding, packed documents).
"""
import math

import torch
import torch.nn.functional as F

from .families import ModelConfig


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The rotation speeds (rotary_dim/2,) of rotate-half RoPE: pair j turns by theta^(-2j/rotary_dim) per position.
    Scaled RoPE slows them for long contexts: "linear" divides every speed by `factor`; "llama3" (Llama 3.1) divides
    only the slow ones (wavelength > original / low_freq_factor), keeps the fast ones (< original / high_freq_factor)
    and blends linearly in between."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    kept = ((scaling["original_max_position_embeddings"] / wavelength - low) / (high - low)).clamp(0, 1)
    return (1 - kept) * inv_freq / factor + kept * inv_freq


def rope_tables(rotary_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None):
    """cos/sin tables (max_seq_len, rotary_dim) for rotate-half rotary embeddings (Su et al. 2021)."""
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32),
                         rope_inv_freq(rotary_dim, theta, scaling))  # (S, rotary_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, rotary_dim): both halves rotate by the same angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd) rotated pairwise: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), halves paired. With tables
    narrower than hd (partial RoPE, Phi-3) only the first cos.shape[-1] dimensions turn."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the tables are fp32; bf16 activations stay bf16
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def token_positions(model, idx, past: int, T: int, position_ids, with_prompt: bool):
    """Each token's position: past, past + 1, ... (T,), or per row (B, T) from position_ids, which count a sequence's
    own tokens (packed rows restart them; left-padded rows skip the padding). RoBERTa (pos_offset) counts only the
    tokens of idx (B, T) that are not its pad id, as transformers does (its padding takes -1: row padding_idx)."""
    if model.cfg.pos_offset and position_ids is None and not with_prompt:
        real = (idx != model.cfg.pad_token_id).long()  # (B, T)
        return (past + real.cumsum(1)) * real - 1  # (B, T): past, past + 1, ... on tokens; -1 on padding
    if position_ids is None:
        return torch.arange(past, past + T, device=idx.device)
    positions = position_ids + model.virtual_tokens  # the method's virtual tokens (prefix, soft prompt) first
    if with_prompt:  # this call inserts the soft prompt: its tokens take the positions before the text
        at, soft = model.prompt.insert_at, torch.arange(model.prefix_length, model.virtual_tokens, device=idx.device)
        positions = torch.cat([positions[:, :at], soft.expand(len(positions), -1), positions[:, at:]], dim=1)
    if int(positions.max()) >= model.cfg.max_seq_len:
        raise ValueError(f"position {int(positions.max())} is beyond the model's {model.cfg.max_seq_len} "
                         "positions; use a shorter --max-len")
    return positions


def rope_at(model, positions, window):
    """(cos, sin) at these positions, (T, rotary_dim) each, or (B, 1, T, rotary_dim) for per-row positions (B, T):
    a sliding layer's own RoPE where the family has one (Gemma 3), else the global one; None without RoPE."""
    if model.cfg.positions != "rope":
        return None
    name = "rope_local" if window is not None and model.cfg.rope_local_theta else "rope"
    cos, sin = getattr(model, f"{name}_cos")[positions], getattr(model, f"{name}_sin")[positions]
    return (cos[:, None], sin[:, None]) if positions.dim() == 2 else (cos, sin)


def attention_mask_for(cfg: ModelConfig, attention_mask, T: int, past: int, window, document_ids, device):
    """Boolean (B or 1, 1, T, past + T) mask where True = may attend, or None when SDPA's own causal path (or no
    mask at all) gives the same answer. `past` keys (cached tokens or prefix virtual tokens) come before the T
    current ones and are always real. A sliding `window` hides keys window or more positions back; `document_ids`
    (B, T) (packed rows) hide other documents' tokens."""
    if attention_mask is not None and not attention_mask.is_meta and bool(attention_mask.all()):
        attention_mask = None  # no padding: as if no mask was given, so SDPA takes its fast path
    total = past + T
    windowed = window is not None and total > window  # some query has a key out of its reach
    if attention_mask is None and document_ids is None and not windowed and (not cfg.causal or past == 0):
        return None
    allowed = torch.ones(T, total, dtype=torch.bool, device=device)
    if cfg.causal:
        allowed = allowed.tril(diagonal=past)  # query i (position past+i) sees keys <= past+i
    if windowed:
        allowed = allowed.triu(diagonal=past - window + 1)  # ... and keys > past+i - window
    allowed = allowed[None, None]  # (1, 1, T, total)
    if document_ids is not None:
        same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
        allowed = allowed & F.pad(same, (past, 0), value=True)[:, None]  # (B, 1, T, total)
    if attention_mask is not None:
        keys_real = F.pad(attention_mask.bool(), (past, 0), value=True)[:, None, None, -total:]
        allowed = allowed & keys_real  # (B, 1, T, total)
        # a query that sees no key (causal left padding) would give NaN; seeing itself keeps it finite and changes
        # no real token's output (a padding query of an encoder sees the real tokens, as in transformers)
        itself = torch.zeros(T, total, dtype=torch.bool, device=device)
        itself[torch.arange(T), past + torch.arange(T)] = True
        allowed = allowed | (itself & ~allowed.any(-1, keepdim=True))
    return allowed
