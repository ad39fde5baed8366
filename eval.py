"""Evaluate a base model, or a base model plus a saved adapter, on a task's test split; or generate.

    python eval.py --adapter checkpoints/run/adapter                 # accuracy / perplexity on test
    python eval.py --model smollm2 --generate "The capital of France is"
"""
import argparse

import minipeft as mp
from minipeft import cli, data, peft, trainer


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a model (and adapter) or generate text.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_and_task_flags(p)
    p.add_argument("--adapter", default=None, help="adapter folder saved by train.py (its <out>/adapter)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"), help="which split to score")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split (use the training run's)")
    p.add_argument("--generate", default=None, metavar="PROMPT", help="print a greedy continuation of PROMPT (causal models)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate with --generate")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights first (lora)")
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    n_classes = None
    if args.adapter:
        n_classes = peft.read_adapter_config(args.adapter)["base"]["config"].get("n_classes")
    model, tokenizer = mp.from_pretrained(args.model, n_classes=n_classes)
    if args.adapter:
        mp.load_adapter(model, args.adapter)
        if args.merge:
            mp.merge(model)
    model.eval()
    if args.generate is not None:
        import torch
        ids = torch.tensor([tokenizer.encode(args.generate).ids])
        out = model.generate(ids, args.max_new_tokens)
        print(args.generate + tokenizer.decode(out[0, ids.shape[1]:].tolist()))
        return
    task = data.load_task(args.task, tokenizer, max_len=args.max_len, seed=args.seed)
    if task.kind == "classification" and not n_classes:
        model.add_classifier(task.n_classes)
        print("note: no adapter given, so the classifier head is freshly initialized (a chance-level baseline)")
    metrics = trainer.evaluate(model, task.splits[args.split], task.kind, args.batch_size)
    print(f"{args.model}{' + ' + args.adapter if args.adapter else ''} on {args.task} {args.split}: "
          f"{trainer.headline(metrics)}")


if __name__ == "__main__":
    cli.run(main)
