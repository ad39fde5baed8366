"""minipeft/fast/nf4_native.c (through nf4_native.py): bit for bit core.nf4.dequantize_4bit on every loop the
kernel has (AVX-512, AVX2, plain C: the ones this CPU runs), 1 and 2 threads, every block size, both code
books, with and without double quantization, fp32/bf16/fp16 output — on absmax values made to land on the
rounding corners (ties, subnormals, fp16 overflow, zeros, inf and NaN); and the hook in fast.nf4: it runs the
kernel when it can and falls back to the torch code (the same bits) when it cannot. The native tests are
skipped only where no C compiler is found."""
import math

import pytest
import torch

from minipeft.core import nf4 as core
from minipeft.fast import nf4 as fast_nf4
from minipeft.fast import nf4_native

needs_compiler = pytest.mark.skipif(nf4_native.compiler() is None, reason="no C compiler (cc/gcc, or $CC)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def native_on(monkeypatch):
    monkeypatch.setenv("MINIPEFT_NATIVE", "1")


def paths() -> list[int]:
    """The kernel's loops this CPU can run: 2 AVX-512, 1 AVX2, 0 plain C."""
    return list(range(nf4_native.loop + 1)) if nf4_native.library() is not None else [0]


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    """The same bits, except that a NaN may be any NaN: which one torch writes for a NaN depends on its
    CPU kernel (vectorized: 0xFFFF in bf16; its scalar fallback: 0x7FC0), and no weight is NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan()), "NaN in other places"
    as_int = {4: torch.int32, 2: torch.int16}[a.element_size()]
    numbers = ~b.isnan()
    assert torch.equal(a.view(as_int)[numbers], b.view(as_int)[numbers]), (a.view(-1)[:8], b.view(-1)[:8])


def native(packed, state, dtype, path, threads, monkeypatch):
    """The kernel on one loop and thread count (it must run: a compiler is there)."""
    monkeypatch.setattr(nf4_native, "loop", path)
    before, calls = torch.get_num_threads(), nf4_native.calls
    torch.set_num_threads(threads)
    try:
        out = nf4_native.dequantize_4bit(packed, state, dtype)
    finally:
        torch.set_num_threads(before)
    assert out is not None and nf4_native.calls == calls + 1
    return out


def random_bytes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def corner_absmax() -> torch.Tensor:
    """fp32 absmax values where rounding to bf16 / fp16 is delicate (with code ±1.0 the product is the value
    itself): ties with an even and an odd kept part, just beside them, fp16's largest value and the ties
    and overflows around it, subnormals of fp16 and fp32, zero, inf and NaN."""
    bits = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7F8000, 0x7F7FFFFF,  # bf16 ties, near, max
            0x3F801000, 0x3F803000, 0x3F800FFF, 0x3F801001, 0x33800000, 0x33000000, 0x33C00000,  # fp16 ties
            0x387FE000, 0x387FF000, 0x00000001, 0x00400000, 0x00008000, 0x00018000,  # subnormals
            0x477FE000, 0x477FEFFF, 0x477FF000, 0x47800000, 0x7F000000,  # 65504, below/at tie to inf, 2^16
            0x00000000, 0x7F800000, 0x7FC00000, 0x7FA00001]  # 0, inf, NaN, a NaN with a payload
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


def plain_state(shape, quant_type, blocksize, absmax) -> core.QuantState:
    return core.QuantState(torch.Size(shape), torch.float32, quant_type, blocksize, absmax=absmax.contiguous())


def double_quant_state(shape, quant_type, blocksize, seed) -> core.QuantState:
    """Random 8-bit absmax codes, group scales and offset: every rounding of dynamic[c] · scale + offset."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = math.ceil(math.prod(shape) / blocksize)
    n_groups = math.ceil(n_blocks / core.DOUBLE_QUANT_BLOCKSIZE)
    return core.QuantState(torch.Size(shape), torch.float32, quant_type, blocksize,
                           absmax_codes=torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, generator=g),
                           absmax_scales=torch.rand(n_groups, generator=g) * 3,
                           absmax_offset=torch.rand((), generator=g), absmax_code_map=core.DYNAMIC_CODE)


# --------------------------------------------------------------------------------------- bit for bit

@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", core.QUANT_TYPES)
def test_every_blocksize_path_and_dtype_is_the_core(monkeypatch, quant_type, double_quant, threads):
    """Odd n (the last byte's low nibble dropped) and a partial last block of every length class; real
    quantized weights (their state as quantize_4bit makes it), then random codes and state."""
    for blocksize in core.BLOCKSIZES:
        for n in (1, 3, blocksize - 1, blocksize + 17, 3 * blocksize + 33, min(260 * blocksize, 1 << 16) + 5):
            shape = (n,)
            if double_quant:
                state = double_quant_state(shape, quant_type, blocksize, seed=n)
            else:
                absmax = torch.rand(math.ceil(n / blocksize), generator=torch.Generator().manual_seed(n)) * 4
                state = plain_state(shape, quant_type, blocksize, absmax)
            packed = random_bytes(n, seed=blocksize + n)
            for dtype in DTYPES:
                expected = core.dequantize_4bit(packed, state, dtype)
                for path in paths():
                    assert_same_bits(native(packed, state, dtype, path, threads, monkeypatch), expected)
    w = torch.randn(130, 33, generator=torch.Generator().manual_seed(1)) * 0.02
    packed, state = core.quantize_4bit(w, quant_type, 64, double_quant)
    for dtype in DTYPES:
        for path in paths():
            assert_same_bits(native(packed, state, dtype, path, threads, monkeypatch),
                             core.dequantize_4bit(packed, state, dtype))


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("quant_type", core.QUANT_TYPES)
def test_rounding_corners_are_the_core(monkeypatch, quant_type, threads):
    """Each block holds every code (nf4: -1 … 1; fp4: ±0 … ±1) and gets one corner absmax: ties round to
    even, fp16 overflows to inf exactly where torch's does, subnormals and zeros keep their bits, NaN too."""
    absmax = corner_absmax()
    n = 32 * len(absmax) + 31  # blocks of 32, the last one partial (and n odd)
    packed = torch.arange(16, dtype=torch.uint8).repeat(2 * len(absmax) + 2)[:(n + 1) // 2] * 17 ^ 0x0F
    state = plain_state((n,), quant_type, 32, torch.cat([absmax, absmax[:1]]))
    for dtype in DTYPES:
        expected = core.dequantize_4bit(packed, state, dtype)
        for path in paths():
            assert_same_bits(native(packed, state, dtype, path, threads, monkeypatch), expected)


@needs_compiler
def test_random_absmax_bit_patterns_are_the_core(monkeypatch):
    """absmax as random fp32 bit patterns, over the whole range: the products hit every exponent."""
    g = torch.Generator().manual_seed(0)
    absmax = torch.randint(-2**31, 2**31 - 1, (4096,), dtype=torch.int32, generator=g).view(torch.float32)
    n = 4096 * 32 - 9
    state, packed = plain_state((n,), "nf4", 32, absmax), random_bytes(n, seed=1)
    for dtype in DTYPES:
        expected = core.dequantize_4bit(packed, state, dtype)
        for path in paths():
            assert_same_bits(native(packed, state, dtype, path, 2, monkeypatch), expected)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_writes_exactly_n_values(threads):
    """Called directly on a longer buffer of sentinels: the n values are the core's, nothing after them is
    touched (an odd n, a last block of 1, 31 and 33 values, on every loop)."""
    for blocksize, n in [(32, 1), (32, 33), (32, 95), (64, 64 * 5 + 31), (128, 128 * 3 + 33), (64, 64 * 4)]:
        state = plain_state((n,), "nf4", blocksize, torch.rand(math.ceil(n / blocksize)) + 0.5)
        packed = random_bytes(n, seed=n)
        for dtype, kind in nf4_native.OUT_KINDS.items():
            for path in paths():
                out = torch.full((n + 64,), -7.0, dtype=dtype)
                nf4_native.library().dequantize_nf4(packed.data_ptr(), n, nf4_native._codes["nf4"].data_ptr(),
                                                    blocksize, nf4_native.absmax_struct(state), out.data_ptr(),
                                                    kind, threads, path)
                assert_same_bits(out[:n], core.dequantize_4bit(packed, state, dtype))
                assert bool((out[n:] == -7.0).all()), (dtype, path, n)


@needs_compiler
def test_output_has_the_state_shape_and_default_dtype(monkeypatch):
    w = torch.randn(3, 5, 7)
    packed, state = core.quantize_4bit(w, "nf4", 32, True)
    out = native(packed, state, None, nf4_native.loop, 1, monkeypatch)
    assert out.shape == (3, 5, 7) and out.dtype == torch.float32
    state.dtype = torch.float16
    assert native(packed, state, None, nf4_native.loop, 1, monkeypatch).dtype == torch.float16


# ---------------------------------------------------------------------------------- the hook, the fallback

def quantized(shape=(61, 37), double_quant=True):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    return core.quantize_4bit(w, "nf4", 64, double_quant)


@needs_compiler
def test_the_fast_twin_runs_the_kernel():
    packed, state = quantized()
    calls = nf4_native.calls
    for dtype in DTYPES:
        assert_same_bits(fast_nf4.dequantize_4bit(packed, state, dtype), core.dequantize_4bit(packed, state, dtype))
    assert nf4_native.calls == calls + 3


def test_minipeft_native_0_switches_it_off(monkeypatch):
    monkeypatch.setenv("MINIPEFT_NATIVE", "0")
    packed, state = quantized()
    calls = nf4_native.calls
    for dtype in DTYPES:
        assert_same_bits(fast_nf4.dequantize_4bit(packed, state, dtype), core.dequantize_4bit(packed, state, dtype))
    assert nf4_native.calls == calls


def test_without_a_compiler_the_torch_code_runs(monkeypatch, tmp_path):
    """CC names no program and the cache is empty: no library, the torch version, the same bits."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(nf4_native, "_library", None)
    packed, state = quantized()
    calls = nf4_native.calls
    for dtype in DTYPES:
        assert_same_bits(fast_nf4.dequantize_4bit(packed, state, dtype), core.dequantize_4bit(packed, state, dtype))
    assert nf4_native.calls == calls and nf4_native._library is False


def test_a_failing_build_falls_back(monkeypatch, tmp_path):
    """A "compiler" that exits with an error: no library, no half-written file in the cache."""
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(nf4_native, "_library", None)
    packed, state = quantized()
    assert nf4_native.dequantize_4bit(packed, state, torch.float32) is None
    assert list((tmp_path / "minipeft" / "native").iterdir()) == []


@needs_compiler
def test_a_fresh_cache_builds_one_library(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(nf4_native, "_library", None)
    monkeypatch.setattr(nf4_native, "loop", None)
    assert nf4_native.library() is not None and nf4_native.loop in (0, 1, 2)
    built = list((tmp_path / "minipeft" / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"


@needs_compiler
def test_what_the_kernel_cannot_take_falls_back(monkeypatch):
    """A strided packed tensor, a float64 output, an absmax that is not fp32: the torch code (same bits)."""
    packed, state = quantized(double_quant=False)
    strided = torch.zeros(2 * len(packed), dtype=torch.uint8)[::2]
    strided.copy_(packed)
    assert nf4_native.dequantize_4bit(strided, state, torch.float32) is None
    assert nf4_native.dequantize_4bit(packed, state, torch.float64) is None
    assert_same_bits(fast_nf4.dequantize_4bit(strided, state, torch.float32), core.dequantize_4bit(packed, state))
    assert torch.equal(fast_nf4.dequantize_4bit(packed, state, torch.float64),
                       core.dequantize_4bit(packed, state, torch.float64))
    half_state = plain_state(state.shape, "nf4", 64, state.absmax.half())
    assert nf4_native.dequantize_4bit(packed, half_state, torch.float32) is None
