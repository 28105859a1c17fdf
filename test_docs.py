"""The pages: README.md at most 250 lines, every link between the pages resolving (file and heading), every figure in
figures/ shown on some page, and CI running the README's test command. No models: a second or less."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEST_COMMAND = "pip install -r requirements-dev.txt && python -m pytest -q"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation (backticks, apostrophes, dots) dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def markdown(path: Path) -> str:
    if path.suffix == ".ipynb":  # the notebook's prose: its markdown cells
        return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown")
    return path.read_text()


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_links_between_the_pages_resolve():
    anchors = {page: {slug(h) for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)} for page in PAGES}
    broken = []
    for page in [*PAGES, ROOT / "tutorial.ipynb"]:
        for url in re.findall(r"\]\(([^)\s]+)\)", markdown(page)):
            if re.match(r"[a-z]+:", url):  # http(s): outside the repository
                continue
            path, _, anchor = url.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists() or anchor and target.suffix == ".md" and anchor not in anchors[target]:
                broken.append(f"{page.name}: {url}")
    assert broken == []


def test_every_figure_is_shown_on_a_page():
    shown = {name for page in PAGES for name in re.findall(r"figures/([\w.-]+\.png)", page.read_text())}
    assert sorted(p.name for p in (ROOT / "figures").glob("*.png") if p.name not in shown) == []


def test_ci_runs_the_readmes_test_command():
    assert TEST_COMMAND in (ROOT / "README.md").read_text()
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == TEST_COMMAND
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()
