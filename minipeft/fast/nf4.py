"""The fast twin of minipeft/core/nf4.py: the same 4-bit quantizer and Linear4bit forward, rewritten for speed
and memory on CPU. `minipeft.fast.enable()` swaps these in for the core versions (a train.py run does so);
each returns the same bits as its core version (tests/test_quant.py checks the twins against the core, and
the core against bitsandbytes). What is different:

    quantize_4bit     nearest code by a cell table (two look-ups and a comparison per value, not a binary
                      search), the work done a chunk of 256K values at a time (small temporaries, in cache)
    dequantize_4bit   each byte decoded to its pair of fp32 values by one 64-bit look-up (int32 indices),
                      written into the fp32 output itself (bf16/fp16: a reused chunk buffer), then scaled
                      by absmax in place; the double-quantized absmax in five torch calls. On CPU the
                      native kernel in nf4_native.c/.py goes first (one pass on torch's threads, the
                      same bits; MINIPEFT_NATIVE=0 switches it off); this torch code is its portable
                      fallback (no C compiler, other devices)
    Linear4bit        a custom autograd function that keeps no dequantized weight for backward: it
                      dequantizes again there (and under activation checkpointing takes the rerun's copy),
                      and runs both matmuls in autocast's dtype, with autocast off
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minipeft.core.nf4 import (CODES, DOUBLE_QUANT_BLOCKSIZE, QuantState, check_packed, check_quantize_input,
                               quantized_state)
from minipeft.fast import nf4_native
from minipeft.fast.autocast import autocast_off, matmul_dtype


# ------------------------------------------------------------------------------------ rounding tables

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
    byte_to_pair_bits: torch.Tensor  # (256,) int64: packed byte -> bits of its two fp32 values, high nibble's first

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
                   torch.stack([code[high], code[low]], dim=1).view(torch.int64).view(256))

    def to(self, device) -> "CodeTables":
        return CodeTables(*(None if t is None else t.to(device) for t in vars(self).values()))

    def nearest_rank(self, scaled: torch.Tensor) -> torch.Tensor:
        """(m,) fp32 -> (m,) uint8: rank r of the nearest sorted code value, i.e. the r with
        midpoints[r-1] < x <= midpoints[r] (a value exactly on a midpoint takes the lower code)."""
        cell = _cell(scaled)  # (m,); index_select is much faster than tensor[index] on CPU
        rank = self.rank_below.index_select(0, cell)
        return rank.add_(scaled > self.midpoint_in_cell.index_select(0, cell))

    def pack(self, scaled: torch.Tensor) -> torch.Tensor:
        """(m,) values in [-1, 1], m even -> (m/2,) packed codes, the first of each pair in the high nibble."""
        ranks = self.nearest_rank(scaled).view(-1, 2)  # (m/2, 2)
        pair = ranks[:, 0] << 4 | ranks[:, 1]  # (m/2,) uint8
        if self.rank_pair_to_byte is None:  # nf4: ranks are the codes
            return pair
        return self.rank_pair_to_byte.index_select(0, pair.int())


TABLES = {name: CodeTables.build(code) for name, code in CODES.items()}


# Values per chunk of the 4-bit loops (measured on SmolLM2's and 4096² weights). Going chunk by chunk keeps
# the temporaries small and in cache (allocating several 64 MB temporaries per call costs more than the
# arithmetic), while all blocks of a chunk are processed at once, in as few torch calls as possible (each
# costs microseconds): the quantizer 256K values (1 MB of fp32); the dequantizer 128K through its fp32
# buffer (bf16/fp16 output), or 1M when fp32 goes straight into the output and its int32 index is the
# only temporary.
CHUNKS = {"quantize": 1 << 18, "dequantize": 1 << 17, "dequantize in place": 1 << 20}


def _chunk_size(blocksize: int, loop: str) -> int:
    """Elements per chunk of `loop` (a key of CHUNKS): whole blocks."""
    return max(blocksize, CHUNKS[loop])


# ------------------------------------------------------------------------------------ quantize, dequantize

def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """core.nf4.quantize_4bit, chunk by chunk with the cell tables: the same packed codes and state."""
    check_quantize_input(w, quant_type, blocksize)
    flat = w.detach().reshape(-1).float()  # (n,)
    n = flat.numel()
    n_full = n // blocksize * blocksize  # elements in complete blocks
    tables = TABLES[quant_type].to(flat.device)
    absmax = torch.empty(math.ceil(n / blocksize), device=flat.device)  # (n_blocks,)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)  # (ceil(n/2),)
    step = _chunk_size(blocksize, "quantize")
    for start in range(0, n_full, step):  # complete blocks, a chunk at a time
        stop = min(start + step, n_full)
        blocks = flat[start:stop].view(-1, blocksize)  # (chunk/bs, bs)
        block_absmax = torch.amax(blocks.abs(), dim=1, out=absmax[start // blocksize:stop // blocksize])
        scaled = blocks * (1.0 / block_absmax.clamp(min=1e-38))[:, None]  # an all-zero block stays 0
        packed[start // 2:stop // 2] = tables.pack(scaled.view(-1))
    if n_full < n:  # bnb: the last, partial block stores a clamped absmax and divides instead of multiplying
        tail = flat[n_full:]
        absmax[-1] = tail.abs().amax().clamp(min=1e-38)
        packed[n_full // 2:] = tables.pack(F.pad(tail / absmax[-1], (0, len(tail) % 2)))
    return packed, quantized_state(w, quant_type, blocksize, absmax, double_quant)


def block_absmax(state: QuantState) -> torch.Tensor:
    """QuantState.block_absmax's twin, the same bits: under double quantization dynamic[c_b] · scale_g + mean,
    the 256 blocks of each group g scaled by one broadcast multiply, in five torch calls whatever the size."""
    if not state.double_quant:
        return state.absmax
    n_blocks, n_groups = len(state.absmax_codes), len(state.absmax_scales)
    absmax = torch.zeros(n_groups * DOUBLE_QUANT_BLOCKSIZE, device=state.absmax_codes.device)  # whole groups
    torch.index_select(state.absmax_code_map, 0, state.absmax_codes.int(), out=absmax[:n_blocks])
    absmax.view(n_groups, DOUBLE_QUANT_BLOCKSIZE).mul_(state.absmax_scales[:, None])
    return absmax[:n_blocks].add_(state.absmax_offset)  # (n_blocks,)


def scale_blocks_(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (m,) fp32, block by block, times absmax (ceil(m/blocksize),), in place; the last block may be partial."""
    n_full = len(values) // blocksize * blocksize
    values[:n_full].view(-1, blocksize).mul_(absmax[:n_full // blocksize, None])
    if n_full < len(values):
        values[n_full:].mul_(absmax[-1])
    return values


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """core.nf4.dequantize_4bit, the same bits, in three passes over the weights. Each byte decodes to its
    pair of fp32 values as one 64-bit look-up (index_select with int32 indices: no int64 copy of the bytes),
    written where the fp32 result goes — the output itself, or for bf16/fp16 a chunk buffer copied out
    after; then code · absmax, in place, rounded once into the output's dtype. On CPU the native kernel
    (nf4_native.py) does it all in one pass when it can."""
    check_packed(packed, state)
    if (out := nf4_native.dequantize_4bit(packed, state, dtype)) is not None:  # None: not on CPU, or no kernel
        return out
    n, blocksize, dtype = state.numel, state.blocksize, dtype or state.dtype
    packed = packed.reshape(-1)
    absmax = block_absmax(state)  # (n_blocks,) fp32
    byte_to_pair = TABLES[state.quant_type].byte_to_pair_bits.to(packed.device)  # (256,) int64
    out = torch.empty(n + n % 2, dtype=dtype, device=packed.device)  # (n rounded up to even,)
    in_place = dtype == torch.float32
    step = _chunk_size(blocksize, "dequantize in place" if in_place else "dequantize")
    buffer = None if in_place else torch.empty(min(step, len(out)), device=packed.device)  # fp32, reused
    for start in range(0, len(out), step):  # whole blocks at a time (the last one may be partial)
        stop = min(start + step, len(out))
        values = out[start:stop] if in_place else buffer[:stop - start]
        torch.index_select(byte_to_pair, 0, packed[start // 2:stop // 2].int(), out=values.view(torch.int64))
        scale_blocks_(values, absmax[start // blocksize:], blocksize)
        if not in_place:
            out[start:stop].copy_(values)
    return out[:n].view(state.shape)


# ------------------------------------------------------------------------------------------- Linear4bit

class _Linear4bitFunction(torch.autograd.Function):
    """y = x W_hatᵀ + b that keeps nothing for backward but the 4-bit layer itself.

    Plain `F.linear(x, dequantized_weight(), b)` (the core's Linear4bit) saves the fp32 W_hat for backward
    (dx = dy W_hat): one out×in fp32 copy per layer, alive until backward — 8× the 4-bit storage, and as
    much as LoRA's frozen fp32 base. W is frozen (a buffer), so backward needs no x either: it dequantizes
    W_hat again (the same bits) and returns dy W_hat. Memory: 4-bit codes only; time: one more
    dequantization. Except under activation checkpointing: there the block's forward runs again inside
    backward, just before the block's own backward, and that rerun hands its W_hat on
    (`layer.w_hat_for_backward`) — one block's dequantized weights alive at a time, and two
    dequantizations per layer and step, not three. W_hat is dequantized straight into the dtype the matmul
    runs in (`matmul_dtype`: autocast's, else x's), and both matmuls run with autocast off, in that dtype;
    the output is in that dtype (as autocast's own F.linear), the input's gradient in x's dtype."""

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


def linear4bit_forward(layer, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out), in matmul_dtype(x)
    """Linear4bit.forward's twin: the same output and input gradient, without keeping W_hat for backward."""
    return _Linear4bitFunction.apply(x, layer)
