"""A synthetic instruction task for finetuning on a CPU: "reverse: word" -> "drow".

    python experiments/make_reverse_task.py data/reverse            # writes train.jsonl, heldout.jsonl
    python experiments/make_reverse_task.py --score RUN data/reverse/heldout.jsonl

Words are random strings of lowercase letters (3 to 6 of them), so the task can
only be done by reading the prompt, not by remembering English; the held-out
words never occur in train.jsonl. Every character is in Tiny Shakespeare's
65-character vocabulary, so a character-level Shakespeare model can be the base.
--score prints the exact-match accuracy of a model's greedy answers on a
.jsonl file of prompts and responses (docs/finetuning.md).
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path


def make_words(count: int, rng: random.Random, taken: set[str]) -> list[str]:
    """Count distinct random lowercase words not in taken (which they are added to)."""
    words = []
    while len(words) < count:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def write_task(out: Path, train: int, heldout: int, seed: int) -> None:
    """Write out/train.jsonl and out/heldout.jsonl, one {"prompt", "response"} a line."""
    rng, taken = random.Random(seed), set()
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train), ("heldout", heldout)):
        words = make_words(count, rng, taken)
        lines = [json.dumps({"prompt": f"reverse: {w}", "response": w[::-1]}) for w in words]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"wrote {count} examples to {out / name}.jsonl")


def score(ckpt: str, path: Path) -> dict:
    """Exact-match accuracy of ckpt's greedy answers to the prompts of a .jsonl file."""
    import nanogpt

    lm = nanogpt.load(ckpt, device="cpu")
    examples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    right = sum(lm.chat(e["prompt"], max_new_tokens=16, temperature=0) == e["response"] for e in examples)
    return {"ckpt": ckpt, "examples": len(examples), "exact_match": right / len(examples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write into; with --score, the .jsonl to score")
    parser.add_argument("--train", type=int, default=4000, help="training examples")
    parser.add_argument("--heldout", type=int, default=200, help="held-out examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score", metavar="CKPT", help="score this checkpoint on the file given as out")
    args = parser.parse_args()
    if args.score:
        print(json.dumps(score(args.score, args.out)))
    else:
        write_task(args.out, args.train, args.heldout, args.seed)


if __name__ == "__main__":
    main()
