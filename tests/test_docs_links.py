"""The README's and the docs' relative links: every file they point to exists, and every anchor names a heading
of its page (GitHub's heading anchors)."""

import re
from pathlib import Path

from conftest import slug

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # no headings inside code blocks
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor")
    return broken


def test_the_slug_is_githubs():
    assert slug("The `--quality` preset") == "the---quality-preset"
    assert slug("A flow-matching teacher: the main job on `builtin-flow`") == (
        "a-flow-matching-teacher-the-main-job-on-builtin-flow")
    assert slug("LCM-LoRA's learning curve") == "lcm-loras-learning-curve"


def test_every_relative_link_in_the_docs_reaches_its_file_and_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n## Real heading\n\n```bash\n# not a heading\n```\n[a](#real-heading) [b](#not-a-heading) "
                    "[c](missing.md) [d](https://example.org)\n")
    assert broken_links(page) == ["#not-a-heading: no heading with that anchor", "missing.md: no such file"]
    assert len(PAGES) > 5
    found = {str(p.relative_to(ROOT)): broken_links(p) for p in PAGES}
    assert {p: b for p, b in found.items() if b} == {}
