"""Fine-tune a pretrained model with one PEFT method.

    python train.py --method lora --rank 8                 # MiniLM on rotten_tomatoes
    python train.py --model smollm2 --task hamlet --method lora --targets q,v --steps 100
    python train.py --list-methods
"""
import argparse
import json

import torch

import minipeft as mp
from minipeft import cli, data, trainer


def build_parser():
    p = argparse.ArgumentParser(description="Fine-tune a model with a parameter-efficient method.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_and_task_flags(p)
    p.add_argument("--method", default="lora", help="PEFT method; see --list-methods")
    p.add_argument("--list-methods", action="store_true", help="print the methods and their options, then exit")
    cli.add_method_flags(p)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the training split (unless --steps)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    t.add_argument("--batch-size", type=int, default=16, help="examples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the method's own)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases and norms)")
    t.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps spent warming up the learning rate")
    t.add_argument("--clip", type=float, default=1.0, help="clip the gradient norm to this")
    t.add_argument("--eval-every", type=int, default=0, help="steps between validation passes (0: four per run)")
    t.add_argument("--model-dropout", type=float, default=None, help="override the checkpoint's dropout")
    t.add_argument("--seed", type=int, default=0, help="seed for initialization, shuffling and dropout")
    t.add_argument("--out", default="checkpoints/run", help="output folder: metrics.jsonl and adapter/")
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    if args.list_methods:
        print(cli.list_methods())
        return
    method = mp.peft.get_method(args.method)
    options = cli.method_options(args)
    torch.manual_seed(args.seed)  # the classifier head's and the method's initialization
    model, tokenizer = mp.from_pretrained(args.model, dropout=args.model_dropout)
    task = data.load_task(args.task, tokenizer, max_len=args.max_len, seed=args.seed)
    if task.kind == "classification":
        model.add_classifier(task.n_classes)
    mp.apply(model, method.name, **options)
    config = trainer.TrainConfig(
        epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr or method.lr, weight_decay=args.weight_decay, warmup=args.warmup,
        max_grad_norm=args.clip, eval_every=args.eval_every, seed=args.seed, out=args.out)
    print(f"{args.model} on {args.task} ({task.kind}, {len(task.splits['train']):,} training examples), "
          f"method {method.name}, lr {config.lr}")
    summary = trainer.train(model, task, config)
    print(trainer.format_summary(summary))
    print(json.dumps({k: summary[k] for k in ("test_before", "test_after")}))


if __name__ == "__main__":
    cli.run(main)
