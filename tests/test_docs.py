"""The documentation holds together: the generated configuration reference is current, every relative link
of README.md and docs/*.md reaches a file (and a heading, when it names one), and the README stays a short
front door.

The commands these pages give are run by tests/test_readme_commands.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from spotune.docs_reference import REFERENCE_PATH, REGENERATE, render_reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250


FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
# [text](target) and ![alt](target), with an optional "title"; the text may hold one level of brackets.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^\s)>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans: links and headings there are not rendered."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation but '-' and '_' dropped,
    each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")  # HTML tags, code-span fences
    text = re.sub(r"(\*\*|\*)(\S.*?\S|\S)\1", r"\2", text)  # emphasis markers around words
    text = re.sub(r"(?<!\w)(__|_)(\S.*?\S|\S)\1(?!\w)", r"\2", text)  # (an underscore inside a word stays)
    return "".join(c for c in text.strip().lower() if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, numbered as GitHub numbers repeats (``name``, ``name-1``...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    """The link and image targets of ``page`` that point inside the repository (no scheme, not a bare '#')."""
    targets = LINK.findall(_prose(page.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("//")]


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        file = (page.parent / unquote(path_part)).resolve() if path_part else page
        try:
            name = _rel(file)
        except ValueError:
            problems.append(f"{target}: outside the repository")
            continue
        if not file.exists():
            problems.append(f"{target}: {name} does not exist")
            continue
        if anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{target}: {name} has no heading with the anchor #{anchor}")
    return problems


def test_the_configuration_reference_is_generated_from_the_code():
    on_disk = (ROOT / REFERENCE_PATH).read_text(encoding="utf-8") if (ROOT / REFERENCE_PATH).exists() else None
    assert on_disk == render_reference(), f"{REFERENCE_PATH} is stale or missing: run `{REGENERATE}`"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_reaches_a_file_and_heading(page):
    assert not broken_links(page), f"{_rel(page)}: " + "; ".join(broken_links(page))


def test_readme_is_a_short_front_door_that_links_every_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < README_MAX_LINES, f"README.md has {len(text.splitlines())} lines (< {README_MAX_LINES})"
    linked = {_rel((ROOT / t.partition("#")[0]).resolve()) for t in relative_links(README) if t.partition("#")[0]}
    unlinked = [_rel(p) for p in PAGES[1:] if _rel(p) not in linked]
    assert not unlinked, f"README.md does not link: {unlinked}"


@pytest.mark.parametrize("page", PAGES[1:], ids=_rel)
def test_every_page_has_a_title_and_a_way_back(page):
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# "), f"{_rel(page)} does not start with a '# ' title"
    assert "../README.md" in relative_links(page), f"{_rel(page)} has no link back to ../README.md"


def test_types_read_as_a_user_types_values():
    from typing import Literal, Optional

    from spotune.docs_reference import render_type

    assert render_type(int) == "int" and render_type(float | None) == "float | None"
    assert render_type(Literal["lora", "full"]) == 'one of: "lora", "full"'
    assert render_type(Optional[Literal["fp16", "bf16"]]) == '(one of: "fp16", "bf16") | None'
    assert render_type(list[str]) == "list[str]" and render_type(dict[str, float]) == "dict[str, float]"


def test_the_slug_rules_on_known_headings():
    assert github_slug("Plan: will it fit my card, and how long will it take?") == \
        "plan-will-it-fit-my-card-and-how-long-will-it-take"
    assert github_slug("The judge's precision") == "the-judges-precision"
    assert github_slug("`spotune train-spm`") == "spotune-train-spm"
    assert github_slug("python -m spotune.toyworld.pretrain") == "python--m-spotunetoyworldpretrain"
    assert github_slug("Training one: `spotune train-spm`") == "training-one-spotune-train-spm"
    assert github_slug("The step-aware model, SD1.5") == "the-step-aware-model-sd15"
    assert github_slug("**Bold** and `max_grad_norm`") == "bold-and-max_grad_norm"
