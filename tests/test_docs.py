"""The README and docs cannot rot: every code block marked runnable runs, the configuration reference matches the
config dataclasses, the README stays a guide (≤ 12,000 characters) and its links point at files that exist.

Convention: a fenced block whose info string is ``python run`` or ``bash run`` is executed by this test (python
blocks in this process, each in a fresh namespace; bash blocks by bash with ``diffrl`` meaning this checkout's
CLI), from a temporary folder. Keep them to seconds; mark nothing runnable that needs weights or a GPU.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(python|bash) run\n(.*?)^```", re.MULTILINE | re.DOTALL)


def runnable_blocks():
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            yield pytest.param(match.group(1), match.group(2), id=f"{page.relative_to(REPO)}:{line}")


BLOCKS = list(runnable_blocks())


def test_there_are_runnable_blocks_in_the_readme_and_the_docs():
    ids = [block.id for block in BLOCKS]
    assert any(i.startswith("README.md") for i in ids) and any(i.startswith("docs/rewards.md") for i in ids)


@pytest.mark.parametrize("language, code", BLOCKS)
def test_a_runnable_block_runs(language, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if language == "python":
        exec(compile(code, "<docs block>", "exec"), {"__name__": "__docs__"})
        return
    script = f'diffrl() {{ "{sys.executable}" -m diffrl.cli "$@"; }}\nset -euo pipefail\n{code}'
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_configuration_reference_is_current():
    spec = importlib.util.spec_from_file_location("make_config", REPO / "docs" / "make_config.py")
    make_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_config)
    assert (REPO / "docs" / "config.md").read_text() == make_config.render(), \
        "docs/config.md is out of date: run python docs/make_config.py"


def test_the_readme_is_a_guide_of_at_most_12000_characters():
    assert len((REPO / "README.md").read_text()) <= 12_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files_and_headings_that_exist(page):
    for target in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
        path, anchor = target
        if path.startswith(("http://", "https://")):
            continue
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to missing {path}"
        if anchor and linked.suffix == ".md":
            headings = [re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.*)$", linked.read_text(), re.MULTILINE)]
            assert anchor in headings, f"{page.name}: no heading #{anchor} in {linked.name}"
