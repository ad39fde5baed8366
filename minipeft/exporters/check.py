"""Every export is read back and run before it is reported done:

    reloaded logits   the written files loaded again (from_pretrained for hf and gguf; the base plus the
                      adapter file for peft and gguf-lora), on a few probe sentences
    memory logits     the model in memory, as it runs (method unmerged)
    base logits       the base the method sits on, where the model still has it

The export passes when
    1. the method changes the model at all: max |memory − base| > 0. An adapter that leaves the logits
       equal to the base model's (LoRA's B still zero: never trained, or not loaded) is an error, not a file;
    2. the reloaded model computes the model in memory, up to the rounding of the dtype written (or of the
       one the model computes in, if wider): max |reloaded − memory| ≤ TOLERANCES[dtype] · max |memory|, and,
       where there is a base, the reloaded logits are nearer the model in memory than the base's (the
       update outlived the rounding);
    3. for hf, whose merged weights are at hand, also step by step (check_steps): the merged weights compute
       the model in memory, and the files give the same weights rounded to the dtype, both within fp32's bound;
       rule 2's bound for a half dtype is loose enough to miss a layer lost on the way.
The report names the sentence with the largest difference.
"""
import copy
from dataclasses import dataclass

import torch

from minipeft.core.model import Transformer
from minipeft.formats.weights import weights_to_come

PROBES = ("The capital of France is Paris.", "To be, or not to be, that is the question:", "I loved this film!")
# largest |reloaded − memory| allowed, as a fraction of the largest |logit|: fp32 leaves the sums'
# order (merged W + ΔW against x Wᵀ + x ΔWᵀ); the others, their own rounding of every weight
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1, "q8_0": 1e-1}
PRECISION_DTYPES = {"fp32": "fp32", "bf16-mixed": "bf16", "bf16-true": "bf16", "fp16-mixed": "fp16",
                    "bf16": "bf16", "fp16": "fp16"}  # the last two: a model cast by hand (precision below)


@dataclass
class Check:
    largest_difference: float  # max |reloaded − memory| over the probes
    sentence: str  # the probe where it is largest
    scale: float  # max |memory logit|
    adapter_change: float | None  # max |memory − base|; None: no base to compare with
    argmax_agreement: float  # fraction of positions (or rows) where reloaded and memory pick the same token

    def __str__(self):
        change = "" if self.adapter_change is None else f"; the adapter changes them by up to {self.adapter_change:.3g}"
        return (f"largest |logit difference| from the model in memory {self.largest_difference:.3g} (logits up to "
                f"{self.scale:.3g}), on {self.sentence!r}; same argmax at {self.argmax_agreement:.1%} of positions"
                f"{change}")


@dataclass
class Probes:
    names: list[str]  # each row's sentence
    ids: torch.Tensor  # (B, T) token ids, right-padded
    mask: torch.Tensor  # (B, T) 1 = a real token


def probes(model, tokenizer) -> Probes:
    """The probe sentences through the tokenizer, else seeded random ids, as one right-padded batch."""
    cfg = model.cfg
    if tokenizer:
        names, rows = list(PROBES), [tokenizer.encode(text).ids[:cfg.max_seq_len] for text in PROBES]
        if (largest := max(max(row, default=0) for row in rows)) >= cfg.vocab_size:
            raise ValueError(f"the tokenizer gives token id {largest}, past the model's {cfg.vocab_size} embeddings, "
                             "so it is not this model's tokenizer; pass the one mp.from_pretrained returned with it")
    else:
        g = torch.Generator().manual_seed(0)
        names = [f"random token ids #{k}" for k in range(len(PROBES))]
        rows = [torch.randint(0, cfg.vocab_size, (min(12 + 2 * k, cfg.max_seq_len),), generator=g).tolist()
                for k in range(len(PROBES))]
    T = max(len(row) for row in rows)
    ids = torch.full((len(rows), T), cfg.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return Probes(names, ids, mask)


@torch.no_grad()
def logits_on(model, batch: Probes) -> list[torch.Tensor]:
    """Each probe's logits, fp32 on the CPU: (T_i, vocab) for an LM, (n_classes,) for a classifier."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model(batch.ids.to(device), attention_mask=batch.mask.to(device)).float().cpu()
    model.train(was_training)
    if model.cfg.n_classes:
        return list(out)
    return [row[:n] for row, n in zip(out, batch.mask.sum(1).tolist())]


def plain_model(cfg, weights: dict[str, torch.Tensor]) -> Transformer:
    """A plain Transformer of `cfg` holding `weights` (no copies: the tensors become its parameters)."""
    with weights_to_come():
        model = Transformer(copy.deepcopy(cfg))
    model.load_state_dict(weights, strict=True, assign=True)
    model.reset_buffers()
    if cfg.tie_embeddings and not cfg.n_classes:
        model.head.weight = model.tok_emb.weight
    return model.eval()


def precision(model) -> str:
    """What the model in memory computes in: the precision set_precision recorded, else its weights' dtype (a
    model cast with .to(torch.bfloat16) rounds its logits as bf16 does, and its export is checked so)."""
    recorded = getattr(model, "precision", "fp32")
    if recorded != "fp32":
        return recorded
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(model.parameters()).dtype, "fp32")


def compare(names: list[str], reloaded: list, memory: list, base: list | None, dtype: str, precision: str) -> Check:
    """The Check of an export (ValueError when it fails, see the module docstring)."""
    _require_finite(names, memory, "the model in memory", "its weights hold nan or inf (a training run that "
                    "diverged?), so there is no model to export; load a checkpoint from before and export that")
    _require_finite(names, reloaded, "the export, read back,", f"a weight is likely beyond what {dtype} holds; "
                    "export in a wider dtype (bf16 or fp32)")
    difference, worst, scale = _largest_difference(names, reloaded, memory)
    agree = torch.cat([(r.argmax(-1) == m.argmax(-1)).flatten() for r, m in zip(reloaded, memory)]).float().mean()
    change = None if base is None else max((m - b).abs().max().item() for m, b in zip(memory, base))
    check = Check(difference, worst, scale, change, agree.item())
    if change is not None and change <= 1e-7 * max(1.0, scale):
        raise ValueError("the model's method leaves its logits equal to the base model's (an untrained adapter, "
                         "e.g. LoRA's B still zero, or one that was never loaded), so the export would serve the "
                         "base model; train or load the adapter first")
    if check.largest_difference > _bound(dtype, precision) * max(1.0, scale):
        raise ValueError(f"the export, read back, does not compute the model in memory: {check}")
    if base is not None and _distance(reloaded, memory) >= _distance(reloaded, base):
        raise ValueError(f"in {dtype} the adapter's change is lost in the rounding (the export is as near the base "
                         f"model as the tuned one: {check}); export in a wider dtype (fp32)")
    return check


def check_steps(names: list[str], merged: list, written: list, reloaded: list, memory: list, precision: str) -> None:
    """A merged export checked step by step, where its merged weights are at hand (hf): `merged`, their logits,
    computes the model in memory, and `reloaded` gives `written`, the logits of the same weights rounded to the
    dtype written, both within fp32's bound (the first: or the precision the model computes in). A layer lost
    between the merge and the files shows however small it is; compare's bound for a dtype (a tenth of the
    largest logit in bf16) would let the update of a layer or two go unseen."""
    _require_close(names, merged, memory, _bound("fp32", precision), "the merged weights do not compute the model in "
                   "memory")
    _require_close(names, reloaded, written, TOLERANCES["fp32"], "the files, read back, do not hold the merged weights "
                   "written")


def _bound(dtype: str, precision: str) -> float:
    """The tolerance of an export in `dtype` of a model computing in `precision`: the wider of the two roundings."""
    return max(TOLERANCES[dtype], TOLERANCES[PRECISION_DTYPES.get(precision, "fp32")])


def _largest_difference(names: list[str], ours: list, theirs: list) -> tuple[float, str, float]:
    """(largest |ours − theirs| over the probes, the probe it is on, the largest |logit| of theirs)."""
    differences = [(a - b).abs().max().item() for a, b in zip(ours, theirs)]
    worst = max(range(len(names)), key=differences.__getitem__)
    return differences[worst], names[worst], max(t.abs().max().item() for t in theirs)


def _require_finite(names: list[str], logits: list, who: str, why: str) -> None:
    """ValueError naming the first probe on which `who` computes nan or inf (a nan would pass every bound)."""
    for name, row in zip(names, logits):
        if not torch.isfinite(row).all():
            raise ValueError(f"{who} computes nan or inf logits on {name!r}: {why}")


def _require_close(names: list[str], ours: list, theirs: list, tolerance: float, failure: str) -> None:
    difference, worst, scale = _largest_difference(names, ours, theirs)
    if difference > tolerance * max(1.0, scale):
        raise ValueError(f"{failure} (largest |logit difference| {difference:.3g}, logits up to {scale:.3g}, "
                         f"on {worst!r}), so nothing was kept: this is a bug in minipeft's export; report it")


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum((x - y).pow(2).sum().item() for x, y in zip(a, b)) ** 0.5
