"""4-bit NormalFloat (NF4) and FP4 quantization with double quantization: the frozen base of QLoRA.

QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023),
https://arxiv.org/abs/2305.14314. The base weights are stored in 4 bits and dequantized for every
matmul; only the LoRA matrices on top of them are trained (qlora.py, method "qlora").

    w (out, in) ──flatten──► (n,) ──split into blocks of 64──► (n/64, 64)
        absmax_b = max |w| in block b                                        (n/64,) fp32
        q_i      = index of the code-book value nearest to w_i / absmax_b    (n,)    4-bit
        packed   = two codes per byte, first element in the high nibble      (n/2,)  uint8
    w_hat_i = code[q_i] · absmax_b

Code books (16 values in [-1, 1]; the 4-bit code q is an index into the table)
    nf4  NormalFloat: weights are roughly N(0, σ²), so put the 16 values at quantiles of N(0, 1) — each
         bin then holds about the same share of weights. Quantiles 0 and 1 are ±∞, so the outermost
         quantile used is δ = ½·((1 − 1/(2·15)) + (1 − 1/(2·16))) ≈ 0.9677083. An exact zero matters
         (padding, pruned weights), and 16 values cannot be symmetric around one, so NF4 is asymmetric:
         8 positive values Φ⁻¹(p) and 7 negative ones −Φ⁻¹(p), p evenly spaced from δ down to (not
         incl.) ½, and 0; sorted and divided by the largest:
             -1, -0.696, -0.525, -0.395, -0.284, -0.185, -0.091, 0, 0.080, 0.161, 0.246, 0.338, 0.441,
             0.563, 0.723, 1
    fp4  bitsandbytes' 4-bit float: sign bit, then 3 bits for magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3}
         (bit patterns 000…111), all divided by 12. Not sorted; 0b0000 decodes to 0 and 0b1000 to -0.

Double quantization (QLoRA §3): the fp32 absmax values cost 32/64 = 0.5 bit per weight. Quantize them too:
subtract their mean (they are all positive, so centering uses the signed 8-bit range fully), then quantize
them to 8 bits with bitsandbytes' *dynamic* code map, in blocks of 256 with one fp32 scale per block.
Bits per weight (block size 64): 4 + 32/64 = 4.5 without, 4 + 8/64 + 32/(64·256) ≈ 4.127 with it.

Bit-exact with bitsandbytes 0.50's CPU `quantize_4bit` (packed codes and state; tests/test_quant.py), its
corner cases kept on purpose and marked "bnb:" below; dequantization is code[q]·absmax exactly.
This file is written to be read; minipeft/fast/nf4.py is its fast twin (the same bits, several times
faster, no dequantized weight kept for backward), swapped in by `minipeft.fast.enable()`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32 … 4096: the sizes bitsandbytes accepts
DOUBLE_QUANT_BLOCKSIZE = 256  # absmax values per block in double quantization


# ----------------------------------------------------------------------------------------- code books

def normal_float_code(offset: float = 0.9677083) -> torch.Tensor:
    """The NF4 code book (16,): quantiles of N(0, 1), 8 positive, 7 negative and an exact zero, in [-1, 1].

    The quantile levels are fp32 (as torch.linspace makes them), Φ⁻¹ is evaluated in fp64, and the result
    is rounded to fp32 before normalizing — which reproduces bitsandbytes' table bit for bit."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # (8,) largest first
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # (7,)
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code map (256,), sorted, in [-1, 1] (Dettmers 2015,
    https://arxiv.org/abs/1511.04561): for decade e = 0 … 6 it holds the 2^e midpoints of an even split of
    [0.1, 1] scaled by 10^(e-6), both signs (2 · 127 values), plus 0 and 1. Small magnitudes get few
    values, large ones many: a float with a variable-length exponent."""
    magnitudes = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1)  # fp32
        magnitudes.append(10.0 ** (e - 6) * (edges[:-1] + edges[1:]) / 2)  # (2^e,)
    positive = torch.cat(magnitudes)  # (127,)
    return torch.cat([-positive, positive, torch.tensor([0.0, 1.0])]).sort().values


NF4_CODE = normal_float_code()  # (16,) code q -> value; sorted, so q is also the rank
FP4_CODE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12  # (16,)
DYNAMIC_CODE = dynamic_code()  # (256,)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


# ------------------------------------------------------------------------------------ quantized state

@dataclass
class QuantState:
    """Everything besides the packed codes that `dequantize_4bit` needs.

    Either `absmax` (plain) or the four `absmax_*` fields (double quantization) are set.
    `absmax_code_map` is the constant `DYNAMIC_CODE`; like the NF4 table it is part of the format, so
    `to_dict` leaves it out and a saved layer does not pay 1 KB for it."""
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    absmax: torch.Tensor | None = None  # (n_blocks,) fp32
    absmax_codes: torch.Tensor | None = None  # (n_blocks,) uint8: dynamic-code indices of absmax − offset
    absmax_scales: torch.Tensor | None = None  # (n_groups,) fp32: absmax of each 256 of (absmax − offset)
    absmax_offset: torch.Tensor | None = None  # () fp32: mean of absmax
    absmax_code_map: torch.Tensor | None = None  # (256,) fp32: DYNAMIC_CODE

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_absmax(self) -> torch.Tensor:
        """(n_blocks,) fp32 absmax of every block; double-quantized, dynamic[c_b] · scale_(b // 256) + mean."""
        if not self.double_quant:
            return self.absmax
        group = torch.arange(len(self.absmax_codes), device=self.absmax_codes.device) // DOUBLE_QUANT_BLOCKSIZE
        return self.absmax_code_map[self.absmax_codes.long()] * self.absmax_scales[group] + self.absmax_offset

    @staticmethod
    def tensor_names(double_quant: bool) -> tuple[str, ...]:
        return ("absmax_codes", "absmax_scales", "absmax_offset") if double_quant else ("absmax",)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of this state by name (what `Linear4bit` keeps as buffers)."""
        return {name: getattr(self, name) for name in self.tensor_names(self.double_quant)}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], shape, dtype: torch.dtype, quant_type: str,
                  blocksize: int) -> "QuantState":
        """Inverse of `to_dict`; the metadata (shape, dtype, format) is passed alongside the tensors."""
        state = cls(torch.Size(shape), dtype, quant_type, blocksize, **tensors)
        if state.double_quant:
            state.absmax_code_map = DYNAMIC_CODE.to(state.absmax_codes.device)
        return state


# ------------------------------------------------------------------------------------ pure functions

def check_format(quant_type: str, blocksize: int):
    """ValueError unless quant_type is 'nf4' or 'fp4' and blocksize is a power of two from 32 to 4096."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; valid: {', '.join(map(repr, QUANT_TYPES))}")
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from {BLOCKSIZES[0]} to {BLOCKSIZES[-1]}, "
                         f"got {blocksize!r}")


def check_quantize_input(w, quant_type: str, blocksize: int):
    """ValueError unless the format is valid and w is a non-empty floating-point tensor."""
    check_format(quant_type, blocksize)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"quantize_4bit needs a floating-point tensor, got "
                         f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.numel() == 0:
        raise ValueError("quantize_4bit got an empty tensor")


def check_packed(packed: torch.Tensor, state: QuantState):
    """ValueError unless packed holds the ceil(n/2) uint8 bytes of state's n values."""
    if packed.dtype != torch.uint8 or packed.numel() != (state.numel + 1) // 2:
        raise ValueError(f"packed codes must be {(state.numel + 1) // 2} uint8 values for shape "
                         f"{tuple(state.shape)}, got {packed.numel()} {packed.dtype}")


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """(m,) values in [-1, 1] -> (m,) index q of the nearest value in the code book (16,). The thresholds
    are the fp32 midpoints between neighbours in sorted order, and a value exactly on one takes the lower
    code: the rank of x is the number of midpoints below it (torch.bucketize). fp4's two zeros split the
    interval around 0 as bitsandbytes does: x ≤ 0 gets 0b0000, x > 0 the "negative zero" 0b1000."""
    code_of_rank = torch.sort(code, stable=True).indices  # (16,) stable: fp4's 0b0000 ranks before 0b1000
    ranked = code[code_of_rank]  # (16,) ascending
    midpoints = (ranked[:-1] + ranked[1:]) / 2  # (15,)
    return code_of_rank[torch.bucketize(scaled, midpoints)]  # (m,)


def quantized_state(w: torch.Tensor, quant_type: str, blocksize: int, absmax: torch.Tensor,
                    double_quant: bool) -> QuantState:
    """The QuantState of w's 4-bit codes: absmax (n_blocks,) as it is, or double-quantized — its mean
    subtracted, then 8-bit dynamic codes in blocks of 256 with one fp32 scale each."""
    state = QuantState(w.shape, w.dtype, quant_type, blocksize)
    if not double_quant:
        state.absmax = absmax
        return state
    state.absmax_offset = absmax.mean()  # ()
    state.absmax_code_map = DYNAMIC_CODE.to(absmax.device)
    state.absmax_codes, state.absmax_scales = quantize_blockwise_8bit(
        absmax - state.absmax_offset, state.absmax_code_map, DOUBLE_QUANT_BLOCKSIZE)
    return state


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization of any float tensor w (any shape, any number of elements).

    Returns packed codes (ceil(n/2),) uint8 — element 2i in the high nibble of byte i, element 2i+1 in the
    low one, an odd n padded with the code of 0.0 — and the `QuantState` to undo it. Computed in fp32."""
    check_quantize_input(w, quant_type, blocksize)
    flat = w.detach().reshape(-1).float()  # (n,)
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)  # (n_blocks, bs), the last one zero-padded
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]  # an all-zero block stays 0, absmax 0
    if n % blocksize:  # bnb: the last, partial block stores a clamped absmax and divides instead
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        scaled[-1] = blocks[-1] / absmax[-1]
    q = nearest_code(scaled.view(-1)[:n + n % 2], CODES[quant_type].to(w.device))  # (n rounded up to even,)
    packed = (q[0::2] << 4 | q[1::2]).to(torch.uint8)  # (ceil(n/2),)
    return packed, quantized_state(w, quant_type, blocksize, absmax, double_quant)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of `quantize_4bit`: w_hat_i = code[q_i] · absmax of block i // blocksize, computed in fp32
    and rounded once into `dtype` (default state.dtype); a tensor of state.shape."""
    check_packed(packed, state)
    packed = packed.reshape(-1).long()  # (ceil(n/2),)
    q = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:state.numel]  # (n,) high nibble first
    code = CODES[state.quant_type].to(packed.device)[q]  # (n,) fp32
    absmax = state.block_absmax().repeat_interleave(state.blocksize)[:state.numel]  # (n,) fp32
    return (code * absmax).to(dtype or state.dtype).view(state.shape)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """8-bit blockwise quantization of a 1-D fp32 tensor x (n,) with a sorted 256-entry code map.

    Returns (codes (n,) uint8, absmax (ceil(n/blocksize),) fp32). bnb: the scaled value is first rounded
    to a 65536-point grid on [-1, 1] (truncating ((x + 1)/2 · 65535 + 0.5)) and gets the code nearest to
    that grid point — not always the code nearest to itself; a block of zeros gets code 0."""
    n = x.numel()
    padded = F.pad(x, (0, -n % blocksize)).view(-1, blocksize)  # (n_groups, bs); zeros leave absmax as is
    absmax = padded.abs().amax(dim=1)  # (n_groups,)
    inverse = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # (n_groups,)
    scaled = (padded * inverse[:, None]).clamp(-1, 1)  # (n_groups, bs)
    grid_index = (((scaled + 1.0) * 0.5) * 65535 + 0.5).int()  # (n_groups, bs) truncation toward zero
    grid = -1.0 + 2.0 * torch.arange(65536, dtype=torch.float32, device=x.device) / 65535  # (65536,)
    codes = torch.searchsorted((code[:-1] + code[1:]) * 0.5, grid[grid_index])  # midpoints below the point
    codes = torch.where(absmax[:, None] > 0, codes, 0).to(torch.uint8)
    return codes.view(-1)[:n], absmax


# ------------------------------------------------------------------------------------------- module

class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored 4-bit: y = x W_hatᵀ + b, W_hat dequantized per call.

    Everything is a buffer — packed codes `weight_codes`, the quantization state `weight_absmax`, or
    `weight_absmax_{codes,scales,offset}` under double quantization, and the fp32 `bias` — so the layer
    has no parameters at all: no optimizer can touch it, and `state_dict` round-trips it into a freshly
    constructed `Linear4bit(in_features, out_features, bias, quant_type, blocksize, double_quant)`.
    Keep it in fp32: `.half()`/`.to(dtype)` would also cast the fp32 scale buffers."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True):
        super().__init__()
        check_format(quant_type, blocksize)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        n = in_features * out_features
        n_blocks = math.ceil(n / blocksize)
        self.register_buffer("weight_codes", torch.zeros((n + 1) // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("weight_absmax_codes", torch.zeros(n_blocks, dtype=torch.uint8))
            n_groups = math.ceil(n_blocks / DOUBLE_QUANT_BLOCKSIZE)
            self.register_buffer("weight_absmax_scales", torch.zeros(n_groups))
            self.register_buffer("weight_absmax_offset", torch.zeros(()))
        else:
            self.register_buffer("weight_absmax", torch.zeros(n_blocks))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> "Linear4bit":
        """Quantize an nn.Linear (its weight in fp32, whatever its dtype; the bias is copied as fp32)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type, blocksize,
                     double_quant).to(linear.weight.device)
        codes, state = quantize_4bit(linear.weight.float(), quant_type, blocksize, double_quant)
        module.weight_codes.copy_(codes)
        for name, tensor in state.to_dict().items():
            getattr(module, "weight_" + name).copy_(tensor)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    @property
    def quant_state(self) -> QuantState:
        """The state as a `QuantState`, viewing (not copying) this module's buffers."""
        names = QuantState.tensor_names(self.double_quant)
        tensors = {name: getattr(self, "weight_" + name) for name in names}
        return QuantState.from_dict(tensors, (self.out_features, self.in_features), torch.float32,
                                    self.quant_type, self.blocksize)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out_features, in_features) in dtype."""
        return dequantize_4bit(self.weight_codes, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        """y = x W_hatᵀ + b in x's dtype (autocast, if on, casts as for any F.linear). Autograd keeps W_hat
        for backward (dx = dy W_hat); the fast twin dequantizes it again there instead."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def storage_bytes(self) -> int:
        """Bytes held by this layer: packed codes + quantization state + bias."""
        return sum(b.nbytes for b in self.buffers())

    def weight_storage_bytes(self) -> int:
        """Bytes of the quantized weight alone: packed codes + quantization state."""
        return self.storage_bytes() - (0 if self.bias is None else self.bias.nbytes)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}")


def bits_per_parameter(module: nn.Module) -> float:
    """Storage bits per weight over all Linear4bit layers in module (codes + state; biases excluded)."""
    layers = [m for m in module.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("bits_per_parameter: the module contains no Linear4bit layers")
    bits = sum(8 * m.weight_storage_bytes() for m in layers)
    return bits / sum(m.in_features * m.out_features for m in layers)


def quantize_blocks(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> nn.Module:
    """Replace every nn.Linear inside the model's blocks (attention and MLP projections) by a frozen
    Linear4bit; embeddings, norms and the head stay in full precision. Layers that are 4-bit already
    are kept if their format matches, and refused (ValueError) if it does not; a model that has some
    (a checkpoint saved in 4 bits) keeps its full-precision ones too, as the checkpoint chose."""
    saved_4bit = any(isinstance(m, Linear4bit) for m in model.blocks.modules())
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear4bit):
                    if (child.quant_type, child.blocksize, child.double_quant) != (quant_type, blocksize, double_quant):
                        raise ValueError(f"the model is already quantized as {child.quant_type}, block "
                                         f"{child.blocksize}, double_quant={child.double_quant}; ask for the "
                                         "same format or load the model unquantized")
                elif type(child) is nn.Linear and not saved_4bit:
                    setattr(parent, name, Linear4bit.from_linear(child, quant_type, blocksize, double_quant))
    return model
