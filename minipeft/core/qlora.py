"""QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

LoRA (lora.py) on a base whose linear layers are all stored in 4 bits (nf4.py: NF4 or FP4, blockwise
absmax scaling, optionally double-quantized) and dequantized for each matmul:

    h = x dequant(W_4bit)ᵀ + b  +  (α / r) · dropout(x) Aᵀ Bᵀ          A, B in full precision

Every linear layer of every block is quantized (unless mp.from_pretrained(..., quantize=) did it already, in
the same format; a checkpoint saved in 4 bits keeps the layers it stored in full precision, which get plain
LoRA); LoRA goes on the targets; embeddings, norms and the head stay in full precision.

Initialization: LoRA's (A Kaiming-uniform, B = 0), so the output equals the *quantized* base model's, not the
original's: the 4-bit rounding is there from the start. Trainable parameters: LoRA's, n_layer · Σ_targets
r · (in + out). Not mergeable: folding BA into 4-bit codes would round it away.
"""
import torch.nn as nn

from .nf4 import BLOCKSIZES, QUANT_TYPES, Linear4bit, quantize_blocks
from . import targets as linear_targets
from .lora import LORA_OPTIONS, LoRALinear, add_lora, lora_parameter_count
from .registry import Method, Option, register


def share_4bit(layer: nn.Module, base: Linear4bit) -> nn.Module:
    """Give `layer` (a bare nn.Module) base's format and its very buffers: the 4-bit codes, state and bias."""
    layer.in_features, layer.out_features = base.in_features, base.out_features
    layer.quant_type, layer.blocksize, layer.double_quant = base.quant_type, base.blocksize, base.double_quant
    for name, buffer in base.named_buffers(recurse=False):
        layer.register_buffer(name, buffer)
    if base.bias is None:
        layer.register_buffer("bias", None)
    return layer


class QLoRALinear(Linear4bit):
    """A Linear4bit over the base's very buffers with LoRA's A, B, scale and dropout (add_lora) beside them."""

    def __init__(self, base: Linear4bit, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        share_4bit(self, base)
        add_lora(self, rank, alpha, dropout)
        self.to(base.weight_codes.device)

    def forward(self, x):  # (…, in) -> (…, out)
        return super().forward(x) + self.lora_update(x)

    lora_update, delta_weight = LoRALinear.lora_update, LoRALinear.delta_weight  # s · dropout(x) Aᵀ Bᵀ and s·BA

    def base_layer(self) -> Linear4bit:
        """The frozen 4-bit layer alone, over the same codes, state and bias (extras/disable.py)."""
        plain = Linear4bit.__new__(Linear4bit)
        nn.Module.__init__(plain)
        return share_4bit(plain, self)


def apply_qlora(model, rank: int, alpha: float, dropout: float, targets: list[str], quant: str,
                blocksize: int, double_quant: bool):
    """Quantize every linear layer of every block to 4 bits, then put LoRA on the targets."""
    quantize_blocks(model, quant, blocksize, double_quant)
    linear_targets.wrap(model, targets, lambda layer: QLoRALinear(layer, rank, alpha, dropout)
                        if isinstance(layer, Linear4bit) else LoRALinear(layer, rank, alpha, dropout))


register(Method(
    "qlora", "LoRA on a frozen base stored in 4 bits, NF4 or FP4 (Dettmers et al. 2023)",
    apply_qlora, lora_parameter_count,
    LORA_OPTIONS + (
        Option("quant", str, "nf4", "4-bit data type of the frozen base", choices=QUANT_TYPES),
        Option("blocksize", int, 64, "weights per absmax scale", choices=BLOCKSIZES),
        Option("double_quant", bool, True, "quantize the absmax scales too (8-bit, blocks of 256)")),
    exact_at_init=False, lr=2e-3,  # LoRA's
    examples=({}, {"quant": "fp4", "blocksize": 32, "double_quant": False, "targets": ["all"], "rank": 2})))
