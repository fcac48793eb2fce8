"""A seeded generator of arithmetic word problems, for fine-tuning experiments that run offline (docs/hyplora.md).

Each problem is a short story with one to three operations on small integers; its ``output`` works the answer out
in one line per step and ends with ``The answer is N.``, and ``answer`` holds ``N``. The same seed gives the same
problems on every machine (Python's ``random.Random``), and the train and test sets never share a problem.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from helmlm.data.instructions import Instruction
from helmlm.errors import DataError

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kira", "Luis", "Mia", "Noor"]
ITEMS = ["apples", "marbles", "stamps", "books", "shells", "pencils", "cards", "coins", "stickers", "plums"]
BOXES = ["boxes", "bags", "jars", "crates", "baskets"]


def _problem(rng: random.Random) -> tuple[str, list[str], int]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(5)
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    if kind == 0:
        return (f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?",
                [f"{a} + {b} = {a + b}."], a + b)
    if kind == 1:
        a = a + b
        return (f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} does {name} have left?",
                [f"{a} - {b} = {a - b}."], a - b)
    if kind == 2:
        box = rng.choice(BOXES)
        return (f"{name} fills {c} {box} with {b} {item} each. How many {item} is that in total?",
                [f"{c} * {b} = {c * b}."], c * b)
    if kind == 3:
        box = rng.choice(BOXES)
        total = b * c
        return (f"{name} shares {total} {item} equally among {c} {box}. How many {item} go in each?",
                [f"{total} / {c} = {b}."], b)
    box = rng.choice(BOXES)
    return (f"{name} buys {c} {box} of {b} {item} and already had {a}. {name} then gives {other} {a // 2}. "
            f"How many {item} does {name} have?",
            [f"{c} * {b} = {c * b}.", f"{c * b} + {a} = {c * b + a}.", f"{c * b + a} - {a // 2} = {c * b + a - a // 2}."],
            c * b + a - a // 2)


def word_problems(n: int, seed: int = 0, exclude: set[str] = frozenset()) -> list[Instruction]:
    """``n`` distinct problems (none of whose questions is in ``exclude``) drawn with ``seed``."""
    rng, seen, out = random.Random(seed), set(exclude), []
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        question, steps, answer = _problem(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append(Instruction(question, "\n".join(steps) + f"\nThe answer is {answer}.", answer=str(answer)))
    if len(out) < n:
        raise DataError(f"could only draw {len(out)} distinct problems of the {n} asked")
    return out


def write_word_problems(out_dir: str | Path, train: int = 400, test: int = 200, seed: int = 0,
                        val: int = 0) -> dict[str, Path]:
    """``train.jsonl``, ``test.jsonl`` and, when ``val > 0``, ``val.jsonl`` (for choosing hyperparameters without
    touching the test set) in ``out_dir``, which must not hold them already; no problem is in two of them."""
    out_dir = Path(out_dir)
    sizes = {"train": train, "test": test, **({"val": val} if val > 0 else {})}
    paths = {split: out_dir / f"{split}.jsonl" for split in sizes}
    if any(p.exists() for p in paths.values()):
        raise DataError(f"{out_dir} already holds {', '.join(p.name for p in paths.values() if p.exists())}; "
                        "choose another directory")
    drawn: dict[str, list[Instruction]] = {}
    for offset, (split, n) in enumerate(sizes.items()):
        drawn[split] = word_problems(n, seed + offset, exclude={p.instruction for ps in drawn.values() for p in ps})
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, problems in drawn.items():
        with open(paths[split], "w", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps({"instruction": p.instruction, "output": p.output, "answer": p.answer}) + "\n")
    return paths
