"""The documentation: the README is a short front door whose links all resolve, and the site
built from docs/ by MkDocs (mkdocs.yml, the `docs` extra) builds with --strict, so a broken
link or anchor, a page missing from disk or a docstring the API reference cannot render fails
the test run. `make docs` is the same build."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 12_500
# [text](target) and ![alt](target), outside fenced code; the target up to a space or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def readme_links() -> list[str]:
    text = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code: `x[i](j)` is no link
    return LINK.findall(text)


def test_readme_is_a_short_front_door():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, more than {README_MAX_BYTES}: move the detail to docs/"
    )


def test_every_relative_link_in_the_readme_points_to_a_file():
    links = readme_links()
    assert links, "no links found in README.md"
    missing = []
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I) or link.startswith("#"):
            continue  # http:, https:, mailto: and anchors within the README
        path = link.split("#", 1)[0]
        if not (ROOT / path).exists():
            missing.append(link)
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_readme_lists_every_sweep_kind_with_its_page():
    from sweeps.kinds import KINDS

    readme = README.read_text()
    for name in KINDS:
        page = f"docs/kinds/{name}.md"
        assert (ROOT / page).exists(), f"sweep kind {name!r} has no page {page}"
        assert f"[`{name}`]({page})" in readme, f"README.md's kinds table lacks {name!r} linking to {page}"


def test_the_site_builds_strictly(tmp_path):
    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(
            f"the docs extra is not installed ({', '.join(missing)} missing): pip install -e '.[docs]' (make test does)"
        )
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    # the API reference was rendered from the docstrings, through the package's public names
    core = (site / "reference" / "core" / "index.html").read_text()
    assert "patchscope_core.PatchscopeEngine" in core and "patchscope_core.load_model" in core
    assert "SweepKind" in (site / "reference" / "sweeps" / "index.html").read_text()
    # the generated architecture table is on its page
    assert "GPT2LMHeadModel" in (site / "architectures" / "index.html").read_text()
