"""Render the documentation's architecture x site table from tests/test_architectures.py's results.

    PATCHSCOPE_ARCH_RESULTS=arch.json python -m pytest -q tests/test_architectures.py
    python -m tests.architecture_table arch.json --page docs/architectures.md

prints the markdown table and, with --page, replaces the table between that page's
`<!-- architectures:begin -->` and `<!-- architectures:end -->` markers (docs/architectures.md,
"Architectures, as tested" on the documentation site). Nothing here is typed by hand: every
cell is what the test recorded for that architecture and site.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BEGIN, END = "<!-- architectures:begin -->", "<!-- architectures:end -->"
COLUMNS = [
    "hook_embed",
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.hook_resid_post",
    "blocks.{l}.hook_attn_out",
    "blocks.{l}.hook_mlp_out",
    "blocks.{l}.attn.hook_z",
    "blocks.{l}.mlp.hook_post",
    "head ablation",
]


def cell(outcome: str | None) -> str:
    if outcome is None:
        return ""
    for prefix, text in (
        ("ok (no effect", "yes (no effect)"),
        ("ok", "yes"),
        ("refused (run)", "refused (layer)"),
        ("refused", "refused"),
        ("known gap", "**gap**"),
        ("not compared", "bridge hook never fires"),
        ("not checked", "n/a"),
        ("FAILED", "**FAILS**"),
    ):
        if outcome.startswith(prefix):
            if prefix == "refused" and "mixture-of-experts" in outcome:
                return "refused (MoE)"
            return text
    return outcome


def table(results: dict) -> str:
    archs = results["architectures"]
    head = "| architecture | " + " | ".join(c.replace("blocks.{l}.", "") for c in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    tested = {a: r for a, r in archs.items() if r["status"] != "skipped"}
    for name, r in sorted(tested.items()):
        note = "" if r.get("peeled", True) else " (bridged)"
        lines.append(f"| {name}{note} | " + " | ".join(cell(r["sites"].get(c)) for c in COLUMNS) + " |")
    skipped = sorted((a, r.get("reason", "")) for a, r in archs.items() if r["status"] == "skipped")
    lines += ["", f"Skipped ({len(skipped)}, with the reason the test recorded):", ""]
    lines += [f"- {a}: {reason.replace('|', '/')}" for a, reason in skipped]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--page", type=Path, help="the markdown page whose table to replace (docs/architectures.md)")
    args = parser.parse_args()
    text = table(json.loads(args.results.read_text()))
    print(text)
    if args.page:
        page = args.page.read_text()
        block = f"{BEGIN}\n{text}\n{END}"
        if BEGIN not in page:
            raise SystemExit(f"{args.page}: no {BEGIN} marker")
        args.page.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, page, flags=re.S))


if __name__ == "__main__":
    main()
