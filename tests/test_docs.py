"""The Markdown documentation holds together: every relative link resolves and every anchor names a
heading, and the README stays a short front page.

Checked files: README.md, CONTRIBUTING.md, NOTES.md and benchmarks/NOTES.md (when present),
docs/**/*.md, rlad_kernels/**/README.md, benchmarks/README.md and studies/**/*.md. A link is an
inline link or image (``[text](target)``, ``![alt](target)``), a reference definition
(``[label]: target``) or an HTML ``href`` / ``src``, outside fenced code blocks and code spans.
External links (``http(s)://``, ``mailto:``, any ``scheme:``) are not checked. A relative target
must be an existing file or folder (relative to the linking file; a leading ``/`` is the
repository root). An anchor, in-page (``#x``) or into another Markdown file (``file.md#x``),
must be the slug of a heading of that file, as GitHub makes them: the heading's text, lowercased,
punctuation other than ``-`` and ``_`` removed, spaces turned to ``-``; a repeated slug gets
``-1``, ``-2`` ... in order. Anchors into other kinds of files (``file.py#L10``) are not checked.

Standard library and pytest only.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 12_000  # `wc -c README.md`; bytes >= characters, so this bounds the characters too
QUICK_START = ("python3 dev.py demo", "python3 dev.py test")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target): the text may hold one level of brackets
INLINE = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]"
                    r"\(\s*(<[^>]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_LINK = re.compile(r"""<(?:a|img|source)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
HTML_ID = re.compile(r"""<[a-z]+\b[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files(root: Path = ROOT) -> list[Path]:
    """The Markdown files whose links are checked, sorted, without duplicates."""
    found = set()
    for name in ("README.md", "CONTRIBUTING.md", "NOTES.md", "benchmarks/README.md", "benchmarks/NOTES.md"):
        if (root / name).is_file():
            found.add(root / name)
    for pattern in ("docs/**/*.md", "rlad_kernels/**/README.md", "studies/**/*.md"):
        found.update(p for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def outside_fences(text: str):
    """(line number, line) of every line outside fenced code blocks (the fence lines excluded)."""
    fence = None
    for no, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
            else:
                yield no, line
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip().strip(fence[0]):
            fence = None


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks, code spans blanked out."""
    out = []
    for no, line in outside_fences(text):
        out.append((no, CODE_SPAN.sub(lambda s: s.group(1) + "x" * len(s.group(2)) + s.group(1), line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (before de-duplication)."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def headings(text: str) -> list[str]:
    """The text of every ATX and setext heading, in order, outside fenced code."""
    found, prev, last = [], "", 0
    for no, line in outside_fences(text):
        if no != last + 1:  # a fenced block ends any paragraph
            prev = ""
        last = no
        atx = ATX.match(line)
        if atx:
            found.append(atx.group(2) or "")
            prev = ""
            continue
        if SETEXT.match(line) and prev.strip() and not re.match(r"^ {0,3}([-*+>|]|\d+[.)])", prev):
            found.append(prev.strip())
            prev = ""
            continue
        prev = line
    return found


def anchors(text: str) -> set[str]:
    """Every anchor a page offers: its headings' slugs, de-duplicated as GitHub does, and HTML ids."""
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        base = slug(h)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    for _, line in prose_lines(text):
        out.update(m.group(1) for m in HTML_ID.finditer(line))
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link in the prose."""
    out = []
    for no, line in prose_lines(text):
        for m in INLINE.finditer(line):
            out.append((no, m.group(2)))
        m = REFDEF.match(line)
        if m:
            out.append((no, m.group(1)))
        out.extend((no, m.group(1)) for m in HTML_LINK.finditer(line))
    return [(no, t[1:-1] if t.startswith("<") and t.endswith(">") else t) for no, t in out]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One message per link of ``path`` that does not resolve (file, or anchor in a Markdown file)."""
    root, path = root.resolve(), path.resolve()
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(root)
    bad = []
    for no, target in links(text):
        if SCHEME.match(target):
            continue  # http(s), mailto, ...: not checked
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        if file_part:
            dest = (root / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
            dest = dest.resolve()
            if not dest.exists():
                bad.append(f"{rel}:{no}: {target}: no file {file_part}")
                continue
        else:
            dest = path
        if anchor and dest.is_file() and dest.suffix.lower() == ".md":
            if unquote(anchor).lower() not in anchors(dest.read_text(encoding="utf-8")):
                where = "this page" if dest == path else str(dest.relative_to(root))
                bad.append(f"{rel}:{no}: {target}: no heading #{anchor} in {where}")
    return bad


FILES = doc_files()


def test_the_checked_files_include_the_front_pages():
    names = {str(p.relative_to(ROOT)) for p in FILES}
    assert {"README.md", "CONTRIBUTING.md", "docs/README.md", "benchmarks/README.md"} <= names, names


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_every_relative_link_resolves(path):
    bad = broken_links(path)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_readme_is_a_short_front_page():
    data = (ROOT / "README.md").read_bytes()
    assert len(data) < README_MAX_BYTES, (
        f"README.md has {len(data)} bytes, over {README_MAX_BYTES}: move the detail into docs/ and link it")
    text = data.decode("utf-8")
    for command in QUICK_START:
        assert command in text, f"README.md lost its quick-start command {command!r}"


def test_slugs_follow_github():
    assert slug("Several processes, GPUs or machines: `torchrun`") == "several-processes-gpus-or-machines-torchrun"
    assert slug("RLAD in TRL: `RLADTrainer`") == "rlad-in-trl-rladtrainer"
    assert slug("GPU: one NVIDIA H200, measured 2026-12-04") == "gpu-one-nvidia-h200-measured-2026-12-04"
    assert slug("What rlad will never do to your files") == "what-rlad-will-never-do-to-your-files"
    assert slug("The [miniature](x.md) study_2") == "the-miniature-study_2"
    assert anchors("# A\n## A\n### A!\n") == {"a", "a-1", "a-2"}


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(
        "# Guide\n\n## Setup\n\n## Setup\n\n```bash\n# not a heading\n```\n\nOther page\n---\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n"
        "[ok](docs/guide.md) [ok](docs/guide.md#setup-1) [ok](docs/guide.md#other-page) [ok](#top) [ok](docs/)\n"
        "[`code` in text](docs/guide.md#guide) ![img](https://example.com/x.png) [web](http://example.com/#nowhere)\n"
        "`[in a code span](missing.md)`\n\n"
        "```\n[in a fence](missing.md)\n```\n\n"
        "[gone](docs/missing.md)\n"
        "[no anchor](docs/guide.md#setup-2)\n"
        "[not a heading](docs/guide.md#not-a-heading)\n"
        "[no such section](#bottom)\n"
        "[ref]: ../outside.md\n",
        encoding="utf-8")
    bad = broken_links(page, tmp_path)
    assert [m.split(": ", 1)[0] for m in bad] == ["README.md:11", "README.md:12", "README.md:13", "README.md:14",
                                                   "README.md:15"], bad
    assert "no file docs/missing.md" in bad[0]
    assert "no heading #setup-2 in docs/guide.md" in bad[1]
    assert "no heading #bottom in this page" in bad[3]
