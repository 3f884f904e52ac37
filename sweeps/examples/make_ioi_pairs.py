"""Build ioi_pairs.csv: indirect-object-identification pairs SmolLM2-135M gets right, for the
activation-patching example.

A clean prompt names two people and then one of them again, the subject (S2), as in Wang et
al. (2022): "When Mary and John went to the store, John gave a drink to" -> " Mary" (the
indirect object), wrong answer " John". Its corrupted twin replaces S2 by the other name
("..., Mary gave a drink to"), so the right answer flips. Names are those SmolLM2's tokenizer
keeps as one token with the leading space, so both prompts have the same token length and the
answers are one token. A pair is kept when the clean logit difference (answer minus wrong
answer at the last position) is positive and the corrupted one negative.

Last run: 96 of 96 candidates passed (12 one-token names); the first 22, templates in turn, are kept.

    .venv/bin/python sweeps/examples/make_ioi_pairs.py [--keep 22]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import random
from pathlib import Path

import torch

from patchscope_core import Engine, load_model, model_info
from patchscope_core.methods.patcher import Patcher
from patchscope_core.methods.patching import Pair

TEMPLATES = [
    "When {a} and {b} went to the store, {s} gave a drink to",
    "After {a} and {b} went to the park, {s} gave a ball to",
    "Then, {a} and {b} had a long argument, and afterwards {s} said to",
    "While {a} and {b} were working at the office, {s} gave a book to",
]
NAMES = ["Mary", "John", "Tom", "James", "Anna", "Sarah", "David", "Paul", "Mike", "Emma", "Kate", "Peter"]


def one_token_names(tokenizer) -> list[str]:
    return [n for n in NAMES if len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) == 1]


def candidates(names: list[str], per_template: int) -> list[list[Pair]]:
    """Per template, `per_template` pairs of different names (a fixed shuffle of the orderings)."""
    pairs = list(itertools.permutations(names, 2))
    random.Random(0).shuffle(pairs)
    return [
        [
            Pair(template.format(a=a, b=b, s=b), template.format(a=a, b=b, s=a), " " + a, " " + b)
            for a, b in pairs[t :: len(TEMPLATES)][:per_template]
        ]
        for t, template in enumerate(TEMPLATES)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-template", type=int, default=24)
    ap.add_argument("--keep", type=int, default=22)
    ap.add_argument("--out", default=str(Path(__file__).with_name("ioi_pairs.csv")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = one_token_names(model_info(args.model).tokenizer)
    pool = candidates(names, args.per_template)
    patcher = Patcher(Engine(load_model(args.model, device="cpu"), name=args.model))

    def passes(pair: Pair) -> bool:
        r = patcher.patch(pair, [])  # no cells: the clean and corrupted runs' logit differences
        return r.clean_values["logit_diff"] > 0 > r.corrupted_values["logit_diff"]

    kept = [[p for p in group if passes(p)] for group in pool]
    n_kept, n_pool = sum(map(len, kept)), sum(map(len, pool))
    print(f"{n_kept} of {n_pool} candidates passed (names: {', '.join(names)}); keeping {min(n_kept, args.keep)}")
    order = [p for row in itertools.zip_longest(*kept) for p in row if p is not None][: args.keep]  # templates in turn
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["clean", "corrupted", "answer", "wrong_answer"])
        for p in order:
            w.writerow([p.clean, p.corrupted, p.answer, p.wrong_answer])


if __name__ == "__main__":
    main()
