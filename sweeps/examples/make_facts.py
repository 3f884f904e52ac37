"""Build facts.csv: facts SmolLM2-135M answers correctly, for the ablation and tracing examples.

Candidates come from the LRE relations shipped with the Patchscopes paper's data
(country_capital_city, product_by_company; sweeps/examples/lre, Apache 2.0)
put into a sentence, and from a few well-known landmarks and companies written for this project
with the subject first, as ROME's facts are. A fact is kept when the model's greedy next token
is the answer's first token.

    .venv/bin/python sweeps/examples/make_facts.py [--data sweeps/examples/lre]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from patchscope_core import load_model, model_info, tokenize

LRE = {  # relation -> (sentence, subjects to try)
    "country_capital_city": ("The capital city of {} is", ["France", "Germany", "Japan", "Italy", "Spain", "Egypt"]),
    "product_by_company": ("{} is a product made by", ["Windows XP", "Wii U", "iPod", "Xbox"]),
}
WRITTEN = [  # (prompt, subject, answer, relation)
    ("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris", "landmark_city"),
    ("The Colosseum is located in the city of", "Colosseum", " Rome", "landmark_city"),
    ("The Statue of Liberty is located in the city of", "Statue of Liberty", " New York", "landmark_city"),
    ("The Louvre is located in the city of", "Louvre", " Paris", "landmark_city"),
    ("The Taj Mahal is located in the country of", "Taj Mahal", " India", "landmark_country"),
    ("Toyota is a car company from the country of", "Toyota", " Japan", "company_country"),
    ("The PlayStation is a product made by", "PlayStation", " Sony", "product_by_company"),
]


def candidates(data: Path) -> list[tuple[str, str, str, str]]:
    out = []
    for relation, (sentence, subjects) in LRE.items():
        with open(data / "factual" / f"{relation}.tsv", newline="") as fh:
            objects = {r["subject"]: r["object"] for r in csv.DictReader(fh, delimiter="\t")}
        out += [(sentence.format(s), s, " " + objects[s], relation) for s in subjects if s in objects]
    return out + WRITTEN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parent / "lre"))
    ap.add_argument("--out", default=str(Path(__file__).with_name("facts.csv")))
    args = ap.parse_args()
    model, info = load_model("smollm2-135m", device="cpu"), model_info("smollm2-135m")
    kept = []
    for prompt, subject, answer, relation in candidates(Path(args.data)):
        ids = torch.tensor([tokenize(info, prompt)])
        with torch.no_grad():
            logits = model.original_model(ids).logits[0, -1]
        first = info.tokenizer(answer, add_special_tokens=False)["input_ids"][0]
        p = float(torch.softmax(logits.float(), -1)[first])
        ok = int(logits.argmax()) == first
        print(f"{'kept' if ok else 'drop'}  p={p:.2f}  {prompt!r} -> {answer!r}")
        if ok:
            kept.append({"prompt": prompt, "subject": subject, "answer": answer, "relation": relation})
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "subject", "answer", "relation"])
        writer.writeheader()
        writer.writerows(kept)
    print(f"{len(kept)} facts -> {args.out}")


if __name__ == "__main__":
    main()
