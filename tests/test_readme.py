"""README.md opens with the two commands a newcomer runs: the first is the pipeline script, the second exactly what
`.ci/run` runs after its fresh install; and every docs page it links to exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The indented command lines of README.md, in order."""
    return [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("    bash ")]


def test_the_first_command_sets_up_and_runs_the_pipeline_script():
    first = readme_commands()[0]
    assert first == "bash scripts/setup.sh && bash scripts/tiny_pipeline.sh"
    assert (ROOT / "scripts" / "tiny_pipeline.sh").is_file() and (ROOT / "scripts" / "setup.sh").is_file()


def test_the_second_command_is_what_ci_runs():
    second = readme_commands()[1]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci[-1] == second == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"


def test_every_linked_page_exists():
    links = [
        (page, target)
        for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text())
    ]
    assert len({target for page, target in links if page.name == "README.md"}) >= 7  # the docs pages
    assert [f"{page.name} -> {target}" for page, target in links if not (page.parent / target).exists()] == []
