"""An example reward for objective=grpo: partial credit on the reverse task (make_reverse_task.py).

    python -m nanogpt.train +experiment=rl_reverse_cpu \
        objective.reward=experiments/reverse_reward.py:letters_in_place

A reward is a plain function of the prompt, the model's answer and the example's
fields (its JSON line) that returns a number. exact_match (shipped in
nanogpt/training/rewards.py) gives 1 or 0; this one also rewards an answer that
is nearly right, so a group of answers that are all wrong can still tell better
from worse. It reads the word from the prompt itself, so it needs no reference
answer: a reward can check a property in code rather than compare with a
demonstration.
"""

from __future__ import annotations


def letters_in_place(prompt: str, answer: str, example: dict) -> float:
    """The share of the reversed word's letters the answer has in their place, less a penalty for extra ones.

    1.0 only for the exact reversal; "reverse: abc" answered "cbx" scores 2/3.
    """
    word = prompt.removeprefix("reverse:").strip()
    target, answer = word[::-1], answer.strip()
    in_place = sum(a == b for a, b in zip(answer, target, strict=False))  # either may be longer
    extra = max(0, len(answer) - len(target))
    return max(0.0, (in_place - extra) / len(target))
