"""README.md and docs/ stay short and their relative links lead somewhere."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
# Pages that other branches add (mergekit compatibility, runtimes, development, testing, adding a layout).
WRITTEN_ELSEWHERE: set = set()


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target, _ in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (page.parent / target).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            if not path.exists() and rel not in WRITTEN_ELSEWHERE:
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_docs_state_facts_not_history():
    """No narration of how a number was made, and no absolute paths of the machine that made it."""
    pattern = re.compile(r"an earlier|this session|today's code|seed document|(^|[\s`(])/(work|home|tmp)/", re.I | re.M)
    found = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in PAGES
             for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert not found, found
