"""The README and the documentation site stay navigable: every relative link resolves to a file, and the README stays
the short front door it is meant to be.

Relative links are checked as files, without anchors: an anchor (``page.md#section``) breaks silently when a heading
is renamed, so pages link to pages. ``mkdocs build --strict`` (run by ``.ci/run``) checks the site as MkDocs renders
it; this test checks the same files as GitHub shows them, with no extra package.
"""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 250

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows) or ")"
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
# [label]: target
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files() -> list[str]:
    """README.md, CHANGELOG.md and every Markdown page under docs/ (links followed into docs/benchmarks/results)."""
    files = [os.path.join(ROOT, name) for name in ("README.md", "CHANGELOG.md")]
    for folder, _, names in os.walk(os.path.join(ROOT, "docs"), followlinks=True):
        files += [os.path.join(folder, name) for name in sorted(names) if name.endswith(".md")]
    return [path for path in files if os.path.isfile(path)]


def relative_links(text: str) -> list[tuple[int, str]]:
    """``(line number, target)`` of every relative link outside code blocks and inline code."""
    links, in_fence = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        line = _INLINE_CODE.sub("", line)
        targets = _INLINE_LINK.findall(line) + _REFERENCE.findall(line)
        links += [(number, target) for target in targets if not _SCHEME.match(target)]
    return links


def broken_links(path: str) -> list[str]:
    """A message for each relative link of ``path`` that carries an anchor or names no existing file."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    where = os.path.relpath(path, ROOT)
    problems = []
    for number, target in relative_links(text):
        if "#" in target:
            problems.append(f"{where}:{number}: {target!r} has an anchor (link to the page, not a section)")
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        if not os.path.isfile(resolved):
            problems.append(f"{where}:{number}: {target!r} names no file ({os.path.relpath(resolved, ROOT)})")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: os.path.relpath(path, ROOT))
def test_relative_links_resolve(path):
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_the_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        lines = handle.read().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES} and move the rest to docs/"


def documented_names() -> set[str]:
    """The names the API reference renders: every ``::: hf_vcon.<name>`` line of docs/reference/."""
    folder = os.path.join(ROOT, "docs", "reference")
    names = set()
    for page in os.listdir(folder):
        if page.endswith(".md"):
            with open(os.path.join(folder, page), encoding="utf-8") as handle:
                names.update(re.findall(r"^:::\s+hf_vcon\.(\w+)\s*$", handle.read(), re.MULTILINE))
    return names


def test_every_public_name_is_in_the_reference():
    import hf_vcon

    missing = sorted(set(hf_vcon.__all__) - {"__version__"} - documented_names())
    assert not missing, f"add a '::: hf_vcon.<name>' entry to a page of docs/reference/ for: {missing}"


def test_the_docs_pages_are_found():
    pages = {os.path.relpath(path, ROOT) for path in markdown_files()}
    assert {"README.md", "docs/index.md", "docs/contributing.md", "docs/reference/index.md"} <= pages


def test_the_checker_sees_broken_links(tmp_path):
    """The checks above can fail: a page with a missing file, an anchor, and links that must be left alone."""
    (tmp_path / "there.md").write_text("# there\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) ![ok](there.md \"title\") [web](https://example.org/x.md) [mail](mailto:a@b.c)\n"
        "[missing](gone.md) and [anchored](there.md#section) and [self](#top)\n"
        "`[in code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n"
        "[ref]: also-gone.md\n"
    )
    problems = broken_links(str(page))
    assert len(problems) == 4, problems
    assert ["gone.md" in problems[0], "there.md#section" in problems[1], "#top" in problems[2],
            "also-gone.md" in problems[3]] == [True] * 4
    assert all(":2:" in problem for problem in problems[:3]) and ":7:" in problems[3]
