"""Preference pairs from the shipped Hamlet text: four spoken lines as the prompt (`--context`), the line
that follows them chosen, a line drawn from elsewhere in the same part of the play rejected. The play is cut in
order (the first 80 % of its spoken lines for training, the next 5 % for validation, the rest for test),
so the held-out pairs come from scenes training never saw. Writes train / validation / test .jsonl files
that train.py reads as a preference folder.

    python bench/hamlet_pairs.py --out checkpoints/hamlet-pairs
    python train.py --model smollm2 --task checkpoints/hamlet-pairs --steps 200 --batch-size 8 --max-len 128 \\
        --precompute-reference --eval-every 50 --save-every 0
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minipeft.formats.assets import asset_path  # noqa: E402

SPEAKER_OR_DIRECTION = re.compile(r"[A-Z][A-Z ]+\.?|(Enter|Exit|Exeunt|Re-enter)\b.*")
CUTS = {"train": (0.0, 0.8), "validation": (0.8, 0.85), "test": (0.85, 1.0)}


def spoken_lines(text: str) -> list[str]:
    """The play's lines without blank lines, speakers' names (in capitals) and stage directions."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not SPEAKER_OR_DIRECTION.fullmatch(line)]


def pairs(lines: list[str], start: int, stop: int, rng: random.Random, context: int = 4) -> list[dict]:
    """A pair for every line of lines[start:stop] with `context` lines before it in the range and at least
    three words; the rejected line is another of those lines, of three words or more."""
    pool = lines[start + context:stop]
    rows = []
    for i in range(start + context, stop):
        chosen = lines[i]
        if len(chosen.split()) < 3:
            continue
        rejected = rng.choice(pool)
        while rejected == chosen or len(rejected.split()) < 3:
            rejected = rng.choice(pool)
        rows.append({"prompt": "\n".join(lines[i - context:i]) + "\n", "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("checkpoints/hamlet-pairs"), help="the folder written")
    parser.add_argument("--train", type=int, default=1600, help="training pairs kept (of about 3,200)")
    parser.add_argument("--validation", type=int, default=128, help="validation pairs kept (of about 150)")
    parser.add_argument("--test", type=int, default=512, help="test pairs kept (of about 580)")
    parser.add_argument("--context", type=int, default=4, help="spoken lines before the chosen one in a prompt")
    parser.add_argument("--seed", type=int, default=0, help="the rejected lines and which pairs are kept")
    args = parser.parse_args()
    lines = spoken_lines(asset_path("hamlet").read_text(encoding="utf-8"))
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, (begin, end) in CUTS.items():
        rows = pairs(lines, int(begin * len(lines)), int(end * len(lines)), rng, args.context)[:getattr(args, split)]
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{split}: {len(rows):,} pairs")


if __name__ == "__main__":
    main()
