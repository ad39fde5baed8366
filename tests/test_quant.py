"""minipeft/core/nf4.py: the dequantized values against their definition code[q]·absmax, bit-exact parity with
bitsandbytes' CPU 4-bit quantizer (packed codes and quantization state), round-trip error, Linear4bit
(buffers, state_dict, bits per parameter) and bad input.

bitsandbytes' CPU dequantize is not one kernel but several, chosen by the CPU and the shape, and they
disagree with each other: so minipeft's dequantized values are checked against code[q]·absmax computed
here, and bitsandbytes' dequantize is compared with that same definition only where its kernel follows it
(`assert_bnb_dequantize_follows_definition`). The suite passes on AVX2 and on AVX-512 CPUs alike."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import minipeft.fast
from minipeft.core import nf4 as quant
from minipeft.fast import nf4 as fast_nf4
from conftest import cpu_flags

try:
    import bitsandbytes.functional as bnb
except ImportError:  # a dev dependency: without it only the parity tests are skipped
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

QUANT_TYPES = ["nf4", "fp4"]
SMALL_SHAPES = [(1,), (7,), (63,), (64,), (65,), (3, 5, 7), (130, 33)]


@pytest.fixture(scope="module", autouse=True)
def eager_single_thread():
    """bitsandbytes torch.compiles its CPU dequantizer for odd last dimensions, once per shape (2-15 s
    each); run it eagerly instead — same arithmetic (code · absmax in fp32, then cast), same numbers.
    One thread: the tensors here are small, and a second thread only stalls when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch._dynamo.config.patch(disable=True):
        yield
    torch.set_num_threads(threads)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------- the definition

# The two 16-value code books, written out independently of minipeft. NF4: the values listed in the QLoRA
# paper (Dettmers et al. 2023, appendix E), as fp32. FP4: bitsandbytes' layout, a sign bit over 3 bits that
# pick one of 8 magnitudes (in twelfths) — so 0b1000, the sign bit over magnitude 0, is -0.0.
NF4_VALUES = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0]
FP4_MAGNITUDES = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
CODE_BOOKS = {"nf4": torch.tensor(NF4_VALUES), "fp4": torch.cat([FP4_MAGNITUDES, -FP4_MAGNITUDES])}


def decision_thresholds(quant_type):
    """(15,) the fp32 midpoints between neighbouring values of the sorted code book."""
    ranked = CODE_BOOKS[quant_type].sort().values
    return (ranked[:-1] + ranked[1:]) / 2


def reference_dequantize(packed, block_absmax, quant_type, blocksize, shape, dtype):
    """Dequantization by its definition: element i of the flattened tensor is code[q_i] · absmax of block
    i // blocksize, computed in fp32 and rounded once into dtype; q_i is the high nibble of byte i // 2
    for an even i, the low nibble for an odd one."""
    n = math.prod(shape)
    packed = packed.reshape(-1).long()
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]  # (n,) high nibble first
    values = CODE_BOOKS[quant_type][q] * block_absmax[torch.arange(n) // blocksize]  # (n,) fp32
    return values.to(dtype).reshape(shape)


def undo_double_quant(codes, scales, code_map, offset, group=quant.DOUBLE_QUANT_BLOCKSIZE):
    """Per-block absmax under double quantization: code_map[codes_b] · scales[b // 256] + offset."""
    return code_map[codes.long()] * scales[torch.arange(len(codes)) // group] + offset


def bnb_block_absmax(state):
    """The absmax of every 4-bit block held by a bitsandbytes QuantState."""
    if not state.nested:
        return state.absmax
    return undo_double_quant(state.absmax, state.state2.absmax, state.state2.code, state.offset,
                             state.state2.blocksize)


def block_absmax(state: quant.QuantState):
    """The absmax of every 4-bit block held by a minipeft QuantState."""
    if not state.double_quant:
        return state.absmax
    return undo_double_quant(state.absmax_codes, state.absmax_scales, state.absmax_code_map, state.absmax_offset)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    """Equal bit for bit: torch.equal would take -0.0 for +0.0."""
    assert a.dtype == b.dtype and a.shape == b.shape
    as_int = {4: torch.int32, 2: torch.int16}[a.element_size()]
    assert torch.equal(a.view(as_int), b.view(as_int))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape", [(65,), (128, 96), (37, 64), (3, 5, 7)], ids=str)
def test_dequantize_is_code_times_absmax(shape, quant_type, double_quant, dtype):
    """Without bitsandbytes too: what minipeft decodes is code[q]·absmax of its own codes and state."""
    w = randn(*shape, dtype=dtype)
    w.view(-1)[1] = 1e-6  # a tiny positive value: fp4's 0b1000 (-0.0) in the first block
    packed, state = quant.quantize_4bit(w, quant_type, 32, double_quant)
    expected = reference_dequantize(packed, block_absmax(state), quant_type, 32, shape, dtype)
    assert_same_bits(quant.dequantize_4bit(packed, state), expected)


# ---------------------------------------------------------------------------------- bitsandbytes' kernels

AVX512 = "avx512f" in cpu_flags()


def bnb_avx512_kernel_misplaces_blocks(shape, blocksize) -> bool:
    """Whether bitsandbytes' native AVX-512 dequantize kernel runs here where it is wrong (bitsandbytes 0.50.2).
    Its native kernel takes an even last dimension; the library routes blocks of 2048 and more to its Python
    code instead, but only when torch's own CPU capability is AVX512 (not under ATEN_CPU_CAPABILITY=avx2 on
    the same CPU). The kernel's AVX-512 loop, chosen by the CPU flag avx512f, gives some elements of a row
    that starts inside a block the absmax of another block (e.g. (128, 96) in blocks of 64), and mixes up
    blocks of 2048 and more (the accuracy issue the library's own comment names)."""
    native = shape[-1] % 2 == 0 and not (torch.backends.cpu.get_cpu_capability() == "AVX512" and blocksize >= 2048)
    return AVX512 and native and (shape[-1] % blocksize != 0 or blocksize >= 2048)


def assert_bnb_dequantize_follows_definition(ref_packed, ref_state, expected):
    """bitsandbytes' dequantize_4bit of its own codes and state equals code[q]·absmax (`expected`).
    By value: its kernels disagree on the sign of fp4's zero 0b1000 (-0.0 from the AVX2 kernel, +0.0 from
    the AVX-512 one and from the Python fallback, as its code book stores it). Where the AVX-512 kernel
    misplaces blocks, only this comparison is marked xfail; every check before it has run."""
    got = bnb.dequantize_4bit(ref_packed, ref_state).reshape(expected.shape)  # a 1-D even input comes as (1, n)
    if not torch.equal(got, expected) and bnb_avx512_kernel_misplaces_blocks(expected.shape, ref_state.blocksize):
        pytest.xfail("bitsandbytes' AVX-512 dequantize kernel (CPU flag avx512f) takes another block's absmax "
                     f"for a last dimension of {expected.shape[-1]} in blocks of {ref_state.blocksize}")
    assert torch.equal(got, expected)


def assert_matches_bnb(w, quant_type, blocksize, double_quant):
    """Packed codes and every state tensor identical to bitsandbytes'; the dequantized tensor bit for bit
    code[q]·absmax of those codes and that state; bitsandbytes' own dequantize equal to it where its
    kernel follows the definition."""
    ref_packed, ref_state = bnb.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                              compress_statistics=double_quant)
    packed, state = quant.quantize_4bit(w, quant_type, blocksize, double_quant)

    assert torch.equal(packed, ref_packed.view(-1))  # bnb keeps them as (ceil(n/2), 1)
    if double_quant:
        assert ref_state.state2.blocksize == quant.DOUBLE_QUANT_BLOCKSIZE
        assert torch.equal(state.absmax_codes, ref_state.absmax)
        assert torch.equal(state.absmax_scales, ref_state.state2.absmax)
        assert torch.equal(state.absmax_offset, ref_state.offset)
        assert torch.equal(state.absmax_code_map, ref_state.state2.code)
    else:
        assert torch.equal(state.absmax, ref_state.absmax)

    expected = reference_dequantize(ref_packed, bnb_block_absmax(ref_state), quant_type, blocksize, w.shape,
                                    w.dtype)
    assert_same_bits(quant.dequantize_4bit(packed, state), expected)
    assert_bnb_dequantize_follows_definition(ref_packed, ref_state, expected)


# ---------------------------------------------------------------------------------- bitsandbytes parity

@needs_bnb
def test_code_books_match_bitsandbytes():
    for quant_type, code in quant.CODES.items():
        assert torch.equal(code, bnb.get_4bit_type(quant_type, device="cpu"))
        assert torch.equal(CODE_BOOKS[quant_type], bnb.get_4bit_type(quant_type, device="cpu"))
        assert_same_bits(code, CODE_BOOKS[quant_type])  # fp4's 0b1000 is -0.0 (bitsandbytes' table: +0.0)
    assert torch.equal(quant.DYNAMIC_CODE, bnb.create_dynamic_map())
    assert quant.NF4_CODE[7] == 0 and quant.NF4_CODE.min() == -1 and quant.NF4_CODE.max() == 1


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", quant.BLOCKSIZES)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_bit_exact_small(shape, blocksize, quant_type, double_quant):
    assert_matches_bnb(randn(*shape, seed=math.prod(shape)), quant_type, blocksize, double_quant)


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(1000, 333), (4096, 1024)], ids=str)
def test_bit_exact_large(shape, blocksize, quant_type, double_quant):
    assert_matches_bnb(randn(*shape) * 0.02, quant_type, blocksize, double_quant)


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape", [(1000, 333), (128, 96), (65,)], ids=str)
def test_bit_exact_half_precision(shape, quant_type, double_quant, dtype):
    assert_matches_bnb(randn(*shape, dtype=dtype), quant_type, 64, double_quant)


def edge_case_tensors():
    ramp = torch.linspace(-3, 3, 1000)
    with_zero_blocks = randn(5000)
    with_zero_blocks[64:192] = 0  # two whole zero blocks
    with_zero_blocks[-40:] = 0  # an all-zero partial last block
    ties = {qt: torch.cat([torch.ones(1), decision_thresholds(qt), -decision_thresholds(qt)]).repeat(40)
            for qt in QUANT_TYPES}  # absmax 1, so every other value sits exactly on a decision threshold
    return {
        "zeros": torch.zeros(1000),
        "zeros_odd": torch.zeros(7),
        "zero_blocks": with_zero_blocks,
        "constant": torch.full((300, 7), -2.5),
        "ramp": ramp,
        "heavy_tail": randn(4096) ** 5,
        "tiny_and_huge": randn(2048) * torch.logspace(-30, 30, 2048),
        "fp4_zero_zone": torch.cat([torch.ones(1), torch.linspace(-0.004, 0.004, 255)]),
        "ties_nf4": ties["nf4"],
        "ties_fp4": ties["fp4"],
    }


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("name", list(edge_case_tensors()))
def test_bit_exact_edge_cases(name, blocksize, quant_type, double_quant):
    assert_matches_bnb(edge_case_tensors()[name], quant_type, blocksize, double_quant)


@needs_bnb
def test_fp4_negative_zero():
    """Tiny positive values get fp4 code 0b1000 (bitsandbytes' choice too), which decodes to -0.0, the sign
    bit over magnitude 0 — on every CPU (bitsandbytes' own kernels differ here: see
    assert_bnb_dequantize_follows_definition). torch.equal cannot see the sign of a zero, so check bits."""
    w = torch.cat([torch.ones(1), torch.full((31,), 1e-3), torch.full((32,), -1e-3)]).view(2, 32)  # one block
    packed, state = quant.quantize_4bit(w, "fp4", 64, double_quant=False)
    ref_packed, _ = bnb.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert torch.equal(packed, ref_packed.view(-1))
    assert packed[1] == 0x88  # tiny positive values: the sign-bit zero
    assert packed[-1] == 0x00  # tiny negative values: the plain zero
    w_hat = quant.dequantize_4bit(packed, state)
    assert torch.signbit(w_hat[0, 1:]).all() and not torch.signbit(w_hat[1]).any()
    assert (w_hat.view(-1)[1:] == 0).all()


# ---------------------------------------------------------------------------------- rounding rule

@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_fast_nearest_rank_is_exactly_bucketize(quant_type):
    """The fast twin's cell-table shortcut gives the same rank as counting midpoints below x — also for the
    fp32 neighbours of every midpoint and of every cell edge, where an off-by-one would show."""
    tables, midpoints = fast_nf4.TABLES[quant_type], decision_thresholds(quant_type)
    edges = torch.linspace(-1, 1, fast_nf4.CELLS + 1)
    critical = torch.cat([midpoints, edges, torch.tensor([-1.0, 0.0, -0.0, 1.0])])
    x = torch.cat([critical, critical.nextafter(torch.tensor(2.0)), critical.nextafter(torch.tensor(-2.0)),
                   torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    assert torch.equal(tables.nearest_rank(x).long(), torch.bucketize(x, midpoints))


def test_ties_take_the_lower_code():
    midpoints = decision_thresholds("nf4")
    w = torch.cat([torch.ones(1), midpoints])  # absmax 1: scaled values are the midpoints themselves
    packed, state = quant.quantize_4bit(w, "nf4", 32, double_quant=False)
    w_hat = quant.dequantize_4bit(packed, state)
    assert torch.equal(w_hat[1:], quant.NF4_CODE[:-1])


def test_packing_high_nibble_first_and_odd_padding():
    w = torch.tensor([-1.0, 1.0, 0.0])  # nf4 codes 0, 15, 7; padding is the code of 0.0 (7)
    packed, _ = quant.quantize_4bit(w, "nf4", 64, double_quant=False)
    assert packed.tolist() == [0x0F, 0x77]


# ---------------------------------------------------------------------------------- round trip

def test_round_trip_error_nf4_below_fp4():
    w = randn(512, 512)
    errors = {}
    for quant_type in QUANT_TYPES:
        for double_quant in (False, True):
            w_hat = quant.dequantize_4bit(*quant.quantize_4bit(w, quant_type, 64, double_quant))
            errors[quant_type, double_quant] = (w_hat - w).abs().mean().item()
    assert errors["nf4", False] < errors["fp4", False]
    assert errors["nf4", True] < errors["fp4", True]
    assert errors["nf4", True] < 1.01 * errors["nf4", False]  # 8-bit absmax costs almost nothing
    assert errors["nf4", False] < 0.1  # ~0.08 for N(0, 1)


def test_round_trip_keeps_shape_dtype_and_exact_values():
    w = quant.NF4_CODE.repeat(8).view(4, 32) * 3.0  # every block's values are exactly code · absmax
    w_hat = quant.dequantize_4bit(*quant.quantize_4bit(w, "nf4", 32, double_quant=False))
    assert torch.equal(w_hat, w)
    w16 = randn(10, 20, dtype=torch.bfloat16)
    assert quant.dequantize_4bit(*quant.quantize_4bit(w16)).dtype == torch.bfloat16


def test_state_dict_round_trip_of_quant_state():
    packed, state = quant.quantize_4bit(randn(100, 30), "fp4", 128, double_quant=True)
    tensors = state.to_dict()
    assert set(tensors) == {"absmax_codes", "absmax_scales", "absmax_offset"}
    restored = quant.QuantState.from_dict(tensors, state.shape, state.dtype, "fp4", 128)
    assert torch.equal(quant.dequantize_4bit(packed, restored), quant.dequantize_4bit(packed, state))


# ---------------------------------------------------------------------------------- Linear4bit

def make_linear(in_features=96, out_features=80, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_linear4bit_forward_is_linear_with_dequantized_weight(quant_type, double_quant):
    linear = make_linear()
    layer = quant.Linear4bit.from_linear(linear, quant_type, 64, double_quant)
    w_hat = layer.dequantized_weight()
    assert w_hat.shape == (80, 96) and w_hat.dtype == torch.float32
    assert torch.equal(w_hat, quant.dequantize_4bit(*quant.quantize_4bit(linear.weight, quant_type, 64,
                                                                         double_quant)))
    x = randn(3, 5, 96)
    assert torch.equal(layer(x), F.linear(x, w_hat, linear.bias))
    assert (w_hat - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()  # close, not equal


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequantize_into_a_dtype_rounds_once_as_bitsandbytes(quant_type, dtype):
    """code · absmax in fp32, rounded once into the output dtype: bit for bit what casting the fp32 result
    gives and what the definition gives, and what bitsandbytes returns for a state of that dtype."""
    w = randn(37, 64)
    packed, state = quant.quantize_4bit(w, quant_type, 64, double_quant=True)
    w_hat = quant.dequantize_4bit(packed, state, dtype)
    assert_same_bits(w_hat, quant.dequantize_4bit(packed, state).to(dtype))
    ref_packed, ref_state = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    expected = reference_dequantize(ref_packed, bnb_block_absmax(ref_state), quant_type, 64, w.shape, dtype)
    assert_same_bits(w_hat, expected)
    ref_state.dtype = dtype
    assert_bnb_dequantize_follows_definition(ref_packed, ref_state, expected)


def test_linear4bit_runs_in_the_autocast_or_input_dtype():
    linear = make_linear()
    layer = quant.Linear4bit.from_linear(linear)
    w16, b16 = layer.dequantized_weight(torch.bfloat16), linear.bias.detach().to(torch.bfloat16)
    assert torch.equal(w16, layer.dequantized_weight().to(torch.bfloat16))
    x = randn(3, 96).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(x.detach().to(torch.bfloat16), w16, b16))
    y.float().sum().backward()  # backward outside autocast still runs in bf16: dy (bf16) @ W_hat (bf16)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, (torch.ones(3, 80, dtype=torch.bfloat16) @ w16).float())
    x16 = x.detach().to(torch.bfloat16)
    assert torch.equal(layer(x16), F.linear(x16, w16, b16))  # a bf16 input, no autocast


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_state_dict_round_trip(double_quant, bias):
    layer = quant.Linear4bit.from_linear(make_linear(bias=bias), "nf4", 32, double_quant)
    state_dict = layer.state_dict()
    expected = {"weight_codes"} | ({"weight_absmax_codes", "weight_absmax_scales", "weight_absmax_offset"}
                                   if double_quant else {"weight_absmax"}) | ({"bias"} if bias else set())
    assert set(state_dict) == expected

    fresh = quant.Linear4bit(96, 80, bias=bias, quant_type="nf4", blocksize=32, double_quant=double_quant)
    fresh.load_state_dict(state_dict)  # strict: same keys, same shapes
    x = randn(4, 96)
    assert torch.equal(fresh(x), layer(x))


def test_linear4bit_has_no_parameters_and_passes_gradients_to_input():
    layer = quant.Linear4bit.from_linear(make_linear())
    assert list(layer.parameters()) == []
    assert not any(b.requires_grad for b in layer.buffers())
    x = randn(2, 96).requires_grad_()
    layer(x).sum().backward()
    # the same column sums, added up in another order by the matmul than by sum(0)
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand(2, -1), rtol=1e-5, atol=1e-6)


def test_linear4bit_storage_and_bits_per_parameter():
    with_dq = quant.Linear4bit.from_linear(make_linear(1024, 1024), "nf4", 64, double_quant=True)
    without = quant.Linear4bit.from_linear(make_linear(1024, 1024), "nf4", 64, double_quant=False)
    n = 1024 * 1024
    blocks = n // 64
    assert without.storage_bytes() == n // 2 + 4 * blocks + 4 * 1024  # codes + fp32 absmax + fp32 bias
    assert with_dq.storage_bytes() == n // 2 + blocks + 4 * (blocks // 256) + 4 + 4 * 1024
    assert quant.bits_per_parameter(without) == 4.5
    assert quant.bits_per_parameter(with_dq) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n)
    assert quant.bits_per_parameter(with_dq) <= 4.13
    model = nn.Sequential(with_dq, nn.ReLU(), without)  # weighted over all Linear4bit layers
    assert quant.bits_per_parameter(model) == pytest.approx((quant.bits_per_parameter(with_dq) + 4.5) / 2)


def test_linear4bit_repr_and_dtype_of_source():
    layer = quant.Linear4bit.from_linear(make_linear(bias=False).to(torch.bfloat16), "fp4", 128, False)
    assert "in_features=96, out_features=80" in repr(layer) and "quant_type=fp4" in repr(layer)
    assert layer.bias is None and layer.dequantized_weight().dtype == torch.float32


# ---------------------------------------------------------------------------------- bad input

def test_unknown_quant_type():
    with pytest.raises(ValueError, match=r"unknown quant_type 'int4'; valid: 'nf4', 'fp4'"):
        quant.quantize_4bit(randn(64), "int4")
    with pytest.raises(ValueError, match="unknown quant_type"):
        quant.Linear4bit(8, 8, quant_type="NF4")


@pytest.mark.parametrize("blocksize", [16, 48, 100, 8192, 0, -64, True, 64.0])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match=r"blocksize must be a power of two from 32 to 4096, got"):
        quant.quantize_4bit(randn(64), "nf4", blocksize)


@pytest.mark.parametrize("w", [torch.arange(64), torch.ones(64, dtype=torch.bool), [1.0, 2.0]], ids=str)
def test_non_floating_input(w):
    with pytest.raises(ValueError, match="quantize_4bit needs a floating-point tensor, got"):
        quant.quantize_4bit(w)


def test_empty_tensor_and_mismatched_codes():
    with pytest.raises(ValueError, match="empty tensor"):
        quant.quantize_4bit(torch.zeros(0, 4))
    packed, state = quant.quantize_4bit(randn(10, 10))
    with pytest.raises(ValueError, match=r"must be 50 uint8 values for shape \(10, 10\), got 49"):
        quant.dequantize_4bit(packed[:49], state)


def test_bits_per_parameter_without_quantized_layers():
    with pytest.raises(ValueError, match="no Linear4bit layers"):
        quant.bits_per_parameter(nn.Linear(4, 4))


# ---------------------------------------------------------------------------------- the fast twin

def states_equal(a: quant.QuantState, b: quant.QuantState) -> bool:
    tensors_a, tensors_b = a.to_dict(), b.to_dict()
    return (tensors_a.keys() == tensors_b.keys() and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
            and (a.shape, a.dtype, a.quant_type, a.blocksize) == (b.shape, b.dtype, b.quant_type, b.blocksize))


FAST_SHAPES = [(7,), (130, 33), (601, 999)]  # odd sizes, partial blocks, and several of the twin's chunks


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", quant.BLOCKSIZES)
@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "torch"])
def test_fast_quantize_and_dequantize_are_the_core_bit_for_bit(monkeypatch, native, blocksize, quant_type,
                                                               double_quant):
    """Both versions of the fast dequantizer: its native kernel (where a C compiler is) and its torch code."""
    monkeypatch.setenv("MINIPEFT_NATIVE", native)
    for shape in FAST_SHAPES:
        w = randn(*shape, seed=math.prod(shape)) * 0.02
        packed, state = quant.quantize_4bit(w, quant_type, blocksize, double_quant)
        fast_packed, fast_state = fast_nf4.quantize_4bit(w, quant_type, blocksize, double_quant)
        assert torch.equal(fast_packed, packed) and states_equal(fast_state, state)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            fast_w_hat = fast_nf4.dequantize_4bit(packed, state, dtype)
            assert_same_bits(fast_w_hat, quant.dequantize_4bit(packed, state, dtype))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_fast_dequantize_across_chunk_boundaries(monkeypatch, quant_type):
    """Chunks of 64 values: every path of the twin's loop (fp32 in place, bf16/fp16 through the buffer) crosses
    many chunk boundaries and ends in a partial block, with odd padding and double-quantization groups."""
    monkeypatch.setattr(fast_nf4, "CHUNKS", dict.fromkeys(fast_nf4.CHUNKS, 64))
    monkeypatch.setenv("MINIPEFT_NATIVE", "0")  # the torch code's chunks (the native kernel has none)
    for shape, blocksize in [((7,), 32), ((130, 33), 32), ((301, 7), 64), ((257, 129), 128)]:
        w = randn(*shape, seed=math.prod(shape))
        packed, state = quant.quantize_4bit(w, quant_type, blocksize, double_quant=True)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            expected = quant.dequantize_4bit(packed, state, dtype)
            assert_same_bits(fast_nf4.dequantize_4bit(packed, state, dtype), expected)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("name", list(edge_case_tensors()))
def test_fast_twin_on_edge_cases(name, quant_type, double_quant):
    w = edge_case_tensors()[name]
    packed, state = quant.quantize_4bit(w, quant_type, 32, double_quant)
    fast_packed, fast_state = fast_nf4.quantize_4bit(w, quant_type, 32, double_quant)
    assert torch.equal(fast_packed, packed) and states_equal(fast_state, state)
    assert_same_bits(fast_nf4.dequantize_4bit(packed, state), quant.dequantize_4bit(packed, state))


@pytest.fixture
def fast_twins():
    """minipeft.fast enabled for one test, then the core back."""
    minipeft.fast.enable()
    yield
    minipeft.fast.disable()


def output_and_input_gradient(layer, x, autocast: bool):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.float().square().sum().backward()
    return y, x.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_fast_linear4bit_is_the_core_bit_for_bit(dtype, autocast, bias):
    layer = quant.Linear4bit.from_linear(make_linear(bias=bias), "nf4", 64, double_quant=True)
    x = randn(2, 5, 96, dtype=dtype)
    y, grad = output_and_input_gradient(layer, x, autocast)
    minipeft.fast.enable()
    try:
        assert quant.Linear4bit.forward is fast_nf4.linear4bit_forward
        fast_y, fast_grad = output_and_input_gradient(layer, x, autocast)
    finally:
        minipeft.fast.disable()
    assert quant.Linear4bit.forward is not fast_nf4.linear4bit_forward
    assert_same_bits(fast_y, y)
    assert_same_bits(fast_grad, grad)


def test_enable_swaps_the_core_names_and_disable_restores_them(fast_twins):
    assert quant.quantize_4bit is fast_nf4.quantize_4bit and quant.dequantize_4bit is fast_nf4.dequantize_4bit
    layer = quant.Linear4bit.from_linear(make_linear())  # from_linear and dequantized_weight call the twins
    assert torch.equal(layer.dequantized_weight(), fast_nf4.dequantize_4bit(layer.weight_codes, layer.quant_state))
    minipeft.fast.disable()
    assert not minipeft.fast.enabled() and quant.dequantize_4bit is not fast_nf4.dequantize_4bit
