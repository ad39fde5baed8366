"""Devices and precision: where a model runs, and in which floating-point formats it keeps its weights
and computes.

    model, tok = mp.from_pretrained("smollm2", device="cuda", dtype="bf16-mixed")  # or dtype=torch.bfloat16
    mp.apply(model, "lora", rank=8)          # the adapter's weights follow the precision: fp32 here
    mp.set_precision(model, "bf16-true")     # any time: casts what it must, records the precision
    model.to("cuda:1")                       # everything moves: 4-bit codes and their state, RoPE tables

A precision names three dtypes: the frozen weights' (their storage), the trainable weights' (and so
their gradients and AdamW's two moments, which take the parameter's dtype), and the matmuls':

    precision    frozen   trainable + AdamW   matmuls   bytes per frozen / trainable parameter
    fp32         fp32     fp32                fp32      4 / 16      the default on MPS, a CPU without AMX
    bf16-mixed   bf16     fp32                bf16      2 / 16      the default on a GPU with bf16, a CPU with AMX
    bf16-true    bf16     bf16                bf16      2 / 8
    fp16-mixed   fp16     fp32                fp16      2 / 16      + dynamic loss scaling

bf16-mixed is the QLoRA paper's recipe: the frozen base in half the memory, the small trainable part in
fp32, so that AdamW's updates (lr · m/√v, often below bf16's resolution of 2⁻⁸ relative) are not
rounded away. bf16 keeps fp32's 8 exponent bits and 7 of its 23 mantissa bits: the same range, about
three significant digits. fp16 keeps 10 mantissa bits but only 5 exponent bits (largest 65,504,
smallest normal 6.1e-5), so small gradients underflow to zero: fp16-mixed multiplies the loss by a
scale S before backward and divides the gradients by S before the step (torch.amp.GradScaler); a step
whose scaled gradients overflow is skipped and S halved, and S doubles after 2,000 good steps.

How the matmuls run in the compute dtype: every forward pass of a model whose precision is not fp32
runs under torch.autocast(device, compute dtype) (`compute`, entered by Transformer.encode and
forward), which casts each matmul's inputs — bf16 activations against fp32 adapter weights — to the
compute dtype; its gradient flows back to the fp32 parameter in fp32. What stays fp32, as in
transformers: the RoPE tables (cast to the activations' dtype where used), RMSNorm's statistics,
softmax's accumulation inside scaled_dot_product_attention, the loss (logits are upcast first), a
4-bit layer's quantization state (dequantized into the compute dtype), and the buffers of a module that
sets `keeps_fp32` (a method's frozen tables that must stay exact). Under bf16 on the CPU, attention
itself runs in fp32 (AttentionInFP32: PyTorch's bf16 CPU kernel is slow and sums its gradients in
bf16), keeping only bf16 q, k, v between the passes. Adapters are saved in fp32 and load into any
precision.

`--precision auto` (auto_precision) picks bf16-mixed only where bf16 matmuls are faster than fp32's: a
CUDA GPU with bf16, a CPU with AMX. A CPU with AVX-512-BF16 but no AMX multiplies bf16 at about half
fp32's rate (bench/precision.py measures it), so fp32 stays the default there.

Devices: `resolve_device("auto")` is CUDA if present, else MPS, else the CPU. Every tensor minipeft
creates during a forward pass (masks, positions, dropout masks, KV caches) is made on the device of
the tensors it combines with, so `model.to(device)` is all a model needs.
"""
import contextlib
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from minipeft.core import model as core_model
from minipeft.core import registry
from minipeft.core.fingerprint import embedding_sample
from minipeft.core.loop import NO_LOSS_SCALING, NoLossScaling


@dataclass(frozen=True)
class Precision:
    name: str
    frozen: torch.dtype  # storage of parameters without requires_grad, and floating buffers
    trainable: torch.dtype  # parameters with requires_grad, their gradients and AdamW's moments
    compute: torch.dtype  # matmuls (autocast)
    loss_scaling: bool = False  # fp16: dynamic loss scaling (torch.amp.GradScaler)

    @property
    def mixed(self) -> bool:
        return self.compute != torch.float32


PRECISIONS = {p.name: p for p in (
    Precision("fp32", torch.float32, torch.float32, torch.float32),
    Precision("bf16-mixed", torch.bfloat16, torch.float32, torch.bfloat16),
    Precision("bf16-true", torch.bfloat16, torch.bfloat16, torch.bfloat16),
    Precision("fp16-mixed", torch.float16, torch.float32, torch.float16, loss_scaling=True),
)}
DTYPE_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16-mixed", torch.float16: "fp16-mixed"}


# ------------------------------------------------------------------------------------------ devices

def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): CUDA, then MPS, then the CPU; "cpu", "cuda", "cuda:N", "mps": that device, which
    must be present (ValueError naming what is)."""
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: this machine has no CUDA device that torch can use "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= count:
            raise ValueError(f"device {name!r}: there are {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise ValueError(f"device {name!r}: MPS (Apple silicon) is not available here; use --device cpu or auto")
        return device
    raise ValueError(f"device {name!r}: minipeft runs on cpu, cuda and mps")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def default_precision(device: torch.device) -> str:
    """What --precision auto (or None) means on `device`: auto_precision's choice."""
    return auto_precision(device)[0]


def auto_precision(device: torch.device) -> tuple[str, str]:
    """(precision, why): bf16-mixed where bf16 matmuls outrun fp32's — a CUDA GPU that computes in bf16,
    a CPU with AMX tiles (Intel's matrix unit, lscpu's amx_bf16 and amx_tile) — else fp32. AVX-512-BF16
    alone (a bf16 dot product in vector registers) multiplies at about half fp32's rate; without either,
    bf16 is emulated. `why` is one clause for the run's first line."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "this GPU computes in bf16"
        return "fp32", "this GPU has no bf16; fp16-mixed is yours to ask for"
    if device.type != "cpu":
        return "fp32", f"bf16 is chosen on its own only on CUDA and on CPUs with AMX, not on {device.type}"
    if torch.cpu._is_amx_tile_supported():
        return "bf16-mixed", "this CPU multiplies bf16 matrices on its AMX tiles"
    if torch.cpu._is_avx512_bf16_supported():
        return "fp32", "this CPU has AVX-512-BF16 but no AMX: its bf16 matmuls run at about half fp32's rate"
    return "fp32", "this CPU has neither AMX nor AVX-512-BF16: bf16 would be emulated, several times slower"


def resolve_precision(name: str | torch.dtype | None, device: torch.device) -> Precision:
    """A precision by name ("auto"/None: default_precision) or by the frozen weights' torch dtype
    (torch.bfloat16 -> bf16-mixed, torch.float16 -> fp16-mixed), or that dtype's name ("bfloat16", as
    transformers' from_pretrained takes it); ValueError if the device cannot run it, naming what to use instead."""
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        name = getattr(torch, name)
    if isinstance(name, torch.dtype):
        if name not in DTYPE_PRECISION:
            raise ValueError(f"dtype {name} is not one minipeft trains in; use torch.float32, torch.bfloat16 "
                             "or torch.float16 (or a precision: " + ", ".join(PRECISIONS) + ")")
        name = DTYPE_PRECISION[name]
    if name is None or name == "auto":
        name = default_precision(device)
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)} (or auto)")
    precision = PRECISIONS[name]
    if device.type == "cuda" and precision.frozen == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision {name}: {torch.cuda.get_device_name(device)} does not compute in bf16; "
                         "use fp16-mixed (or fp32)")
    if device.type == "mps" and precision.frozen == torch.bfloat16 and not _mps_bf16_works():
        raise ValueError(f"precision {name}: this MPS device (macOS before 14) has no bf16; use fp16-mixed or fp32")
    return precision


def _mps_bf16_works() -> bool:
    try:
        (torch.ones(2, 2, dtype=torch.bfloat16, device="mps") @ torch.ones(2, 2, dtype=torch.bfloat16,
                                                                          device="mps")).cpu()
        return True
    except (RuntimeError, TypeError):
        return False


# ---------------------------------------------------------------------------------------- 4-bit layers

def four_bit_layers(model: nn.Module) -> list[nn.Module]:
    """The model's 4-bit layers (QLoRA's frozen base: core/nf4.py's Linear4bit). Only that file makes
    them, so while it was never imported there are none, and a run without them does not load it."""
    nf4 = sys.modules.get("minipeft.core.nf4")
    return [] if nf4 is None else [m for m in model.modules() if isinstance(m, nf4.Linear4bit)]


def values_in_4bit_layers(model: nn.Module) -> int:
    """How many weights and biases the model's 4-bit layers hold (buffers, so model.parameters() does not
    count them)."""
    return sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
               for m in four_bit_layers(model))


def tensors_of_4bit_layers(model: nn.Module) -> list[torch.Tensor]:
    """The codes, quantization state and biases of the model's 4-bit layers: buffers, or frozen parameters
    once sharding.py has made them parameters for FSDP to shard (a method's trainable parameters inside
    such a layer are not among them)."""
    return [t for m in four_bit_layers(model)
            for t in [*m.buffers(recurse=False), *(p for p in m.parameters(recurse=False) if not p.requires_grad)]]


# ---------------------------------------------------------------------------------------- precision

def set_precision(model: nn.Module, precision: str | torch.dtype = "fp32") -> nn.Module:
    """Cast the model's floating tensors for `precision` (a name of PRECISIONS or a torch dtype) and
    record it in `model.precision`; returns the model. Parameters with requires_grad take the trainable
    dtype, the others and the floating buffers the frozen dtype — except what stays fp32 whatever the
    precision: 4-bit layers' quantization state and bias (quant.Linear4bit), the RoPE tables, and the buffers
    of a module that sets `keeps_fp32` (a method's frozen tables that must stay exact). Tied
    parameters stay tied (each tensor is cast in place once). Call it again after changing which
    parameters train (mp.apply does)."""
    device = next(model.parameters(), torch.empty(0)).device
    chosen = resolve_precision(precision, device)
    embedding = getattr(model, "tok_emb", None)
    if embedding is not None and getattr(model, "base_sample", None) is None and not embedding.weight.is_meta \
            and embedding.weight.dtype.itemsize > chosen.frozen.itemsize:  # the fingerprint's rows, unrounded
        model.base_sample = embedding_sample(model).float().cpu().clone()
    keep_fp32 = {id(t) for t in tensors_of_4bit_layers(model)}  # buffers, or frozen parameters under FSDP
    keep_fp32 |= {id(b) for name, b in model.named_buffers() if name.endswith(("rope_cos", "rope_sin",
                                                                                  "rope_local_cos", "rope_local_sin"))}
    keep_fp32 |= {id(b) for m in model.modules() if getattr(m, "keeps_fp32", False) for b in m.buffers()}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            dtype = chosen.trainable if p.requires_grad else chosen.frozen
            if p.is_floating_point() and id(p) not in keep_fp32 and p.dtype != dtype:
                p.data = p.data.to(dtype)  # in place: the Parameter object (and any tie to it) stays
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and id(b) not in keep_fp32 and b.dtype != chosen.frozen:
                module._buffers[name] = b.to(chosen.frozen)
    model.precision = chosen.name
    model.compute_context = compute  # the forward pass runs under autocast to the compute dtype
    if chosen.compute == torch.bfloat16:
        core_model.attention = attention  # bf16 on the CPU: the fp32 kernel (AttentionInFP32)
    return model


def _cast_new_parameters(model):
    """After mp.apply: the method's new parameters take the dtypes of the precision the model is held in."""
    if getattr(model, "precision", "fp32") != "fp32":
        set_precision(model, model.precision)


registry.AFTER_APPLY.append(_cast_new_parameters)


def precision_of(model) -> Precision:
    return PRECISIONS[getattr(model, "precision", "fp32")]


def compute(model, device: torch.device):
    """The context a forward pass of `model` runs in: autocast to the compute dtype of its precision on
    `device` (the input's device), or nothing in fp32."""
    precision = precision_of(model)
    if not precision.mixed or not torch.amp.is_autocast_available(device.type):  # e.g. "meta": shapes only
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.compute)


# ------------------------------------------------------------------------- attention in bf16 on the CPU

CORE_ATTENTION = core_model.attention  # the core's fused attention, which `attention` falls back to


def attention_in_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `attention` runs q, k, v of this dtype on this device through AttentionInFP32: bf16 on
    the CPU."""
    return dtype == torch.bfloat16 and device.type == "cpu"


def attention(q, k, v, mask, is_causal: bool, scale: float, gqa: bool) -> torch.Tensor:
    """core.model.attention as set_precision installs it for a bf16 precision: AttentionInFP32 for bf16
    on the CPU, the core's own kernel for every other dtype and device. Shapes as the core's. Keys and
    values come in bf16, as autocast hands them to the core's kernel (prefixes included)."""
    if not attention_in_fp32(q.dtype, q.device):
        return CORE_ATTENTION(q, k, v, mask, is_causal, scale, gqa)
    if torch.compiler.is_compiling():  # --compile: the same product in a form it traces (not autograd.grad);
        with torch.autocast("cpu", enabled=False):  # the compiler plans what backward keeps itself
            return CORE_ATTENTION(q.float(), k.float(), v.float(), mask, is_causal, scale, gqa).to(q.dtype)
    return AttentionInFP32.apply(q, k.to(q.dtype), v.to(q.dtype), mask, is_causal, scale, gqa)


class AttentionInFP32(torch.autograd.Function):
    """softmax(q kᵀ · scale + mask) v on bf16 q, k, v, computed by the fp32 kernel; keeps only q, k, v
    (bf16) and the mask for backward, as few bytes as the bf16 kernel's q, k, v, output and log-sum-exps.

    PyTorch's CPU flash attention in bf16 multiplies its small blocks one library call at a time and
    sums the gradients of q, k and v in bf16: its backward takes 3-8× the fp32 kernel's time, and rounds.
    Here forward runs the fp32 kernel on upcast copies and returns the output in bf16; backward upcasts
    q, k, v again, reruns that forward with autograd and differentiates it (an fp32 forward costs about
    a third of its backward), so nothing fp32 stays alive between the passes."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale, gqa):
        ctx.save_for_backward(q, k, v, mask)
        ctx.options = is_causal, scale, gqa
        with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 copies back to bf16
            y = CORE_ATTENTION(q.float(), k.float(), v.float(), mask, is_causal, scale, gqa)  # (B, H, T, hd)
        return y.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        *qkv, mask = ctx.saved_tensors
        qkv = [t.detach().float().requires_grad_(needed) for t, needed in zip(qkv, ctx.needs_input_grad)]
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            y = CORE_ATTENTION(*qkv, mask, *ctx.options)  # (B, H, T, hd), fp32
        wanted = [t for t in qkv if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad_y.float()))
        return *(next(grads).to(grad_y.dtype) if t.requires_grad else None for t in qkv), None, None, None, None


class LossScaling(NoLossScaling):
    """fp16-mixed's dynamic loss scaling for core/loop.py's train_step (in place of its NoLossScaling):
    backward on S · loss, the gradients divided by S before clipping, a step whose scaled gradients
    overflowed skipped with S halved, S doubled after 2,000 good steps (torch.amp.GradScaler, initial
    scale 2¹⁶)."""

    def __init__(self, device: torch.device, init_scale: float = 2.0 ** 16):
        self.scaler = torch.amp.GradScaler(device.type, init_scale=init_scale)

    def backward(self, loss: torch.Tensor):
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer):
        self.scaler.unscale_(optimizer)  # gradients ÷ S, in place; notes any inf / NaN

    def step(self, optimizer, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss):
            self.scaler.step(optimizer)  # steps unless the gradients held inf / NaN
        self.scaler.update()
        return math.isfinite(loss) and not math.isfinite(grad_norm)

    def scale(self) -> float:
        return self.scaler.get_scale()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict):
        self.scaler.load_state_dict(state)


def loss_scaling(model, device: torch.device) -> NoLossScaling:
    """LossScaling for a model in fp16-mixed, else core/loop.py's NoLossScaling (nothing to scale)."""
    return LossScaling(device) if precision_of(model).loss_scaling else NO_LOSS_SCALING


def weight_bytes(model: nn.Module, as_fp32: bool = False) -> dict[str, int]:
    """Bytes of the model's tensors: trainable parameters, frozen full-precision parameters and buffers,
    and 4-bit layers (Linear4bit buffers: packed codes, quantization state, bias). as_fp32: the bytes
    the same tensors would take in fp32 instead, 4 per value (a 4-bit layer's: its weight and bias)."""
    four_bit = {id(t) for t in tensors_of_4bit_layers(model)}
    sizes = {"frozen": 0, "frozen_4bit": 4 * values_in_4bit_layers(model) if as_fp32 else 0, "trainable": 0}
    for t in [*model.parameters(), *model.buffers()]:  # each tensor once, even when tied (head = tok_emb)
        if id(t) not in four_bit:
            sizes["trainable" if t.requires_grad else "frozen"] += t.numel() * (4 if as_fp32 else t.element_size())
        elif not as_fp32:  # the codes and quantization state as they are
            sizes["frozen_4bit"] += t.numel() * t.element_size()
    return sizes
