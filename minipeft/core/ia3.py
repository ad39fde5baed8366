"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022,
https://arxiv.org/abs/2205.05638).

Learned vectors rescale activations elementwise: the keys, the values and the feed-forward network's inner
activation (the input of its down projection):

    k = l_k ⊙ (W_k x + b_k)        v = l_v ⊙ (W_v x + b_v)        FFN: W_down (l_ff ⊙ act(W_up x)) + b_down

On a targeted linear layer this is output scaling, h = (W x + b) ⊙ l with l: (out,), or, for a target
listed in `feedforward`, input scaling, h = W (x ⊙ l) + b with l: (in,).

Initialization: l = 1, exactly the base model. Trainable parameters: n_layer · Σ_targets (in for a
feedforward target, else out); on k, v and down of GPT-2-small (12 layers, d 768, d_ff 3072):
12 · (768 + 768 + 3072) = 55,296, 0.04 % of its 124 M.
Merging folds l into the weight: W ← diag(l) W and b ← l ⊙ b (output scaling), or W ← W diag(l) (input
scaling); unmerging divides again (exact up to float rounding while no l is 0).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import targets as linear_targets
from .registry import Method, Option, register
from .lora import FrozenLinear


class IA3Linear(FrozenLinear):
    def __init__(self, base: nn.Linear, scale_input: bool):
        super().__init__(base)
        self.scale_input = scale_input
        size = base.in_features if scale_input else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, device=base.weight.device))  # l: (in,) or (out,)
        self.merged = False

    def forward(self, x):  # (…, in) -> (…, out)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        # the product in l's dtype, then back to the activations' (as peft): under fp16-mixed the gradient of an
        # fp32 l sums fp32 products, which in fp16 underflow; an fp32 l still keeps bf16 activations bf16
        if self.scale_input:
            return F.linear((x * self.ia3_l).to(x.dtype), self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        return (y * self.ia3_l).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self._fold(self.ia3_l)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self._fold(1 / self.ia3_l)
            self.merged = False

    def _fold(self, factor):  # input scaling: W diag(l) (columns); output scaling: diag(l) W and l ⊙ b (rows)
        self.weight.mul_(factor if self.scale_input else factor[:, None])
        if self.bias is not None and not self.scale_input:
            self.bias.mul_(factor)


def _check(cfg, targets, feedforward) -> tuple[tuple, tuple]:
    targets = linear_targets.validate(cfg, targets)
    wrong = [t for t in feedforward if t not in targets]
    if wrong:
        raise ValueError(f"ia3: feedforward target(s) {wrong} are not among the targets {list(targets)}; a "
                         "feedforward target scales its input instead of its output: list only targets there "
                         "(or none: --feedforward '')")
    return targets, tuple(feedforward)


def apply_ia3(model, targets: list[str], feedforward: list[str]):
    targets, feedforward = _check(model.cfg, targets, feedforward)
    for t in targets:
        linear_targets.wrap(model, [t], lambda layer: IA3Linear(layer, scale_input=t in feedforward))


def ia3_parameter_count(cfg, targets: list[str], feedforward: list[str], **_) -> int:
    targets, feedforward = _check(cfg, targets, feedforward)
    return cfg.n_layer * sum(linear_targets.shape(cfg, t)[0 if t in feedforward else 1] for t in targets)


register(Method(
    "ia3", "learned rescaling of keys, values and the FFN's inner activation (Liu et al. 2022)",
    apply_ia3, ia3_parameter_count,
    (Option("targets", list, ["k", "v", "down"], "linear layers to rescale: q,k,v,o,up,gate,down or 'all'"),
     Option("feedforward", list, ["down"], "targets that scale their input (the FFN's inner activation) rather "
            "than their output; must be among the targets")),
    lr=1e-2, mergeable=True, side_by_side=True, examples=({},)))
