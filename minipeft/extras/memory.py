"""Where fine-tuning memory goes: a ledger of weights, gradients, optimizer state and activations.

    report = mp.memory_report(model, batch_size=4, seq_len=256)   # bytes, for the model as it is now
    print(mp.format_report(report))

Per parameter (fp32 training with AdamW, which keeps two moments per trainable parameter, in its dtype):

    full fine-tuning   4 (weight) + 4 (gradient) + 8 (moments) = 16 bytes per parameter
    LoRA               4 per frozen base parameter; the 16 only for the adapter's parameters
    QLoRA              ≈ 0.52 per frozen base parameter of the blocks' linear layers (4.127 bits: 4-bit
                       codes, an 8-bit absmax per 64, an fp32 scale per 64·256), 4 for the embeddings and
                       norms, which stay fp32; 16 per adapter parameter

Every count reads the tensors' own dtypes (precision.py): under bf16-mixed a frozen parameter takes 2
bytes and a trainable one still 16; under bf16-true everything halves (2 + 2 + 4 = 8 per trainable
parameter). Activations then take the compute dtype's 2 bytes, except what stays fp32 — norm statistics,
RMSNorm's fp32 copy of its input, attention's log-sum-exps, the loss — and autocast's bf16 copy of each
fp32 weight that trains (full fine-tuning under bf16-mixed). Full fine-tuning under *-mixed is counted
≈ 13% low: its residual stream stays fp32 (the embeddings train in fp32) and autocast casts it to bf16
once per matmul that reads it.

Activations are what autograd keeps from the forward pass for backward: they grow with tokens, not
parameters. N = batch · tokens (soft-prompt tokens included), S = keys per query (tokens + prefix),
d = d_model, f = d_ff, d_kv = n_kv_head · head_dim, r = LoRA rank, V = vocab (in fp32). Each tensor counts
once however many ops keep it, and a linear layer keeps its input only to compute its own weight's
gradient — a frozen or 4-bit weight needs just dy·W — which is much of what PEFT saves. The base
model's part is derived: `activation_bytes` walks model.py's forward pass. A method's part is measured:
each module it puts in a linear layer's place or in the attention's adaption slot runs on a few tiny
batches while autograd's saved-tensor hooks count what it keeps, so a method has nothing to declare
(`_Probe`). tests/test_memory.py checks the sum against the tensors autograd really keeps, for every
method and flavour, to 2%. Per block:

    attention        flash attention (PyTorch's CPU kernel when dropout is 0) keeps q, k, v, its output
                     (which is o's input) and one log-sum-exp per query and head: N·(2d + 2·d_kv);
                     in bf16 on the CPU (precision.AttentionInFP32) q, k, v only: N·(d + 2·d_kv)
    norms            input + 2 statistics per token (LayerNorm); RMSNorm: input + 1, + its normalized
                     input when its weight trains
    gpt2/bert, LoRA  ln1 in, ln1 out, LoRA's r-wide A outputs, q, k, v, y, ln2 in, GELU in
                     ≈ N·(5d + 2·d_kv + f)           GPT-2-small, N = 1024: 33 MiB per block
    + full FT        ln2 out (up's input), GELU out (down's input): + N·(d + f)             48 MiB
    llama            SwiGLU keeps gate, silu(gate) and up: 3f instead of f (+ f, down's input, in full FT)
    dropout p > 0    an fp32 mask per dropout (N·d residual, N·in per LoRA layer); attention is written
                     out (model.attention_with_dropout) and keeps softmax, mask, dropped weights: 3 · B·H·T·S
    LM head          the chunked loss (losses.py) keeps the labelled hidden states, their log-sum-exps,
                     rows and targets: N·(d + 5) (the ledger counts every token as labelled); a
                     classifier head keeps its B·C log-probabilities

Peak activations come at the start of backward, where the loss adds the hidden states' gradient (twice:
the labelled rows', then the batch's) and one tile's logits, 2·N·d + 2·C·K (3·C·K with a soft-cap; a
tile of C = 1024 tokens × K = 4096 vocabulary entries, losses.tile_elements: 38 MiB for GPT-2-small
at batch 4 × 256, where the whole logits' 3·N·V were 590 MiB, as much as 12 LoRA blocks), + V·d
when the head trains (its gradient, summed in fp32), or inside a block's backward (the gradient
arriving at its output and the two widest inside it, N·(d + 2·max(d, f))), whichever is larger. Activation
checkpointing (model.checkpointing = True) keeps only each block's input, N·d, and reruns one block at
a time in backward, adding that block's activations to the second case (and, under QLoRA, that
block's dequantized weights, which the rerun hands to backward).

Gradients appear during backward as the activations they come from are freed (the trainer frees them
with zero_grad(set_to_none=True) after each step), and AdamW's step, after backward, holds every
gradient. The trainer's AdamW is torch's fused kernel, which updates in place: no temporaries (the
unfused fallback, on a device without that kernel, adds two the size of the largest trainable tensor,
sqrt(v) and its scaled copy). So the predicted peak resident size is

    total = runtime + weights + optimizer state + max(activations, gradients + AdamW temporaries)

with runtime = RUNTIME_BYTES, the resident size of Python, torch and minipeft themselves after a first
training step (bench/memory.py measures it). The prediction assumes freed tensors leave the process:
call `mmap_large_tensors()` (glibc keeps them otherwise; its docstring says why and what it costs).
With it, bench/memory.py measures GPT-2-small and SmolLM2, full / LoRA / QLoRA with and without
checkpointing, within a few percent of this ledger. CPU resident memory: CUDA's caching allocator, which
keeps freed blocks for reuse, is not modelled.
"""
import contextlib

import torch
import torch.nn as nn

from minipeft.fast.losses import tile_elements
from minipeft.core.model import OffsetRMSNorm
from minipeft.core.nf4 import Linear4bit
from minipeft.core.lora import FrozenLinear
from minipeft.scale.precision import attention_in_fp32, precision_of, weight_bytes

# Resident size of Python 3.11 + torch 2.13 (CPU build) + minipeft once a training step has run (the
# first forward, backward and AdamW step load code and modules that the imports alone do not), with
# every tensor freed again; measured on Linux x86-64 with glibc 2.36 (bench/memory.py measures it again
# on the machine it runs on: imports alone are ≈ 236 MiB).
RUNTIME_BYTES = 325 * 2**20

FP32 = 4
INT64 = 8


# -------------------------------------------------------------------------------------- allocator

M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number
_mmap_threshold: int | None = None  # set by mmap_large_tensors()


def mmap_large_tensors(threshold: int = 128 * 1024) -> bool:
    """Make glibc give every allocation of `threshold` bytes or more its own memory mapping, returned to
    the operating system as soon as it is freed, so the resident size follows the live tensors (what
    this ledger counts). Returns False where there is no glibc (macOS, musl): nothing changes there.

    Why: glibc serves large requests with mmap only until the first one is freed; from then on its
    threshold grows with the freed size (up to 32 MiB), and activations come from the brk heap. There
    the few small objects a training step keeps (autograd nodes, tensor headers, checkpoint records)
    land inside the holes freed activations leave, so the next tensor of the same size no longer fits
    them and the heap grows instead: with checkpointing, GPT-2-small at batch 4 × 256 keeps ≈ 400 MiB of
    freed activations resident, about a block's temporaries per block. The cost of a fixed threshold is
    a page fault per 4 KiB the first time each new tensor is written (bench/memory.py shows both)."""
    global _mmap_threshold
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
    if ok:
        _mmap_threshold = int(threshold)
    return ok


def allocator_policy() -> str:
    """How large tensors are allocated in this process: which this ledger's total assumes."""
    import os
    threshold = _mmap_threshold or os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if threshold:
        return f"glibc, every allocation of {int(threshold) // 1024:,} KiB or more mmapped and returned when freed"
    return "glibc default (freed activations may stay resident: see memory.mmap_large_tensors)"


# ------------------------------------------------------------------------------------------ weights

# -------------------------------------------------------------------------------------- activations

def _trains(module) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _weight_trains(layer) -> bool:
    """A linear layer keeps its input for backward only to compute its own weight's gradient."""
    weight = getattr(layer, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.requires_grad


class _Saved:
    """The tensors autograd keeps for backward, by name, in bytes (a name is counted once). Activations
    take `size` bytes per element (the compute dtype's: 4 in fp32, 2 under bf16 or fp16); what stays fp32
    whatever the precision (norm statistics, log-sum-exps, the loss) says so. `probe` measures the
    modules a method inserts; `fp32_attention`: attention runs as precision.AttentionInFP32 (bf16 on the
    CPU), which keeps q, k, v and the mask only."""

    def __init__(self, size: int, probe: "_Probe", fp32_attention: bool = False):
        self.size, self.probe, self.fp32_attention = size, probe, fp32_attention
        self.elements: dict[str, float] = {}  # name -> bytes

    def keep(self, name: str, elements: float, size: int | None = None):
        self.elements[name] = elements * (size or self.size)

    def dropout(self, p: float, name: str, elements: float, grad: bool):
        """model.Dropout multiplies by a mask in its input's dtype, kept when its input needs a gradient."""
        if p > 0 and grad:
            self.keep(name + ".mask", elements)

    def measured(self, module, x: str, batch: int, tokens: int, grad: bool, make_input, args=()):
        """Keep what module(x, *args) keeps for its input named `x` (batch × tokens; `grad`: it needs a
        gradient), measured: the input itself under its own name (shared with whatever else keeps it),
        the rest under the module's."""
        input_width, (c, r, t) = self.probe.measure(module, make_input, grad, args)
        if input_width:
            self.keep(x, batch * tokens * input_width)
        self.keep(f"{x}@{id(module)}.measured", c + r * batch + t * batch * tokens, 1)

    def total(self) -> float:
        return sum(self.elements.values())


# --------------------------------------------------------- what a method's modules keep, measured

class _Probe:
    """Measures what autograd keeps of one module's forward pass on tiny inputs, the way training runs
    it: in training mode, on the model's device, in its compute dtype, inside the context the model's
    forward pass enters (model.compute_context: the precision ring's autocast, if any). The random
    state and the module's train/eval mode are left as they were; nothing is written to the model.

    A method declares nothing about its activations: the modules it inserts (a linear layer's wrapper,
    the attention's adaption slot) run three times, on 2×8, 2×16 and 4×8 tokens, with
    torch.autograd.graph.saved_tensors_hooks counting the distinct storages autograd still holds once
    the forward pass returns, the model's weights and buffers left out. Their bytes are fitted as
    c + r·B + t·B·T (c: what does not grow with the batch, such as a rebuilt weight W + ΔW; r: per row,
    such as prompt keys broadcast over the batch; t: per token), which assumes nothing a module keeps
    grows faster than its tokens. What the hooks see is what autograd keeps: the tensors of every op,
    and those a custom autograd.Function passes to ctx.save_for_backward (not ones it sets as ctx
    attributes). Modules alike (`_signature`) keep alike: each kind is measured once per probe."""

    B, T = 2, 8  # runs on B × T, B × 2T and 2B × T tokens (a batch of one row can take other kernels)

    def __init__(self, model):
        precision = precision_of(model)
        self.dtype, self.device = precision.compute, model.tok_emb.weight.device
        context = model.compute_context
        self.compute_context = (lambda: context(model, self.device)) if context else contextlib.nullcontext
        self.weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.known: dict[tuple, tuple] = {}  # (grad, signatures) -> measure's answer

    def input(self, batch: int, tokens: int, *features: int) -> torch.Tensor:
        return torch.randn(batch, tokens, *features, dtype=self.dtype, device=self.device)

    def measure(self, module, make_input, grad: bool, args=()) -> tuple[int, tuple[float, float, float]]:
        """(elements per token of the input that module(x, *args) keeps itself, 0 if it keeps none; the
        coefficients (c, r, t) of the bytes of everything else it keeps). make_input(batch, tokens) is a
        leaf tensor or a view of one, its base receiving `grad`."""
        key = (grad, *map(_signature, (module, *args)))
        if key not in self.known:
            self.known[key] = self._measure(module, make_input, grad, args)
        return self.known[key]

    def _measure(self, module, make_input, grad, args):
        measured, width, B, T = [], 0, self.B, self.T
        with self._unchanged(module):
            for batch, tokens in ((B, T), (B, 2 * T), (2 * B, T)):
                x = make_input(batch, tokens)
                (x if x._base is None else x._base).requires_grad_(grad)
                kept = _kept_storages(lambda: module(x, *args))
                if kept.pop(x.untyped_storage().data_ptr(), None) is not None:
                    width = x.numel() // (batch * tokens)
                measured.append(sum(size for ptr, size in kept.items() if ptr not in self.weights))
        t = (measured[1] - measured[0]) / (B * T)  # bytes per token
        r = (measured[2] - measured[0] - B * T * t) / B  # per row
        return width, (measured[0] - B * r - B * T * t, r, t)

    @contextlib.contextmanager
    def _unchanged(self, module):
        modes = [(m, m.training) for m in module.modules()]
        devices = [] if self.device.type == "cpu" else [self.device]
        with torch.random.fork_rng(devices, device_type=self.device.type), torch.enable_grad(), \
                self.compute_context():
            module.train()
            try:
                yield
            finally:
                for m, training in modes:
                    m.training = training


def _signature(module: nn.Module) -> tuple:
    """What decides how much a module keeps for backward: for it and each module inside it, its type,
    its plain settings (numbers, flags, strings: sizes, rank, dropout p, merged, ...) and the shape,
    dtype and requires_grad of its own parameters and buffers."""
    def settings(m):
        return tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str))))

    def tensors(m):
        return tuple((t.shape, t.dtype, t.requires_grad) for t in [*m.parameters(False), *m.buffers(False)])
    return tuple((type(m), settings(m), tensors(m)) for m in module.modules())


def _kept_storages(run) -> dict[int, int]:
    """{storage address: bytes} of every storage autograd still keeps for backward once run() returns
    (a tensor kept by a graph node that is freed before then, being off the output's graph, counts not)."""
    holders, sizes = {}, {}

    class Held:
        def __init__(self, t):
            self.t, self.ptr = t, t.untyped_storage().data_ptr()
            holders[self.ptr] = holders.get(self.ptr, 0) + 1
            sizes[self.ptr] = t.untyped_storage().nbytes()

        def __del__(self):
            holders[self.ptr] -= 1

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.t):
        output = run()  # kept alive while counting: its graph holds what backward would need
        kept = {ptr: sizes[ptr] for ptr, count in holders.items() if count > 0}
    del output
    return kept


BASE_LINEARS = (nn.Linear, FrozenLinear)  # any other linear layer is a method's (Linear4bit: QLoRA's)


def _linear(saved: _Saved, layer, x: str, batch: int, tokens: int, grad: bool) -> bool:
    """Tensors one linear layer, or a method's module in its place, keeps for input `x` (batch × tokens,
    `grad`: x needs a gradient); returns whether its output needs one."""
    if type(layer) not in BASE_LINEARS:  # a method's module (LoRA, DoRA, adapters, ...): measured
        saved.measured(layer, x, batch, tokens, grad, lambda B, T: saved.probe.input(B, T, layer.in_features))
    elif _weight_trains(layer):
        saved.keep(x, batch * tokens * layer.in_features)
        if layer.weight.element_size() > saved.size:  # autocast's low-precision copy of an fp32 weight
            saved.keep(f"{x}@{id(layer)}.weight_cast", layer.weight.numel())
    return grad or _trains(layer)


def _norm(saved: _Saved, norm, x: str, n: int, d: int, grad: bool) -> bool:
    """LayerNorm (one fused op) keeps its input, mean and 1/std per token if anything needs a gradient.
    RMSNorm is x · rsqrt(mean(x²) + ε) · w in torch's CPU code: x and 1/rms when x needs a gradient,
    the normalized x when w trains."""
    trains = _trains(norm)
    if isinstance(norm, nn.RMSNorm):  # model.RMSNorm and OffsetRMSNorm normalize an fp32 copy of x
        if grad:
            saved.keep(x if saved.size == FP32 else f"{x}.fp32", n * d, FP32)
            saved.keep(f"{x}.stats", n, FP32)
        if trains:
            saved.keep(f"{x}.normalized", n * d, FP32 if isinstance(norm, OffsetRMSNorm) else None)
    elif grad or trains:
        saved.keep(x, n * d)
        saved.keep(f"{x}.stats", 2 * n, FP32)
    return grad or trains


def _attention(saved: _Saved, attn, cfg, x: str, batch: int, tokens: int, keys: int, masked: int,
               grad: bool, L: str) -> bool:
    """q, k, v projections, RoPE, prefix keys, scaled_dot_product_attention, adaption prompt, o."""
    n, H, Hkv, hd = batch * tokens, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q_grad = _linear(saved, attn.q, x, batch, tokens, grad)
    k_grad = _linear(saved, attn.k, x, batch, tokens, grad) or _trains(attn.prefix)  # prefix keys join k, v
    v_grad = _linear(saved, attn.v, x, batch, tokens, grad) or _trains(attn.prefix)
    if cfg.positions == "rope" and (q_grad or k_grad):
        saved.keep("rope_tables", 2 * tokens * cfg.rotary_dim)  # cos, sin: (T, rotary_dim) each, shared by all blocks
    if attn.adaption is not None:  # a method's module, given q (B, H, T, hd): what it keeps of q is its own
        saved.measured(attn.adaption, f"{L}.adaption_q", batch, tokens, q_grad,
                       lambda B, T: saved.probe.input(B, T, H, hd).transpose(1, 2), args=(attn.k, attn.v))
    if not (q_grad or k_grad or v_grad):  # attention itself keeps nothing
        return _linear(saved, attn.o, f"{L}.attn_out", batch, tokens, _trains(attn.adaption))
    if cfg.dropout == 0:  # flash attention (CPU): q, k, v, output, log-sum-exp; a mask as fp32
        saved.keep(f"{L}.q", n * H * hd)
        saved.keep(f"{L}.k", batch * keys * Hkv * hd)
        saved.keep(f"{L}.v", batch * keys * Hkv * hd)
        if saved.fp32_attention:  # q, k, v only (o keeps the output if its weight trains), and the
            if masked:  # model's boolean mask, one for all blocks
                saved.keep("mask", masked * tokens * keys, 1)
        else:
            saved.keep(f"{L}.y", n * H * hd)
            saved.keep(f"{L}.lse", n * H, FP32)
            if masked:  # the boolean mask, as an additive fp32 mask
                saved.keep(f"{L}.mask", masked * tokens * keys)
    else:  # attention_with_dropout: scaled q and kᵀ, softmax, dropout mask, dropped weights, v (GQA: repeated)
        scores = batch * H * tokens * keys
        if k_grad:
            saved.keep(f"{L}.q_scaled", n * H * hd)
        if q_grad:
            saved.keep(f"{L}.k_scaled", batch * keys * H * hd)
        saved.keep(f"{L}.softmax", scores)
        saved.keep(f"{L}.dropout_mask", scores)
        if v_grad:
            saved.keep(f"{L}.scores_dropped", scores)
        saved.keep(f"{L}.v_repeated", batch * keys * H * hd)
    # y.transpose(1, 2).reshape(B, T, H·hd) is o's input: a view of flash attention's output (which it
    # lays out as (B, T, H, hd)), a copy of attention_with_dropout's
    return _linear(saved, attn.o, f"{L}.y" if cfg.dropout == 0 else f"{L}.attn_out", batch, tokens, True)


def _mlp(saved: _Saved, mlp, cfg, x: str, batch: int, tokens: int, grad: bool, L: str) -> bool:
    n, f = batch * tokens, cfg.d_ff
    up_grad = _linear(saved, mlp.up, x, batch, tokens, grad)
    if cfg.gated:  # down(act(gate(x)) * up(x))
        gate_grad = _linear(saved, mlp.gate, x, batch, tokens, grad)
        if gate_grad:
            saved.keep(f"{L}.gate", n * f)  # silu's input
        if up_grad:
            saved.keep(f"{L}.silu", n * f)  # the product's other factor
        if gate_grad:
            saved.keep(f"{L}.up", n * f)
        hidden_grad = up_grad or gate_grad
    else:  # down(gelu(up(x)))
        if up_grad:
            saved.keep(f"{L}.up", n * f)  # GELU's input
        hidden_grad = up_grad
    return _linear(saved, mlp.down, f"{L}.act", batch, tokens, hidden_grad)


def _block(saved: _Saved, block, cfg, x: str, batch: int, tokens: int, keys: int, masked: int,
           grad: bool, L: str) -> bool:
    """One Block.forward; returns whether its output needs a gradient."""
    n, d, p = batch * tokens, cfg.d_model, cfg.dropout
    if block.pre_norm:  # x = x + drop(attn(ln1(x))); x = x + drop(mlp(ln2(x)))
        h_grad = _norm(saved, block.ln1, x, n, d, grad)  # ln1's output needs a gradient
        a_grad = _attention(saved, block.attn, cfg, f"{L}.ln1_out", batch, tokens, keys, masked, h_grad, L)
        saved.dropout(p, f"{L}.attn_drop", n * d, a_grad)
        x_grad = grad or a_grad
        _norm(saved, block.ln2, f"{L}.mid", n, d, x_grad)
        m_grad = _mlp(saved, block.mlp, cfg, f"{L}.ln2_out", batch, tokens, x_grad or _trains(block.ln2), L)
        saved.dropout(p, f"{L}.mlp_drop", n * d, m_grad)
        return x_grad or m_grad
    # post-norm: x = ln1(x + drop(attn(x))); x = ln2(x + drop(mlp(x)))
    a_grad = _attention(saved, block.attn, cfg, x, batch, tokens, keys, masked, grad, L)
    saved.dropout(p, f"{L}.attn_drop", n * d, a_grad)
    x_grad = _norm(saved, block.ln1, f"{L}.sum1", n, d, grad or a_grad)
    m_grad = _mlp(saved, block.mlp, cfg, f"{L}.ln1_out", batch, tokens, x_grad, L)
    saved.dropout(p, f"{L}.mlp_drop", n * d, m_grad)
    _norm(saved, block.ln2, f"{L}.sum2", n, d, x_grad or m_grad)
    return x_grad or m_grad or _trains(block.ln2)


def _embeddings(saved: _Saved, model, B: int, seq_len: int, T: int) -> bool:
    """Token (+ position, + type and LayerNorm for bert) embeddings, soft prompt, dropout, for B rows of
    seq_len tokens (T inside the blocks); returns whether their output needs a gradient."""
    cfg, n = model.cfg, B * T
    grad = _trains(model.tok_emb) or model.prompt is not None
    if _trains(model.tok_emb):
        saved.keep("idx", B * seq_len, INT64)
    for name in ("pos_emb", "type_emb"):
        if _trains(getattr(model, name, None)):
            grad = True
            saved.keep(f"{name}.idx", T if name == "pos_emb" else n, INT64)
    if cfg.emb_norm:
        grad = _norm(saved, model.emb_ln, "emb_sum", n, cfg.d_model, grad)
    saved.dropout(cfg.dropout, "emb_drop", n * cfg.d_model, grad)
    return grad


def _head(saved: _Saved, model, B: int, seq_len: int, n: int, grad: bool) -> float:
    """Final norm, head and loss; returns what the loss adds at the start of backward (elements)."""
    cfg, d = model.cfg, model.cfg.d_model
    if model.ln_f is not None:
        grad = _norm(saved, model.ln_f, f"x{cfg.n_layer}", n, d, grad or _trains(model.ln_f))
    head_grad = _trains(model.head)
    if cfg.n_classes:
        outputs = B * cfg.n_classes
        if head_grad:
            saved.keep("pooled", B * d)
        saved.dropout(cfg.dropout, "pool_drop", B * d, grad)
        saved.keep("log_probs", outputs, FP32)  # the loss runs in fp32 (trainer.loss_fn)
        saved.keep("targets", B, INT64)
        return 2 * outputs * FP32  # d loss/d log-probs and d loss/d logits, while the log-probs live
    # the chunked LM loss (losses.py), every token labelled: hidden states, log-sum-exps, rows, targets
    labelled = B * seq_len
    if grad or head_grad:
        saved.keep("head_inputs", labelled * d)
        saved.keep("logsumexp", labelled, FP32)
        saved.keep("rows_and_targets", 2 * labelled, INT64)
    tile_logits = (3 if cfg.final_softcap else 2) * tile_elements(cfg.vocab_size, labelled)
    # backward: the hidden states' gradient, (N, d) then (B, T_in, d), one tile's logits (fp32), the head's
    # gradient (accumulated in fp32)
    return ((labelled * d + n * d) * saved.size + tile_logits * FP32
            + (cfg.vocab_size * d * FP32 if head_grad else 0))


def activation_bytes(model, batch_size: int, seq_len: int, checkpointing: bool | None = None,
                     padded: bool = False, probe: _Probe | None = None) -> dict[str, int]:
    """Activation memory of one training step, derived from model.py's forward pass, with what a
    method's modules keep measured.

    Returns bytes: `saved` (what autograd keeps when the forward pass ends), `block_max` (the largest
    one block keeps), `head_backward` (what the loss adds at the start of backward) and `peak`.
    `padded`: the batch comes with an attention mask (it is then kept, as fp32, by each attention).
    `probe`: a _Probe(model) that has measured before (memory_report's two calls share one)."""
    cfg = model.cfg
    checkpointing = model.checkpointing if checkpointing is None else checkpointing
    B, d = batch_size, cfg.d_model
    T = seq_len + model.prompt_length  # tokens inside the blocks
    S = T + model.prefix_length  # keys per query
    n = B * T
    # positions.attention_mask_for: a (B or 1, 1, T, S) boolean mask; `masked` is its batch dimension (0: none)
    masked = B if padded else 1 if model.prefix_length > 0 and cfg.causal else 0
    compute = precision_of(model).compute
    size = compute.itemsize  # bytes per activation element
    probe = probe or _Probe(model)
    fp32_attention = attention_in_fp32(compute, model.tok_emb.weight.device)
    saved = _Saved(size, probe, fp32_attention)

    grad = _embeddings(saved, model, B, seq_len, T)

    blocks = []
    for i, block in enumerate(model.blocks):
        inner = _Saved(size, probe, fp32_attention)
        grad_out = _block(inner, block, cfg, f"x{i}", B, T, S, masked, grad, f"b{i}")
        blocks.append(inner.total())
        if not checkpointing:
            saved.elements.update(inner.elements)
        elif grad_out:  # the checkpoint keeps the block's inputs (x, the mask) instead of its insides
            saved.keep(f"x{i}", n * d)
            if masked:
                saved.keep("mask", masked * T * S, 1)  # bool: 1 byte
        grad = grad or grad_out

    head_backward = _head(saved, model, B, seq_len, n, grad)
    total = saved.total()
    block_max = max(blocks) if blocks else 0
    # backward through a block: the gradient arriving at its output and the two widest ones inside it
    block_backward = (n * d + 2 * n * max(cfg.d_ff, d)) * size
    if checkpointing:  # backward reruns one block at a time and keeps its activations until done,
        # and the rerun's dequantized 4-bit weights (fast/nf4.py's Linear4bit forward), one block's at a time
        block_backward += block_max + size * max((sum(m.in_features * m.out_features for m in block.modules()
                                                      if isinstance(m, Linear4bit)) for block in model.blocks),
                                                 default=0)
    peak = total + max(head_backward, block_backward)
    return {"saved": int(total), "block_max": int(block_max), "head_backward": int(head_backward),
            "block_backward": int(block_backward), "peak": int(peak)}


# --------------------------------------------------------------------------------------- the ledger

def memory_report(model, batch_size: int, seq_len: int, runtime_bytes: int = RUNTIME_BYTES,
                  padded: bool = False) -> dict:
    """Bytes one training step (fp32, AdamW) needs, by kind, and the predicted peak (see module doc).

    Keys: runtime; weights_frozen (full-precision frozen parameters and buffers), weights_4bit
    (Linear4bit buffers), weights_trainable, weights; gradients; optimizer (AdamW: two fp32 moments per
    trainable parameter and a step counter per tensor); optimizer_temporaries; activations (for the
    model's current `checkpointing`), activations_no_checkpointing, activations_checkpointing, and
    activations_saved (what the forward pass leaves for backward); total. `padded`: batches come with
    an attention mask."""
    weights = weight_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = sum(2 * p.numel() * p.element_size() + FP32 for p in trainable)  # moments in p's dtype
    probe = _Probe(model)
    without = activation_bytes(model, batch_size, seq_len, checkpointing=False, padded=padded, probe=probe)
    with_ = activation_bytes(model, batch_size, seq_len, checkpointing=True, padded=padded, probe=probe)
    current = with_ if model.checkpointing else without
    report = {
        "batch_size": batch_size, "seq_len": seq_len, "checkpointing": bool(model.checkpointing),
        "precision": precision_of(model).name,
        "allocator": allocator_policy(), "runtime": runtime_bytes,
        "weights_frozen": weights["frozen"], "weights_4bit": weights["frozen_4bit"],
        "weights_trainable": weights["trainable"], "weights": sum(weights.values()),
        "gradients": gradients, "optimizer": optimizer, "optimizer_temporaries": 0,  # fused AdamW
        "activations": current["peak"], "activations_saved": current["saved"],
        "activations_no_checkpointing": without["peak"], "activations_checkpointing": with_["peak"],
    }
    report["total"] = (runtime_bytes + report["weights"] + optimizer
                       + max(report["activations"], gradients + report["optimizer_temporaries"]))
    return report


def _mib(n: int) -> str:
    return f"{n / 2**20:10,.1f} MiB"


def format_report(report: dict) -> str:
    """The ledger as aligned text lines (train.py prints it at the end of a run, beside the measured peak)."""
    r = report
    on = r["checkpointing"]
    other = r["activations_no_checkpointing"] if on else r["activations_checkpointing"]
    return "\n".join([
        f"memory ledger: batch {r['batch_size']} × {r['seq_len']} tokens, {r['precision']}, AdamW, activation "
        f"checkpointing {'on' if on else 'off'}",
        f"  runtime (Python, torch)        {_mib(r['runtime'])}",
        f"  weights  frozen, full prec.    {_mib(r['weights_frozen'])}",
        f"           frozen, 4-bit         {_mib(r['weights_4bit'])}",
        f"           trainable             {_mib(r['weights_trainable'])}",
        f"  gradients                      {_mib(r['gradients'])}",
        f"  AdamW moments                  {_mib(r['optimizer'])}",
        f"  activations (peak)             {_mib(r['activations'])}   "
        f"({other / 2**20:,.1f} MiB with checkpointing {'off' if on else 'on'})",
        f"  predicted peak RSS             {_mib(r['total'])}   = runtime + weights + moments + "
        "max(activations, gradients + AdamW temporaries)",
        f"  allocator: {r['allocator']}",
    ])
