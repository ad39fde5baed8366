"""minipeft/quant.py: bit-exact parity with bitsandbytes' CPU 4-bit quantizer, round-trip error, Linear4bit
(buffers, state_dict, bits per parameter) and bad input."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minipeft import quant

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


def assert_matches_bnb(w, quant_type, blocksize, double_quant):
    """Packed codes, every state tensor and the dequantized tensor identical to bitsandbytes."""
    ref_packed, ref_state = bnb.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                              compress_statistics=double_quant)
    ref_w = bnb.dequantize_4bit(ref_packed, ref_state)
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

    w_hat = quant.dequantize_4bit(packed, state)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    assert torch.equal(w_hat, ref_w.reshape(w.shape))  # bnb returns a 1-D even-length input as (1, n)


# ---------------------------------------------------------------------------------- bitsandbytes parity

@needs_bnb
def test_code_books_match_bitsandbytes():
    assert torch.equal(quant.NF4_CODE, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(quant.FP4_CODE, bnb.get_4bit_type("fp4", device="cpu"))
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
    ties = {qt: torch.cat([torch.ones(1), quant.TABLES[qt].midpoints, -quant.TABLES[qt].midpoints]).repeat(40)
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
def test_fp4_negative_zero_matches_bnb_kernel_bitwise():
    """fp4 code 0b1000 decodes to -0.0, as in bitsandbytes' C kernel (even last dimension). Its Python
    fallback for odd last dimensions gives +0.0; torch.equal cannot see the difference, so check bits."""
    w = torch.cat([torch.ones(1), torch.full((63,), 1e-3), torch.full((64,), -1e-3)]).view(2, 64)
    packed, state = quant.quantize_4bit(w, "fp4", 64, double_quant=False)
    ref_packed, ref_state = bnb.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert torch.equal(packed, ref_packed.view(-1))
    assert packed[1] == 0x88  # tiny positive values: the sign-bit zero (bnb CPU's choice)
    w_hat = quant.dequantize_4bit(packed, state)
    assert torch.equal(w_hat.view(torch.int32), bnb.dequantize_4bit(ref_packed, ref_state).view(torch.int32))
    assert torch.signbit(w_hat[0, 1])


# ---------------------------------------------------------------------------------- rounding rule

@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_nearest_rank_is_exactly_bucketize(quant_type):
    """The cell-table shortcut gives the same rank as counting midpoints below x — also for the fp32
    neighbours of every midpoint and of every cell edge, where an off-by-one would show."""
    tables = quant.TABLES[quant_type]
    edges = torch.linspace(-1, 1, quant.CELLS + 1)
    critical = torch.cat([tables.midpoints, edges, torch.tensor([-1.0, 0.0, -0.0, 1.0])])
    x = torch.cat([critical, critical.nextafter(torch.tensor(2.0)), critical.nextafter(torch.tensor(-2.0)),
                   torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    assert torch.equal(tables.nearest_rank(x).long(), torch.bucketize(x, tables.midpoints))


def test_ties_take_the_lower_code():
    midpoints = quant.TABLES["nf4"].midpoints
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
    """code · absmax in fp32, rounded once into the output dtype: what casting the fp32 result gives, and
    bit for bit what bitsandbytes returns for a state of that dtype."""
    w = randn(37, 64)
    packed, state = quant.quantize_4bit(w, quant_type, 64, double_quant=True)
    w_hat = quant.dequantize_4bit(packed, state, dtype)
    assert w_hat.dtype == dtype and torch.equal(w_hat, quant.dequantize_4bit(packed, state).to(dtype))
    ref_packed, ref_state = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    ref_state.dtype = dtype
    assert torch.equal(w_hat.view(torch.int16), bnb.dequantize_4bit(ref_packed, ref_state).view(torch.int16))


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
    assert torch.allclose(x.grad, layer.dequantized_weight().sum(0).expand(2, -1))


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
