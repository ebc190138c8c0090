"""Deterministic demo data that reproduces the users' situation, written on first use.

`train`: multi-step arithmetic where the teacher is clearly better than the
frozen student (the student slips, truncates, repeats itself or hedges), so a
critic can learn to tell them apart, but not perfectly: a silent arithmetic
slip looks exactly like a correct answer to a small critic.
`shifted`: easy one-step prompts where the student is as good as the teacher
(the same templates drawn at random for either side, one in ten identical),
so a critic trained on `train` should sit near 50% there, with ties.
Columns use the users' names: content, teacher_response, student_response.
`train_prompts` / `shifted_prompts`: the same rows without the student column, the GAD input
(prompts + teacher responses) for which the frozen actor writes the student side (`demo:actor`).
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from critic.files import atomic_write

DEMO_SETS = {"train": 3000, "shifted": 400}
PROMPTS_ONLY = "_prompts"  # suffix of a set without the student column
DEMO_ACTORS = ("actor",)  # what `student.model: demo:<name>` accepts (critic/demo_actor.py builds it)
DEMO_NAMES = (*DEMO_SETS, *(name + PROMPTS_ONLY for name in DEMO_SETS))  # what `demo:<name>` accepts
DEMO_VERSION = 2  # bump when the generator changes: the file name changes with it
COLUMNS = ("content", "teacher_response", "student_response")
_OBJECTS = ["apples", "books", "coins", "tickets", "boxes", "pencils", "stamps", "marbles"]
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana"]


def _train_pair(rng: random.Random) -> tuple[str, str, str]:
    name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    a, b, c = rng.randint(2, 60), rng.randint(2, 12), rng.randint(2, 12)
    prompt = f"{name} has {a} {obj} and buys {b} packs of {c} {obj}. How many {obj} does {name} have now?"
    product, total = b * c, a + b * c
    steps = [f"Step 1: {b} packs of {c} is {b} * {c} = {product}.",
             f"Step 2: add the {a} {obj} {name} had: {a} + {product} = {total}."]
    teacher = " ".join(steps) + f" The answer is {total}."
    flaw = rng.choice(["slip", "truncate", "repeat", "hedge", "hedge"])
    if flaw == "slip":  # looks like the teacher, one wrong number: hard to detect
        wrong = total + rng.choice([-10, -2, -1, 1, 2, 10])
        student = f"{steps[0]} Step 2: add the {a} {obj} {name} had: {a} + {product} = {wrong}. The answer is {wrong}."
    elif flaw == "truncate":
        student = steps[0] + " Step 2: add the"
    elif flaw == "repeat":
        student = " ".join([steps[0]] * rng.randint(2, 3)) + f" The answer is {product}."
    else:
        guess = total if rng.random() < 0.5 else product
        student = f"I am not sure, maybe it is {guess}? It could be more or less, I think."
    return prompt, teacher, student


def _shifted_pair(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    prompt = f"What is {a} + {b}?"
    answers = [f"{a} + {b} = {a + b}.", f"The sum is {a + b}.", f"{a + b}."]
    teacher = rng.choice(answers)
    student = teacher if rng.random() < 0.1 else rng.choice([a for a in answers if a != teacher])
    return prompt, teacher, student


def make_demo_frame(name: str, seed: int = 1234) -> pd.DataFrame:
    """Build one demo set as a DataFrame (deterministic for a given name and seed)."""
    if name not in DEMO_SETS:
        raise ValueError(f"unknown demo set {name!r}; choose one of {', '.join(DEMO_SETS)}")
    rng = random.Random(f"{seed}-{name}")
    make = _train_pair if name == "train" else _shifted_pair
    rows = [make(rng) for _ in range(DEMO_SETS[name])]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def demo_path(name: str, cache_dir: str | Path) -> Path:
    """Path of a demo parquet file, written on first use."""
    if name not in DEMO_NAMES:
        raise ValueError(f"unknown demo set {name!r}; choose one of {', '.join(DEMO_NAMES)}")
    path = Path(cache_dir) / "demo" / f"{name}-v{DEMO_VERSION}.parquet"
    if not path.exists():
        frame = make_demo_frame(name.removesuffix(PROMPTS_ONLY))
        if name.endswith(PROMPTS_ONLY):
            frame = frame.drop(columns=["student_response"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return path


def demo_corpus() -> list[str]:
    """All demo texts, used to train the tiny preset's tokenizer."""
    texts: list[str] = []
    for name in DEMO_SETS:
        frame = make_demo_frame(name)
        for column in COLUMNS:
            texts.extend(frame[column].tolist())
    return texts
