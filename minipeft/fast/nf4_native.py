"""A native CPU kernel for 4-bit dequantization (nf4_native.c), loaded through ctypes: the same bits as
core.nf4.dequantize_4bit, in one pass over the weights on torch's threads instead of fast/nf4.py's three
torch calls (an index_select that runs on one thread, an in-place scaling, for bf16/fp16 a copy).

    dequantize_4bit(packed, state, dtype)   the dequantized tensor, or None when the kernel cannot run —
                                            fast/nf4.py's torch version then does the work (the same bits)

The C file is compiled on first use with the system's C compiler ($CC, else `cc`, else `gcc`) as
`cc -O3 -shared -fPIC -ffp-contract=off -fopenmp` — built for baseline x86-64, never -march=native (a
native build can die with "illegal instruction" on another CPU generation); the kernel picks its AVX-512,
AVX2 or plain-C loop at run time. The library is cached in $XDG_CACHE_HOME/minipeft/native (else
~/.cache/minipeft/native) under a hash of the source, the flags and the compiler, written to a temporary
name and renamed, so two processes never load a half-written file. No compiler, a failed build, a tensor
that is not a contiguous CPU tensor, or an output dtype other than fp32/bf16/fp16: None, and a debug log
line saying why, once. MINIPEFT_NATIVE=0 in the environment switches the kernel off.
"""
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from minipeft.core.nf4 import CODES, DOUBLE_QUANT_BLOCKSIZE, QuantState

SOURCE = Path(__file__).with_name("nf4_native.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fopenmp")
OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # out_kind of the C function
log = logging.getLogger(__name__)

_library = None  # the loaded ctypes library; False once building or loading it failed (not retried)
loop = None  # the loop the kernel runs on this CPU: 2 AVX-512, 1 AVX2, 0 plain C (tests may lower it)
calls = 0  # how many dequantizations the kernel did (tests check that the hook reaches it)


def enabled() -> bool:
    """False when MINIPEFT_NATIVE=0 (or "false", "off", "no")."""
    return os.environ.get("MINIPEFT_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def compiler() -> str | None:
    """$CC if set, else `cc` or `gcc` found on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minipeft" / "native"


def build(cc: str) -> Path:
    """Compile nf4_native.c once per (source, flags, compiler, machine); returns the library's path."""
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, cc, platform.machine())).encode()).hexdigest()
    target = cache_folder() / f"nf4_native-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            subprocess.run([cc, *FLAGS, "-o", str(temporary), str(SOURCE)], check=True, capture_output=True,
                           timeout=120)
            os.replace(temporary, target)  # atomic: another process sees no library or a whole one
        finally:
            temporary.unlink(missing_ok=True)
    return target


def library():
    """The loaded kernel, built on first use; None if it cannot be built or loaded (logged once)."""
    global _library, loop
    if _library is None:
        cc = compiler()
        try:
            if cc is None:
                raise FileNotFoundError("no C compiler (set CC, or install cc/gcc)")
            lib = ctypes.CDLL(str(build(cc)))  # CDLL: the GIL is released during each call
            lib.dequantize_nf4.restype = None
            lib.dequantize_nf4.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, Absmax,
                                           ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            loop = lib.dequantize_nf4_loop()
            _library = lib
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            log.debug("native 4-bit kernel unavailable, using the torch version: %s %s", error,
                      detail.decode(errors="replace")[-500:])
            _library = False
    return _library or None


class Absmax(ctypes.Structure):
    """The C struct Absmax: the blocks' fp32 absmax, or its double quantization (codes, map, scales, offset)."""
    _fields_ = [("absmax", ctypes.c_void_p), ("dyn_code", ctypes.c_void_p), ("dyn_map", ctypes.c_void_p),
                ("dyn_scale", ctypes.c_void_p), ("offset", ctypes.c_float), ("dyn_blocksize", ctypes.c_int64)]


def absmax_struct(state: QuantState) -> Absmax | None:
    """state's absmax for the kernel, or None if a tensor is not contiguous fp32 (uint8 codes) on the CPU."""
    if not state.double_quant:
        return Absmax(absmax=state.absmax.data_ptr()) if usable(state.absmax, torch.float32) else None
    codes, code_map, scales, offset = (state.absmax_codes, state.absmax_code_map, state.absmax_scales,
                                       state.absmax_offset)
    if not (usable(codes, torch.uint8) and usable(code_map, torch.float32) and usable(scales, torch.float32)
            and usable(offset, torch.float32)):
        return None
    return Absmax(None, codes.data_ptr(), code_map.data_ptr(), scales.data_ptr(), offset.item(), DOUBLE_QUANT_BLOCKSIZE)


def usable(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """A contiguous CPU tensor of dtype (is_cpu, not device.type: this runs per call, and is 10× faster)."""
    return t is not None and t.is_cpu and t.dtype == dtype and t.is_contiguous()


_codes = {name: code.float().contiguous() for name, code in CODES.items()}  # (16,) fp32, kept alive


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """fast.nf4.dequantize_4bit's native twin (packed already checked by check_packed): a tensor of
    state.shape in dtype (default state.dtype), or None when the kernel cannot run here."""
    global calls
    dtype = dtype or state.dtype
    if dtype not in OUT_KINDS or not usable(packed, torch.uint8) or not enabled() or library() is None:
        return None
    absmax = absmax_struct(state)  # pointers into state's tensors, which outlive the call
    if absmax is None:
        return None
    out = torch.empty(state.shape, dtype=dtype)
    _library.dequantize_nf4(packed.data_ptr(), state.numel, _codes[state.quant_type].data_ptr(), state.blocksize,
                            absmax, out.data_ptr(), OUT_KINDS[dtype], torch.get_num_threads(), loop)
    calls += 1
    return out
