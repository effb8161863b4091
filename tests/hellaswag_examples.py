"""Examples in HellaSwag's JSONL schema, written for these tests (no HellaSwag text is copied).

HAND_WRITTEN has both of the dataset's shapes: ActivityNet-like (ctx_b a short
lower-case noun phrase that the task capitalises) and WikiHow-like (bracketed
markers such as [header] and [title] that the task cleans, ctx_b empty). A label
is sometimes a string, as in Hugging Face's copy. generated(n) makes n more from
word lists, of about HellaSwag's lengths, for timing on many examples:

    python -m tests.hellaswag_examples OUT.jsonl 120
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def example(
    ind: int, label_text: str, ctx_a: str, ctx_b: str, endings: list[str], label, source: str
) -> dict:
    return {
        "ind": ind,
        "activity_label": label_text,
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": f"{ctx_a} {ctx_b}".strip(),
        "split": "val",
        "split_type": "indomain",
        "label": label,
        "endings": endings,
        "source_id": source,
    }


HAND_WRITTEN = [
    example(
        0,
        "Painting a fence",
        "A woman dips a wide brush into a bucket of white paint.",
        "she",
        [
            "drags the brush along the top rail of the fence.",
            "throws the bucket into the lake.",
            "reads a newspaper upside down.",
            "starts singing to the fence posts loudly.",
        ],
        0,
        "activitynet~a",
    ),
    example(
        1,
        "Washing a car",
        "A man sprays soapy water over a red car parked in a driveway.",
        "the man",
        [
            "climbs onto the roof and falls asleep.",
            "wipes the doors with a large yellow sponge.",
            "paints the tires blue.",
            "eats the sponge.",
        ],
        1,
        "activitynet~b",
    ),
    example(
        2,
        "Playing guitar",
        "A boy sits on a stool holding an acoustic guitar. He tunes the strings.",
        "then he",
        [
            "strums a few chords while tapping his foot.",
            "puts the guitar in the oven.",
            "jumps over the stool twice.",
            "hands the guitar to a horse.",
        ],
        0,
        "activitynet~c",
    ),
    example(
        3,
        "Home and Garden",
        "[header] How to water a houseplant [title] Check the soil first.",
        "",
        [
            "[step] Push a finger into the soil; if the top inch is dry, the plant needs water.",
            "[step] Paint the pot a bright color and leave it outside in the snow.",
            "[title] Move the plant into the freezer overnight.",
            "[step] Cover the leaves with glue so they keep their shine.",
        ],
        0,
        "wikihow~1",
    ),
    example(
        4,
        "Food and Entertaining",
        "[header] How to make iced tea [title] Boil the water.",
        "",
        [
            "[step] Pour the water on the floor and wait.",
            "[step] Steep four tea bags in two cups of boiling water for five minutes.",
            "[step] Freeze the tea bags and throw them away.",
            "[title] Put the kettle in the dishwasher.",
        ],
        "1",
        "wikihow~2",
    ),
    example(
        5,
        "Running a marathon",
        "Runners crowd the start line of a city race. A horn sounds.",
        "the runners",
        [
            "sit down and eat breakfast.",
            "surge forward down the street.",
            "turn around and go home.",
            "begin to build a wall.",
        ],
        1,
        "activitynet~d",
    ),
    example(
        6,
        "Baking cookies",
        "A girl rolls cookie dough into small balls on a tray.",
        "she",
        [
            "places the tray in the preheated oven.",
            "throws the dough at the ceiling.",
            "puts the tray in the bathtub.",
            "mails the dough to her aunt.",
        ],
        0,
        "activitynet~e",
    ),
    example(
        7,
        "Personal Care and Style",
        "[header] How to tie a tie [title] Drape the tie around your "
        "neck. [step] The wide end should hang lower than the narrow end.",
        "",
        [
            "[title] Cross the wide end over the narrow end. [step] Then bring it up through the loop.",
            "[title] Cut the tie in half with scissors.",
            "[title] Tie it around your ankle instead.",
            "[step] Set the tie on fire to make it shorter.",
        ],
        0,
        "wikihow~3",
    ),
    example(
        8,
        "Mowing the lawn",
        "A man pulls the cord of a lawn mower and the engine starts.",
        "he",
        [
            "pushes the mower across the grass in straight rows.",
            "carries the mower up a ladder.",
            "puts the mower to bed.",
            "sells the grass to a neighbor.",
        ],
        0,
        "activitynet~f",
    ),
    example(
        9,
        "Swimming",
        "A swimmer stands on the edge of the pool wearing goggles.",
        "the swimmer",
        [
            "dives into the water and swims to the far end.",
            "takes off the goggles and eats them.",
            "walks away from the pool into the desert.",
            "climbs into the diving board.",
        ],
        0,
        "activitynet~g",
    ),
    example(
        10,
        "Pets and Animals",
        "[header] How to bathe a dog [title] Brush the dog's coat first. "
        "[step] This removes loose hair and tangles.",
        "",
        [
            "[title] Fill a tub with lukewarm water. [step] Use only a few inches for a small dog.",
            "[title] Teach the dog to read.",
            "[title] Bathe the dog in hot coffee.",
            "[step] Give the dog a haircut with a lawn mower.",
        ],
        0,
        "wikihow~4",
    ),
    example(
        11,
        "Skateboarding",
        "A teenager rides a skateboard down an empty parking lot. He",
        "approaches a ramp and",
        [
            "jumps, landing cleanly on the other side.",
            "stops to plant a tree.",
            "turns into a bird.",
            "takes a nap on the ramp.",
        ],
        0,
        "activitynet~h",
    ),
]

SUBJECTS = ["A man", "A woman", "Two children", "A chef", "An old farmer", "A young athlete", "The teacher"]
ACTIONS = [
    "picks up a heavy box",
    "walks into a crowded kitchen",
    "opens a window on a windy day",
    "kneels beside a small garden",
    "sets a ladder against the wall",
    "unrolls a long blue mat",
    "pours water into a tall glass",
    "ties a rope to a wooden post",
]
DETAILS = [
    "and looks around the room",
    "while a dog watches from the corner",
    "as music plays in the background",
    "before the sun goes down",
    "with careful, slow movements",
    "in front of a small audience",
]
ENDINGS = [
    "carefully places it on the table and smiles at the camera",
    "starts to explain each step to the viewers",
    "drops everything and runs out of the building",
    "begins to dance around the room with a broom",
    "turns to the camera and waves goodbye",
    "pauses to wipe the sweat from their face",
    "climbs onto the roof and shouts at the clouds",
    "hands the tools to a friend standing nearby",
    "sits down and reads a long newspaper article",
    "spins in circles until falling onto the grass",
]
HOW_TO = [
    "[header] How to clean a window [title] Gather your supplies. [step] You need a bucket, a sponge and "
    "a squeegee.",
    "[header] How to plant tomatoes [title] Choose a sunny spot. [step] Tomatoes need at "
    "least six hours of sun a day.",
    "[header] How to fold a shirt [title] Lay the shirt flat. [step] "
    "Smooth out any wrinkles with your hands.",
]


def generated(n: int, seed: int = 0) -> list[dict]:
    """N examples of HellaSwag's two shapes (ActivityNet-like contexts of 12-40 words, endings of 8-12;
    WikiHow-like contexts of about 50, endings of about 30).
    """
    rng = random.Random(seed)
    examples = []
    for ind in range(n):
        if ind % 3 == 2:  # WikiHow-like: a long bracketed context, longer endings, ctx_b empty
            ctx_a = rng.choice(HOW_TO) + "".join(
                f" {rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(DETAILS)}." for _ in range(2)
            )
            ctx_b = ""
            endings = [
                f"[step] {rng.choice(SUBJECTS)} {rng.choice(ENDINGS)}, then {rng.choice(ENDINGS)}. "
                f"[step] {rng.choice(SUBJECTS)} {rng.choice(ENDINGS)}."
                for _ in range(4)
            ]
        else:
            ctx_a = " ".join(
                f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(DETAILS)}."
                for _ in range(rng.randint(1, 3))
            )
            ctx_b = rng.choice(["he", "she", "they", "the man", "the woman"])
            endings = [f"{rng.choice(ENDINGS)}." for _ in range(4)]
        examples.append(
            example(
                ind,
                rng.choice(["Cleaning", "Gardening", "Cooking", "Exercise"]),
                ctx_a,
                ctx_b,
                endings,
                rng.randrange(4),
                f"generated~{ind}",
            )
        )
    return examples


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path


if __name__ == "__main__":
    write_jsonl(Path(sys.argv[1]), generated(int(sys.argv[2])))
