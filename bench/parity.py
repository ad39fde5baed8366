"""Quality parity: minipeft LoRA against transformers + peft LoRA, trained the same way.

    python bench/parity.py                              # one epoch (640 steps of 16) on rotten_tomatoes
    python bench/parity.py --steps 5 --eval-limit 64    # a smoke run

Both sides start from the same all-MiniLM-L6-v2 weights (minipeft's asset cache), get LoRA r=8 α=16 on
q,v with minipeft's defaults (LoRA dropout, init) mirrored in peft's LoraConfig, and a fresh
Linear(384, 2) head. minipeft's initial LoRA A (and zero B) and head are copied into the other side, and
the bench asserts that both give the same logits before training. Then both train on the identical
batches (minipeft's shuffle for the seed), each with its own library's training loop:
- minipeft: loop.train_step, with make_optimizer's AdamW and make_scheduler's warmup + cosine;
- transformers + peft: the optimizer and schedule transformers' Trainer builds
  (Trainer.create_optimizer_and_scheduler) for TrainingArguments(learning_rate, weight_decay,
  lr_scheduler_type="cosine", warmup_steps=the same fraction, max_grad_norm): fused AdamW, weight decay
  on every tensor but biases and LayerNorm weights; and the Trainer's step: cross-entropy, backward,
  clip_grad_norm_, optimizer.step, lr_scheduler.step, zero_grad.
So a defect in minipeft's optimizer or schedule shows as a gap. One difference is by design: minipeft
warms up one step ahead of transformers, whose first step has learning rate 0 (minipeft/core/loop.py);
without warmup the two schedules are equal. The two are stepped alternately, each with its own dropout
RNG stream seeded with --seed (as if it ran alone). The target: test accuracies within 1 point of each other.

Why the HF side is not BertForSequenceClassification: that class classifies the [CLS] token through
BERT's pooler (dense + tanh), whereas minilm in minipeft mean-pools the last hidden states over the
attention mask, as sentence-transformers trained it. So the HF side is a small wrapper: BertModel with
peft's LoRA, masked mean pooling, dropout (the model's hidden dropout, as minipeft) and the head.
Dropout: minipeft draws its masks with its own sampler (minipeft/fast/dropout.py, 15 random bits per
element), so from the same seed the two runs drop different units — two runs of one recipe, which is
what the target asks about. tests/test_parity.py checks with dropout off and no warmup that the two loops
do the same arithmetic step by step.
"""
import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minipeft as mp  # noqa: E402
from minipeft.core import loop
from minipeft.formats import tasks
from minipeft.run import trainer  # noqa: E402
from minipeft.formats.assets import asset_path  # noqa: E402

LORA = dict(rank=8, alpha=16, targets=("q", "v"))
HF_NAMES = {"q": "query", "k": "key", "v": "value"}  # minipeft target -> BertSelfAttention attribute


class MeanPoolClassifier(nn.Module):
    """transformers' BertModel (peft LoRA in it) + minipeft's minilm classifier: mean → dropout → head."""

    def __init__(self, encoder, d_model: int, n_classes: int, dropout: float):
        super().__init__()
        self.encoder, self.drop, self.head = encoder, nn.Dropout(dropout), nn.Linear(d_model, n_classes)

    def forward(self, input_ids, attention_mask):  # (B, T) -> (B, n_classes), as minipeft's forward
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # hidden (B, T, d); the masked mean of minipeft's Transformer.pool
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, d)
        return self.head(self.drop(pooled))


def build_ours(seed: int = 0, dropout: float | None = None):
    """minilm + a 2-class head + minipeft LoRA; dropout=None keeps the checkpoint's (0.1)."""
    torch.manual_seed(seed)  # head and LoRA A init
    model, tokenizer = mp.from_pretrained("minilm", dropout=dropout)
    model.add_classifier(2)
    mp.apply(model, "lora", **LORA)
    return model, tokenizer


def build_theirs(ours):
    """The same model in transformers + peft, starting from exactly `ours`' parameters."""
    import peft
    import transformers
    transformers.logging.set_verbosity_error()  # the checkpoint's unused pooler weights
    transformers.utils.logging.disable_progress_bar()
    options, p = ours.peft_config["options"], ours.cfg.dropout
    encoder = transformers.BertModel.from_pretrained(
        asset_path("minilm"), add_pooling_layer=False, hidden_dropout_prob=p, attention_probs_dropout_prob=p)
    config = peft.LoraConfig(r=options["rank"], lora_alpha=options["alpha"], lora_dropout=options["dropout"],
                             target_modules=[HF_NAMES[t] for t in options["targets"]])
    with warnings.catch_warnings():  # peft calls a method transformers deprecates (not about us)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        encoder = peft.get_peft_model(encoder, config)  # freezes BertModel, adds lora_A/lora_B
    model = MeanPoolClassifier(encoder, ours.cfg.d_model, ours.cfg.n_classes, p)
    with torch.no_grad():  # copy the starting point: LoRA A, B of every layer and the head
        for block, layer in zip(ours.blocks, encoder.base_model.model.encoder.layer, strict=True):
            for t in options["targets"]:
                mine, theirs = getattr(block.attn, t), getattr(layer.attention.self, HF_NAMES[t])
                theirs.lora_A["default"].weight.copy_(mine.lora_A)  # (r, in)
                theirs.lora_B["default"].weight.copy_(mine.lora_B)  # (out, r), zeros
        model.head.load_state_dict(ours.head.state_dict())
    return model.train(ours.training)


@torch.no_grad()
def max_logit_difference(a, b, batch) -> float:
    """max |Δ| of the two models' logits on `batch`, both in eval mode (no dropout)."""
    modes = a.training, b.training
    a.eval(), b.eval()
    logits = [m(batch["input_ids"], attention_mask=batch["attention_mask"]) for m in (a, b)]
    a.train(modes[0]), b.train(modes[1])
    return (logits[0] - logits[1]).abs().max().item()


class Run:
    """One side's model, optimizer, schedule and dropout RNG stream; step() trains on one batch."""

    def __init__(self, model, cfg: trainer.TrainConfig, steps: int):
        self.model, self.cfg = model, cfg
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = self.optimizer_and_scheduler(steps)
        self.rng = torch.Generator().manual_seed(cfg.seed).get_state()  # = torch.manual_seed(seed)
        self.seconds = 0.0

    def step(self, batch) -> float:
        torch.set_rng_state(self.rng)  # this side's dropout stream, untouched by the other side
        start = time.perf_counter()
        self.model.train()
        loss = self.train_on(batch)
        self.seconds += time.perf_counter() - start
        self.rng = torch.get_rng_state()
        return loss


class Minipeft(Run):
    """minipeft's loop: make_optimizer, make_scheduler and loop.train_step."""

    def optimizer_and_scheduler(self, steps: int):
        optimizer = loop.make_optimizer(self.model, self.cfg.lr, self.cfg.weight_decay)
        return optimizer, loop.make_scheduler(optimizer, self.cfg.warmup, steps)

    def train_on(self, batch) -> float:
        result = loop.train_step(self.model, self.optimizer, self.scheduler, iter([batch]), "classification",
                                    max_grad_norm=self.cfg.max_grad_norm)
        assert result.finite, "non-finite loss or gradient: train_step skipped the update"
        return result.loss


class TransformersTrainer(Run):
    """transformers' Trainer's optimizer and schedule for the same settings, and its training step."""

    def optimizer_and_scheduler(self, steps: int):
        import transformers
        cfg = self.cfg
        with tempfile.TemporaryDirectory() as folder:  # the Trainer wants an output folder; it writes nothing we keep
            args = transformers.TrainingArguments(
                output_dir=folder, learning_rate=cfg.lr, weight_decay=cfg.weight_decay, lr_scheduler_type="cosine",
                warmup_steps=cfg.warmup, max_grad_norm=cfg.max_grad_norm, max_steps=steps, seed=cfg.seed,
                use_cpu=True, report_to=[], save_strategy="no")
            hf_trainer = transformers.Trainer(model=self.model, args=args)
            hf_trainer.create_optimizer_and_scheduler(num_training_steps=steps)
        return hf_trainer.optimizer, hf_trainer.lr_scheduler

    def train_on(self, batch) -> float:
        logits = self.model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, 2)
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return loss.item()


def main():
    mp.fast.enable()  # minipeft as train.py runs it: the fast twins of the core (minipeft/fast/)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=640, help="optimizer steps (640 = one epoch at batch 16)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step")
    p.add_argument("--lr", type=float, default=mp.get_method("lora").lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="init, data order and dropout seed")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N test examples")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    ours, tokenizer = build_ours(args.seed)
    theirs = build_theirs(ours)
    task = tasks.load_task("rotten_tomatoes", tokenizer, max_len=128, seed=0)
    test = task.splits["test"].head(args.eval_limit)
    cfg = trainer.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)

    delta = max_logit_difference(ours, theirs, next(test.batches(cfg.eval_batch_size)))
    print(f"initial logits, max |Δ| over {min(len(test), cfg.eval_batch_size)} test examples: {delta:.2e}")
    assert delta < 1e-5, f"the two models do not start from the same function (max |Δ| {delta:.2e})"

    runs = {"minipeft": Minipeft(ours, cfg, args.steps),
            "transformers + peft": TransformersTrainer(theirs, cfg, args.steps)}
    accuracy = {name: [loop.evaluate(run.model, test, "classification", cfg.eval_batch_size)["accuracy"]]
                for name, run in runs.items()}
    # the trainer's own batch stream: shuffled per (seed, epoch), drop_last, epoch after epoch
    batches = trainer.training_batches(task.splits["train"], cfg, trainer.Progress())
    with tqdm(range(args.steps), desc="train", unit="step", dynamic_ncols=True) as bar:
        for _ in bar:
            batch = next(batches)
            losses = [run.step(batch) for run in runs.values()]  # ours, then theirs, on the same batch
            bar.set_postfix(loss_minipeft=f"{losses[0]:.4f}", loss_peft=f"{losses[1]:.4f}")
    for name, run in runs.items():
        after = loop.evaluate(run.model, test, "classification", cfg.eval_batch_size)
        accuracy[name].append(after["accuracy"])

    print(f"\n{args.steps} steps × {args.batch_size}, lr {args.lr:g}, seed {args.seed}, "
          f"{len(test)} test examples\n")
    print("| library | trainable params | test accuracy before | after | s/step |")
    print("|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        before, after = accuracy[name]
        print(f"| {name} | {sum(q.numel() for q in run.trainable):,} | {100 * before:.2f}% "
              f"| {100 * after:.2f}% | {run.seconds / args.steps:.3f} |")
    difference = 100 * abs(accuracy["minipeft"][1] - accuracy["transformers + peft"][1])
    print(f"\ndifference in test accuracy: {difference:.2f} points (target: within 1)")


if __name__ == "__main__":
    main()
