"""README.md and docs/: every relative link resolves, the README stays a front door, CI finds its blocks."""
import re
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
README = PROJECT_ROOT / "README.md"
README_MAX_LINES = 250
DOC_FILES = [README] + sorted((PROJECT_ROOT / "docs").rglob("*.md"))

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def prose_lines(path):
    """(line number, text) of the lines outside fenced code blocks."""
    inside = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield number, line


def github_slug(heading_text):
    """GitHub's anchor for a heading: the rendered text, lower case, without punctuation or symbols
    (letters, digits, '_', '-' and spaces stay), spaces turned into '-'."""
    text = re.sub(r"`([^`]*)`", r"\1", heading_text)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text).replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen, result = {}, set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(path):
    """(line number, target) of every non-external link of a Markdown file, code excluded."""
    for number, line in prose_lines(path):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            targets = [definition.group(1)]
        else:
            targets = INLINE_LINK.findall(INLINE_CODE.sub("", line))
        for target in targets:
            if not EXTERNAL.match(target):
                yield number, target


def broken_links(path, root=PROJECT_ROOT):
    problems = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not resolved.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif root not in resolved.parents and resolved != root:
            problems.append(f"{where}: points outside the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.name}")
    return problems


def fenced_block_after(marker, path=README):
    """Body of the fenced block that follows the marker line (what .ci/run executes), or None."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if marker not in lines:
        return None
    rest = iter(lines[lines.index(marker) + 1:])
    opening = next((line for line in rest if line.strip()), "")
    if not opening.startswith("```"):
        return None
    body = []
    for line in rest:
        if line.startswith("```"):
            return "\n".join(body)
        body.append(line)
    return None


@pytest.mark.parametrize("heading, slug", [
    ("Training beyond one process (DDP)", "training-beyond-one-process-ddp"),
    ("FMRLRec — train once, deploy every size", "fmrlrec--train-once-deploy-every-size"),
    ('Amazon Reviews 2018 / 2014 (Office = Amazon 2018 "Office_Products")',
     "amazon-reviews-2018--2014-office--amazon-2018-office_products"),
    ("The LLM layer (`recbole_mm/model/layers/llm.py`)", "the-llm-layer-recbole_mmmodellayersllmpy"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_link_checker_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "target.md").write_text("# Title\n\n## A section\n\n```\n## not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](target.md) [ok](target.md#a-section) [ok](#local) [web](https://example.org/x)\n"
        "`[not a link](missing.md)`\n\n## Local\n"
        "[gone](missing.md) [bad anchor](target.md#not-a-heading) [bad local](#nowhere)\n"
    )
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 3, problems
    assert "missing.md does not exist" in problems[0]
    assert "#not-a-heading" in problems[1] and "#nowhere" in problems[2]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda path: str(path.relative_to(PROJECT_ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_docs_exist_for_every_model_and_topic():
    names = {path.relative_to(PROJECT_ROOT).as_posix() for path in DOC_FILES}
    expected = {f"docs/models/{model}.md" for model in ("MMSASRec", "FMRLRec", "MMM4Rec", "MMESID", "Speeder")}
    expected |= {f"docs/{topic}.md" for topic in ("datasets", "experiments", "benchmarks", "architecture", "development")}
    assert expected <= names


def test_readme_is_a_front_door():
    length = len(README.read_text(encoding="utf-8").splitlines())
    assert length <= README_MAX_LINES, f"README.md has {length} lines; move reference material into docs/"


def test_readme_holds_the_blocks_ci_runs():
    install = fenced_block_after("<!-- ci:install -->")
    test = fenced_block_after("<!-- ci:test -->")
    assert install and "pip install" in install, "README.md: <!-- ci:install --> must precede a fenced install block"
    assert test and "pytest" in test, "README.md: <!-- ci:test --> must precede a fenced test block"


def test_user_docs_name_no_development_paths():
    """The docs talk about the user's setup: no development folders or notes that users do not have."""
    forbidden = re.compile(r"\.\./shared|/work/|shared/(?:design|seeds|datasets)|project's machines|notes/readme")
    hits = [f"{path.relative_to(PROJECT_ROOT)}:{number}: {line.strip()}"
            for path in DOC_FILES
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if forbidden.search(line)]
    assert hits == []
