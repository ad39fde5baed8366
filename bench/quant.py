"""4-bit quantization of one weight matrix: minipeft's readable core (minipeft/core/nf4.py), its fast twin
(minipeft/fast/nf4.py, what train.py runs) and bitsandbytes (CPU backend), side by side.

For NF4 and FP4, each with and without double quantization: quantize and dequantize time (median of
--repeats runs after warm-up, the three interleaved so that load on the machine hits them alike),
storage bits per weight, mean absolute round-trip error on w ~ N(0, 1), and whether the packed codes and
state of both minipeft versions are identical to bitsandbytes' and the dequantized matrix is code[q]·absmax
of them exactly (compared
with that definition, not with bitsandbytes' dequantize: its CPU kernels differ by CPU, and one is noted
below the table when it departs from the definition). A plain symmetric int4 absmax row is the baseline.

Then dequantization on SmolLM2-135M's own weight shapes (NF4 + double quantization, block 64, fp32 and
bf16 output), the fast twin against bitsandbytes: best of --rounds interleaved single calls (the best
rather than the median: on a shared machine it is the run the others disturbed least), and the ratio.
The CPU's flags that decide which bitsandbytes kernel runs are printed above it, with the load average.

Then the QLoRA paper's perplexity comparison on our own data: SmolLM2-135M perplexity on the Hamlet
test split with every block linear layer rounded through fp32 (no rounding), int4, fp4, nf4 and nf4 with
double quantization. (The released SmolLM2 file is itself Q4_1, so "fp32" means its dequantized weights.)

    python bench/quant.py                      # 4096 x 4096 fp32, block size 64, 2 threads
    python bench/quant.py --size 1024 --threads 1 --no-perplexity
    python bench/quant.py --only-smollm2-shapes --threads 1 --rounds 300
"""
import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnb  # noqa: E402

from minipeft.core import nf4 as quant  # noqa: E402
from minipeft.fast import nf4 as fast  # noqa: E402
from minipeft.fast import nf4_native  # noqa: E402
from machine import cpu_description, load_average  # noqa: E402  (bench/machine.py)


def median_ms(functions, repeats: int, warmup: int = 2) -> list[float]:
    """Median wall time in milliseconds of each zero-argument function, run interleaved a, b, a, b, …"""
    for fn in functions:
        for _ in range(warmup):
            fn()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for fn, fn_times in zip(functions, times):
            start = time.perf_counter()
            fn()
            fn_times.append(1e3 * (time.perf_counter() - start))
    return [statistics.median(t) for t in times]


def int4_absmax_round_trip(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Plain symmetric int4 per block: q = round(7 · w / absmax) in [-7, 7], w_hat = q · absmax / 7."""
    blocks = w.reshape(-1, blocksize)  # (n/bs, bs)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)  # (n/bs, 1)
    return (torch.round(blocks / absmax * 7) * absmax / 7).view_as(w)


def storage_bits_per_weight(packed: torch.Tensor, state: quant.QuantState) -> float:
    tensors = [packed, *state.to_dict().values()]
    return 8 * sum(t.numel() * t.element_size() for t in tensors) / state.numel


def by_definition(ref_packed, ref_state) -> torch.Tensor:
    """code[q] · absmax of bitsandbytes' codes and state, written out: what a dequantizer must return (fp32)."""
    n = ref_state.shape.numel()
    packed = ref_packed.view(-1).long()
    q = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:n]  # (n,) high nibble first
    absmax = ref_state.absmax
    if ref_state.nested:  # double quantization: its 8-bit absmax undone first
        absmax = bnb.dequantize_blockwise(ref_state.absmax, ref_state.state2) + ref_state.offset
    code = bnb.get_4bit_type(ref_state.quant_type, device="cpu")
    return (code[q] * absmax[torch.arange(n) // ref_state.blocksize]).view(ref_state.shape)


def same_as_bnb(packed, state, ref_packed, ref_state, expected, dequantize) -> bool:
    """Packed codes and absmax (or its 8-bit codes, scales and offset) equal, and the weights `dequantize`
    returns equal to `expected`, code[q]·absmax of those."""
    if state.double_quant:
        absmax = [state.absmax_codes, state.absmax_scales, state.absmax_offset]
        ref_absmax = [ref_state.absmax, ref_state.state2.absmax, ref_state.offset]
    else:
        absmax, ref_absmax = [state.absmax], [ref_state.absmax]
    return (torch.equal(packed, ref_packed.view(-1)) and all(map(torch.equal, absmax, ref_absmax))
            and torch.equal(dequantize(packed, state), expected))


NATIVE_LOOPS = {2: "AVX-512", 1: "AVX2", 0: "plain C"}
SMOLLM2_SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))  # q and o; k and v; gate and up; down


def best_us(functions, rounds: int) -> list[float]:
    """Best wall time in microseconds of each zero-argument function, single calls interleaved a, b, a, b, …"""
    for fn in functions:
        fn()
    best = [math.inf] * len(functions)
    for _ in range(rounds):
        for i, fn in enumerate(functions):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], 1e6 * (time.perf_counter() - start))
    return best


def torch_twin_dequantize(packed, state, dtype):
    """fast.dequantize_4bit with its native kernel switched off (MINIPEFT_NATIVE=0): the torch code alone."""
    before = os.environ.get("MINIPEFT_NATIVE")
    os.environ["MINIPEFT_NATIVE"] = "0"
    try:
        return fast.dequantize_4bit(packed, state, dtype)
    finally:
        if before is None:
            del os.environ["MINIPEFT_NATIVE"]
        else:
            os.environ["MINIPEFT_NATIVE"] = before


def smollm2_shapes_table(rounds: int):
    """Dequantization of SmolLM2-135M's weight shapes, NF4 + DQ: the fast twin's torch code and its native
    kernel (nf4_native.c, what the fast twin runs on CPU when a C compiler is there) against bitsandbytes."""
    native = nf4_native.library() is not None and nf4_native.enabled()
    kernel = f"native loop {NATIVE_LOOPS[nf4_native.loop]}" if native else "native kernel unavailable"
    print(f"\nDequantization on SmolLM2-135M's weight shapes, NF4 + double quantization, block size 64, "
          f"threads {torch.get_num_threads()}, best wall time of {rounds} interleaved calls | {cpu_description()}; "
          f"{kernel}; {load_average()}\n")
    print("| shape | output | torch twin µs | native µs | bnb µs | torch twin / bnb | native / bnb |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SMOLLM2_SHAPES:
            w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            packed, state = fast.quantize_4bit(w, "nf4", 64, True)
            ref_packed, ref_state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            ref_state = copy.copy(ref_state)
            ref_state.dtype = dtype  # bitsandbytes dequantizes into the state's dtype
            functions = [lambda: torch_twin_dequantize(packed, state, dtype),
                         lambda: nf4_native.dequantize_4bit(packed, state, dtype),
                         lambda: bnb.dequantize_4bit(ref_packed, ref_state)]
            if native:
                twin, ours, theirs = best_us(functions, rounds)
            else:  # the torch twin and bitsandbytes only
                (twin, theirs), ours = best_us(functions[::2], rounds), math.nan
            print(f"| {shape[0]} × {shape[1]} | {str(dtype).removeprefix('torch.')} | {twin:.0f} | {ours:.0f} "
                  f"| {theirs:.0f} | {twin / theirs:.2f} | {ours / theirs:.2f} |", flush=True)


def perplexity_ladder(blocksize: int, max_len: int):
    """SmolLM2 perplexity on Hamlet's test split with its block linears rounded through each format."""
    from minipeft.core import loop
    from minipeft.formats import tasks
    from minipeft import from_pretrained
    from minipeft.core.targets import find as find_targets
    model, tokenizer = from_pretrained("smollm2")
    test = tasks.load_lm("hamlet", tokenizer, max_len=max_len).splits["test"]
    original = {name: t.clone() for name, t in model.state_dict().items()}

    def through(quant_type, double_quant):
        return lambda w: quant.dequantize_4bit(*quant.quantize_4bit(w, quant_type, blocksize, double_quant))
    formats = [("fp32", lambda w: w), ("int4 absmax", lambda w: int4_absmax_round_trip(w, blocksize)),
               ("fp4", through("fp4", False)), ("nf4", through("nf4", False)), ("nf4 + DQ", through("nf4", True))]
    print(f"\nSmolLM2-135M on Hamlet test ({sum(len(x) for x in test.input_ids):,} tokens, windows of "
          f"{max_len}), block linears rounded through each format, block size {blocksize}\n")
    print("| weights | perplexity |")
    print("|---|---|")
    for name, round_trip in formats:
        model.load_state_dict(original)
        with torch.no_grad():
            for parent, attr in find_targets(model, ["all"]):
                weight = getattr(parent, attr).weight
                weight.copy_(round_trip(weight))
        print(f"| {name} | {loop.evaluate(model, test, 'lm', batch_size=8)['perplexity']:.3f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="the weight matrix is size x size fp32")
    parser.add_argument("--blocksize", type=int, default=64, help="elements per absmax block")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weight matrix")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved calls per SmolLM2-shape timing (best)")
    parser.add_argument("--only-smollm2-shapes", action="store_true",
                        help="time dequantization on SmolLM2's weight shapes only (no big table, no perplexity)")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the SmolLM2 perplexity ladder")
    parser.add_argument("--ppl-len", type=int, default=256, help="tokens per window in the perplexity ladder")
    args = parser.parse_args()
    if args.size * args.size % args.blocksize:
        parser.error("size² must be a multiple of --blocksize (for the int4 baseline)")
    quant.check_format("nf4", args.blocksize)

    torch.set_num_threads(args.threads)
    if args.only_smollm2_shapes:
        return smollm2_shapes_table(args.rounds)
    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    print(f"weight {args.size}x{args.size} fp32 ~ N(0, 1), block size {args.blocksize}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats} | torch {torch.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}\n")
    print("| format | double quant | bits / weight | mean abs error | quantize ms core / fast / bnb "
          "| dequantize ms core / fast / bnb | identical to bnb (core, fast) |")
    print("|---|---|---|---|---|---|---|")
    departures = []
    for quant_type in quant.QUANT_TYPES:
        for double_quant in (False, True):
            packed, state = quant.quantize_4bit(w, quant_type, args.blocksize, double_quant)
            fast_packed, fast_state = fast.quantize_4bit(w, quant_type, args.blocksize, double_quant)
            ref_packed, ref_state = bnb.quantize_4bit(w, blocksize=args.blocksize, quant_type=quant_type,
                                                      compress_statistics=double_quant)
            quantize_ms = median_ms([
                lambda: quant.quantize_4bit(w, quant_type, args.blocksize, double_quant),
                lambda: fast.quantize_4bit(w, quant_type, args.blocksize, double_quant),
                lambda: bnb.quantize_4bit(w, blocksize=args.blocksize, quant_type=quant_type,
                                          compress_statistics=double_quant)], args.repeats)
            dequantize_ms = median_ms([lambda: quant.dequantize_4bit(packed, state),
                                       lambda: fast.dequantize_4bit(packed, state),
                                       lambda: bnb.dequantize_4bit(ref_packed, ref_state)], args.repeats)
            error = (quant.dequantize_4bit(packed, state) - w).abs().mean().item()
            expected = by_definition(ref_packed, ref_state)
            identical = [same_as_bnb(packed, state, ref_packed, ref_state, expected, quant.dequantize_4bit),
                         same_as_bnb(fast_packed, fast_state, ref_packed, ref_state, expected, fast.dequantize_4bit)]
            if not torch.equal(bnb.dequantize_4bit(ref_packed, ref_state).view(w.shape), expected):
                departures.append(f"{quant_type}{' + DQ' if double_quant else ''}")
            print(f"| {quant_type} | {'yes' if double_quant else 'no'} | "
                  f"{storage_bits_per_weight(packed, state):.3f} | {error:.4f} | "
                  f"{' / '.join(f'{ms:.0f}' for ms in quantize_ms)} | "
                  f"{' / '.join(f'{ms:.0f}' for ms in dequantize_ms)} | "
                  f"{', '.join('yes' if same else 'NO' for same in identical)} |", flush=True)
    error = (int4_absmax_round_trip(w, args.blocksize) - w).abs().mean().item()
    bits = 4 + 32 / args.blocksize
    print(f"| int4 absmax (symmetric) | no | {bits:.3f} | {error:.4f} | – | – | – |")
    if departures:
        print(f"\nbitsandbytes' own dequantize departs from code[q]·absmax on this CPU "
              f"({torch.backends.cpu.get_cpu_capability()}) for: {', '.join(departures)}")
    smollm2_shapes_table(args.rounds)
    if not args.no_perplexity:
        perplexity_ladder(args.blocksize, args.ppl_len)


if __name__ == "__main__":
    main()
