"""A synthetic instruction task for finetuning on a CPU: "reverse: word" -> "drow".

    python experiments/make_reverse_task.py data/reverse            # writes train.jsonl, heldout.jsonl
    python experiments/make_reverse_task.py --score RUN data/reverse/heldout.jsonl
    python experiments/make_reverse_task.py --pairs RUN data/reverse/train.jsonl    # writes pairs.jsonl

Words are random strings of lowercase letters (3 to 6 of them), so the task can
only be done by reading the prompt, not by remembering English; the held-out
words never occur in train.jsonl. Every character is in Tiny Shakespeare's
65-character vocabulary, so a character-level Shakespeare model can be the base.
--score prints the exact-match accuracy of a model's greedy answers on a
.jsonl file of prompts and responses (docs/finetuning.md). --pairs writes the
preference pairs objective=dpo learns from: for each training prompt the model
answers wrongly (greedily, else in one sample at temperature 1), the right
answer as "chosen" and the model's own as "rejected".
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


def write_pairs(ckpt: str, path: Path) -> Path:
    """pairs.jsonl beside path: the right answer against ckpt's own wrong one, for each prompt it misses."""
    import nanogpt

    lm = nanogpt.load(ckpt, device="cpu")
    pairs = []
    for e in (json.loads(line) for line in path.read_text().splitlines() if line.strip()):
        wrong = [a for a in (lm.chat(e["prompt"], max_new_tokens=16, temperature=0),
                             lm.chat(e["prompt"], max_new_tokens=16, temperature=1.0, seed=len(pairs)))
                 if a != e["response"]]
        if wrong:
            pairs.append(json.dumps({"prompt": e["prompt"], "chosen": e["response"], "rejected": wrong[0]}))
    out = path.parent / "pairs.jsonl"
    out.write_text("\n".join(pairs) + "\n")
    print(f"wrote {len(pairs)} pairs to {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write into; with --score, the .jsonl to score")
    parser.add_argument("--train", type=int, default=4000, help="training examples")
    parser.add_argument("--heldout", type=int, default=200, help="held-out examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score", metavar="CKPT", help="score this checkpoint on the file given as out")
    parser.add_argument("--pairs", metavar="CKPT", help="preference pairs of this checkpoint's wrong answers "
                                                        "to the prompts of the file given as out")
    args = parser.parse_args()
    if args.score:
        print(json.dumps(score(args.score, args.out)))
    elif args.pairs:
        write_pairs(args.pairs, args.out)
    else:
        write_task(args.out, args.train, args.heldout, args.seed)


if __name__ == "__main__":
    main()
