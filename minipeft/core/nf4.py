"""4-bit NormalFloat (NF4) and FP4 quantization with double quantization: the frozen base of QLoRA.

QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023),
https://arxiv.org/abs/2305.14314. The base weights are stored in 4 bits and dequantized to fp32 for every
matmul; only the LoRA matrices on top of them are trained (methods/qlora.py, method "qlora").

    w (out, in) ──flatten──► (n,) ──split into blocks of 64──► (n/64, 64)
        absmax_b = max |w| in block b                                        (n/64,) fp32
        q_i      = index of the code-book value nearest to w_i / absmax_b    (n,)    4-bit
        packed   = two codes per byte, first element in the high nibble      (n/2,)  uint8
    w_hat_i = code[q_i] · absmax_b

Code books (16 values in [-1, 1]; the 4-bit code q is an index into the table)
    nf4  NormalFloat: weights are roughly N(0, σ²), so put the 16 values at quantiles of N(0, 1) — each
         bin then holds about the same share of weights. Quantiles 0 and 1 are ±∞, so the outermost
         quantile used is δ = ½·((1 − 1/(2·15)) + (1 − 1/(2·16))) ≈ 0.9677083 (bitsandbytes uses the
         literal 0.9677083). An exact zero matters (padding, pruned weights, ReLU-ish rows), and 16 values
         cannot be symmetric around one, so NF4 is asymmetric:
             8 positive values  Φ⁻¹(p) for p = 8 evenly spaced points from δ down to (not incl.) ½,
             7 negative values −Φ⁻¹(p) for p = 7 evenly spaced points from δ down to (not incl.) ½,
             0,
         sorted and divided by the largest, so the table spans exactly [-1, 1]:
             -1, -0.696, -0.525, -0.395, -0.284, -0.185, -0.091, 0, 0.080, 0.161, 0.246, 0.338, 0.441,
             0.563, 0.723, 1                                            (see `normal_float_code`)
    fp4  bitsandbytes' 4-bit float: sign bit, then 3 bits for magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3}
         (bit patterns 000…111), all divided by 12. Not sorted; 0b0000 decodes to 0 and 0b1000 to -0.

Rounding: each scaled value goes to the nearest code, with the decision thresholds at the fp32 midpoints
between neighbouring (sorted) codes. A value exactly on a midpoint takes the *lower* code. For fp4 the
two zeros split the interval around 0: scaled values in (-0.0026, 0] get 0b0000 and values in
(0, 0.0026] get 0b1000 (the "negative zero" pattern) — this is what bitsandbytes' CPU backend does.

Double quantization (QLoRA §3): the fp32 absmax values cost 32/64 = 0.5 bit per weight. Quantize them too:
subtract their mean (they are all positive, so centering uses the signed 8-bit range fully), then quantize
them to 8 bits with bitsandbytes' *dynamic* code map (`dynamic_code`), blockwise in blocks of 256 with one
fp32 absmax per block. Dequantization: absmax_b = dynamic[code_b] · scale_(b // 256) + mean.

Bits per weight (block size 64):
    without double quantization   4 + 32/64                 = 4.5
    with double quantization      4 + 8/64 + 32/(64·256)    ≈ 4.127   (+ one fp32 mean per tensor)

Bit-exact with bitsandbytes 0.50's CPU `quantize_4bit` (packed codes and state; tests/test_quant.py), its
corner cases kept on purpose and marked "bnb:" below. Dequantization returns code[q]·absmax exactly on every
CPU (bitsandbytes' AVX-512 dequantize kernel misplaces blocks in rows that are not whole blocks).
Everything is a pure function of tensors, plus `Linear4bit`, a module that holds the result as buffers.
"""
import contextlib
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


# Rounding to the nearest code, fast. The exact rule is "count the midpoints below x" (torch.bucketize),
# but a binary search per element is slow on CPU. Instead cut [-1, 1] into CELLS equal cells, small enough
# that no cell holds two midpoints. Every midpoint in an earlier cell is below x, every one in a later cell
# is above it, so rank(x) = (midpoints in earlier cells) + (x > the midpoint in x's own cell, if any):
# two table look-ups and a comparison, and exactly the same answer — the cell of x only has to be computed
# by a monotone function, the same one for x and for the midpoints.
CELLS = 4096


def _cell(x: torch.Tensor) -> torch.Tensor:
    """Cell index in 0 … CELLS of each scaled value (int32); monotone in x (fp32 rounding is)."""
    return x.add(1.0).mul_(CELLS / 2).int().clamp_(0, CELLS)


@dataclass(frozen=True)
class CodeTables:
    """Look-up tables derived from one 16-value code book (built once per quant type)."""
    midpoints: torch.Tensor  # (15,) fp32 decision thresholds between neighbouring sorted values
    rank_below: torch.Tensor  # (CELLS+1,) uint8: midpoints in earlier cells
    midpoint_in_cell: torch.Tensor  # (CELLS+1,) fp32: the midpoint inside the cell, or +inf
    rank_pair_to_byte: torch.Tensor | None  # (256,) uint8: packed ranks -> packed codes; None if rank == code
    byte_to_pair: torch.Tensor  # (256, 2) fp32: packed byte -> its two values, high nibble first

    @classmethod
    def build(cls, code: torch.Tensor) -> "CodeTables":
        code_of_rank = torch.sort(code, stable=True).indices  # (16,) stable: fp4 keeps 0b0000 before 0b1000
        ranked = code[code_of_rank]
        midpoints = (ranked[:-1] + ranked[1:]) / 2
        cells = _cell(midpoints)  # (15,)
        assert bool((cells[1:] > cells[:-1]).all()), "two midpoints share a cell: raise CELLS"
        rank_below = torch.searchsorted(cells, torch.arange(CELLS + 1, dtype=torch.int32)).to(torch.uint8)
        midpoint_in_cell = torch.full((CELLS + 1,), math.inf).index_put_((cells.long(),), midpoints)
        byte = torch.arange(256)
        high, low = byte >> 4, byte & 15
        is_sorted = bool((code_of_rank == torch.arange(16)).all())
        rank_pair_to_byte = None if is_sorted else (code_of_rank[high] << 4 | code_of_rank[low]).byte()
        return cls(midpoints, rank_below, midpoint_in_cell, rank_pair_to_byte,
                   torch.stack([code[high], code[low]], dim=1))

    def to(self, device) -> "CodeTables":
        return CodeTables(*(None if t is None else t.to(device) for t in vars(self).values()))

    def nearest_rank(self, scaled: torch.Tensor) -> torch.Tensor:
        """(m,) fp32 -> (m,) uint8: rank r of the nearest sorted code value, i.e. the r with
        midpoints[r-1] < x <= midpoints[r] (a value exactly on a midpoint takes the lower code)."""
        cell = _cell(scaled)  # (m,); index_select is much faster than tensor[index] on CPU
        rank = self.rank_below.index_select(0, cell)
        return rank.add_(scaled > self.midpoint_in_cell.index_select(0, cell))


TABLES = {name: CodeTables.build(code) for name, code in CODES.items()}


def _dynamic_code_table(code: torch.Tensor, size: int = 65536) -> torch.Tensor:
    """(size,) nearest-code index for each point of an even grid on [-1, 1] (bnb: its CPU 8-bit quantizer
    rounds a scaled value to this grid first and then looks its code up here, instead of searching the
    code map; the two differ for values that fall between a grid point and a code midpoint)."""
    grid = -1.0 + 2.0 * torch.arange(size, dtype=torch.float32, device=code.device) / (size - 1)  # (size,)
    midpoints = (code[:-1] + code[1:]) * 0.5  # (255,)
    return torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)  # number of midpoints < x


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
        """(n_blocks,) fp32 scale of every 4-bit block, dequantizing it first under double quantization."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax_codes, self.absmax_scales, self.absmax_code_map,
                                         DOUBLE_QUANT_BLOCKSIZE) + self.absmax_offset

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

def _chunk_size(blocksize: int) -> int:
    """Elements per chunk of the 4-bit loops: whole blocks, 256K values (1 MB of fp32). Going chunk by chunk
    keeps every temporary small and in cache — allocating several 64 MB temporaries per call costs more
    than the arithmetic — while all blocks of a chunk are processed at once."""
    return max(blocksize, 1 << 18)


def check_format(quant_type: str, blocksize: int):
    """ValueError unless quant_type is 'nf4' or 'fp4' and blocksize is a power of two from 32 to 4096."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; valid: {', '.join(map(repr, QUANT_TYPES))}")
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from {BLOCKSIZES[0]} to {BLOCKSIZES[-1]}, "
                         f"got {blocksize!r}")


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization of any float tensor w (any shape, any number of elements).

    Returns packed codes (ceil(n/2),) uint8 — element 2i in the high nibble of byte i, element 2i+1 in the
    low one, an odd n padded with the code of 0.0 — and the `QuantState` to undo it. Computed in fp32."""
    check_format(quant_type, blocksize)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"quantize_4bit needs a floating-point tensor, got "
                         f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.numel() == 0:
        raise ValueError("quantize_4bit got an empty tensor")
    flat = w.detach().reshape(-1).float()  # (n,)
    n = flat.numel()
    n_full = n // blocksize * blocksize  # elements in complete blocks
    tables = TABLES[quant_type].to(flat.device)
    absmax = torch.empty(math.ceil(n / blocksize), device=flat.device)  # (n_blocks,)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)  # (ceil(n/2),)

    def pack(scaled):  # (m,) values in [-1, 1] with m even -> (m/2,) packed codes
        ranks = tables.nearest_rank(scaled).view(-1, 2)  # no clamp needed: beyond ±1 is the outer code
        pair = ranks[:, 0] << 4 | ranks[:, 1]  # (m/2,) uint8
        if tables.rank_pair_to_byte is None:  # nf4: ranks are the codes
            return pair
        return tables.rank_pair_to_byte.index_select(0, pair.int())

    step = _chunk_size(blocksize)
    for start in range(0, n_full, step):  # complete blocks, a chunk at a time
        stop = min(start + step, n_full)
        blocks = flat[start:stop].view(-1, blocksize)  # (chunk/bs, bs)
        block_absmax = torch.amax(blocks.abs(), dim=1, out=absmax[start // blocksize:stop // blocksize])
        # an all-zero block keeps absmax 0 but is scaled by 1/1e-38, so its values stay 0
        scaled = blocks * (1.0 / block_absmax.clamp(min=1e-38))[:, None]
        packed[start // 2:stop // 2] = pack(scaled.view(-1))
    if n_full < n:  # bnb: the last, partial block stores a clamped absmax and divides instead of multiplying
        tail = flat[n_full:]
        absmax[-1] = tail.abs().amax().clamp(min=1e-38)
        packed[n_full // 2:] = pack(F.pad(tail / absmax[-1], (0, len(tail) % 2)))

    state = QuantState(w.shape, w.dtype, quant_type, blocksize)
    if double_quant:
        state.absmax_offset = absmax.mean()  # ()
        state.absmax_code_map = DYNAMIC_CODE.to(flat.device)
        state.absmax_codes, state.absmax_scales = quantize_blockwise_8bit(
            absmax - state.absmax_offset, state.absmax_code_map, DOUBLE_QUANT_BLOCKSIZE)
    else:
        state.absmax = absmax
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of `quantize_4bit`: a tensor of state.shape in `dtype` (default state.dtype). Each value
    code · absmax is computed in fp32 and rounded once, straight into the output (a bf16 matmul gets
    bf16 weights without an fp32 copy of the matrix)."""
    check_format(state.quant_type, state.blocksize)
    n, blocksize = state.numel, state.blocksize
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed codes must be {(n + 1) // 2} uint8 values for shape {tuple(state.shape)}, "
                         f"got {packed.numel()} {packed.dtype}")
    packed = packed.reshape(-1)
    absmax = state.block_absmax()  # (n_blocks,)
    # each byte decodes to a pair of fp32 values; gathering the pair as one int64 is ~4x faster in torch
    # than index_select on (256, 2) rows, and reinterpreting the bits back gives the same two floats
    byte_to_pair = TABLES[state.quant_type].byte_to_pair.to(packed.device).view(torch.int64).view(256)
    n_full = n // blocksize * blocksize
    out = torch.empty(n + n % 2, dtype=dtype or state.dtype, device=packed.device)  # (n rounded up to even,)
    step = _chunk_size(blocksize)
    code_values = torch.empty(min(step, len(out)), device=packed.device)  # one chunk's code[q], reused
    byte_index = torch.empty(len(code_values) // 2, dtype=torch.int64, device=packed.device)  # reused too

    def decode(first, stop):  # code[q] of elements first … stop-1 (both even), fp32
        values, index = code_values[:stop - first], byte_index[:(stop - first) // 2]
        index.copy_(packed[first // 2:stop // 2])  # gather wants int64 indices
        torch.gather(byte_to_pair, 0, index, out=values.view(torch.int64))
        return values

    for start in range(0, n_full, step):  # complete blocks, a chunk at a time
        stop = min(start + step, n_full)
        torch.mul(decode(start, stop).view(-1, blocksize), absmax[start // blocksize:stop // blocksize, None],
                  out=out[start:stop].view(-1, blocksize))
    if n_full < n:  # the partial block
        torch.mul(decode(n_full, len(out)), absmax[-1], out=out[n_full:])
    return out[:n].view(state.shape)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """8-bit blockwise quantization of a 1-D fp32 tensor x (n,) with a sorted 256-entry code map.

    Returns (codes (n,) uint8, absmax (ceil(n/blocksize),) fp32). bnb: the scaled value is first rounded
    to a 65536-point grid on [-1, 1] (truncating ((x + 1)/2 · 65535 + 0.5)), whose nearest code comes from
    a table; a block of zeros gets code 0."""
    n = x.numel()
    padded = F.pad(x, (0, -n % blocksize)).view(-1, blocksize)  # (n_groups, bs); zeros leave absmax as is
    absmax = padded.abs().amax(dim=1)  # (n_groups,)
    inverse = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # (n_groups,)
    scaled = (padded * inverse[:, None]).clamp(-1, 1)  # (n_groups, bs)
    table = _dynamic_code_table(code)  # (65536,)
    grid_index = (((scaled + 1.0) * 0.5) * (table.numel() - 1) + 0.5).int()  # truncation toward zero
    codes = table[grid_index]  # (n_groups, bs)
    codes = torch.where(absmax[:, None] > 0, codes, 0).to(torch.uint8)
    return codes.view(-1)[:n], absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`: (n,) fp32 values code[codes] · absmax of their block."""
    n = codes.numel()
    values = F.pad(code[codes.long()], (0, -n % blocksize)).view(-1, blocksize)  # (n_groups, bs)
    return (values * absmax[:, None]).view(-1)[:n]


# ------------------------------------------------------------------------------------------- module

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


class _Linear4bitFunction(torch.autograd.Function):
    """y = x W_hatᵀ + b that keeps nothing for backward but the 4-bit layer itself.

    Plain `F.linear(x, dequantized_weight(), b)` would save the fp32 W_hat for backward (dx = dy W_hat):
    one out×in fp32 copy per layer, alive until backward — 8× the 4-bit storage, and as much as LoRA's
    frozen fp32 base. W is frozen (a buffer), so backward needs no x either: it dequantizes W_hat again
    (the same bits) and returns dy W_hat. Memory: 4-bit codes only; time: one more dequantization.
    Except under activation checkpointing: there the block's forward runs again inside backward, just
    before the block's own backward, and that rerun hands its W_hat on (`layer.w_hat_for_backward`) —
    one block's dequantized weights alive at a time, and two dequantizations per layer and step, not three.
    W_hat is dequantized straight into the dtype the matmul runs in (`matmul_dtype`: autocast's, else
    x's), and both matmuls run with autocast off, in that dtype; the output is in that dtype (as
    autocast's own F.linear), the input's gradient in x's dtype."""

    @staticmethod
    def forward(ctx, x, layer):
        dtype = matmul_dtype(x)
        ctx.layer, ctx.dtype, ctx.input_dtype = layer, dtype, x.dtype
        w_hat = layer.dequantized_weight(dtype)
        # inside a backward pass (the autograd engine runs a graph task): checkpointing's rerun
        if x.requires_grad and torch._C._current_graph_task_id() != -1:
            layer.w_hat_for_backward = w_hat
        bias = None if layer.bias is None else layer.bias.to(dtype)
        with autocast_off(x.device.type):
            return F.linear(x.to(dtype), w_hat, bias)

    @staticmethod
    def backward(ctx, grad_out):  # (..., out) -> (..., in); no gradient for the layer
        w_hat = ctx.layer.__dict__.pop("w_hat_for_backward", None)
        if not ctx.needs_input_grad[0]:
            return None, None
        if w_hat is None or w_hat.dtype != ctx.dtype:
            w_hat = ctx.layer.dequantized_weight(ctx.dtype)
        with autocast_off(grad_out.device.type):
            grad_x = grad_out.to(ctx.dtype) @ w_hat
        return grad_x.to(ctx.input_dtype), None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored 4-bit: y = x W_hatᵀ + b, W_hat dequantized per call
    (and once more in backward, instead of being kept alive: see `_Linear4bitFunction`).

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out), in matmul_dtype(x)
        return _Linear4bitFunction.apply(x, self)

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


def values_in_4bit_layers(model: nn.Module) -> int:
    """How many weights and biases the model's Linear4bit layers hold (buffers, so model.parameters()
    does not count them)."""
    return sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
               for m in model.modules() if isinstance(m, Linear4bit))


def tensors_of_4bit_layers(model: nn.Module) -> list[torch.Tensor]:
    """The codes, quantization state and biases of the model's Linear4bit layers: buffers, or frozen
    parameters once sharding.py has made them parameters for FSDP to shard (a method's trainable
    parameters inside such a layer are not among them)."""
    return [t for m in model.modules() if isinstance(m, Linear4bit)
            for t in [*m.buffers(recurse=False), *(p for p in m.parameters(recurse=False) if not p.requires_grad)]]


def quantize_blocks(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> nn.Module:
    """Replace every nn.Linear inside the model's blocks (attention and MLP projections) by a frozen
    Linear4bit; embeddings, norms and the head stay in full precision. Layers that are 4-bit already
    are kept if their format matches, and refused (ValueError) if it does not."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear4bit):
                    if (child.quant_type, child.blocksize, child.double_quant) != (quant_type, blocksize, double_quant):
                        raise ValueError(f"the model is already quantized as {child.quant_type}, block "
                                         f"{child.blocksize}, double_quant={child.double_quant}; ask for the "
                                         "same format or load the model unquantized")
                elif type(child) is nn.Linear:
                    setattr(parent, name, Linear4bit.from_linear(child, quant_type, blocksize, double_quant))
    return model
