"""docs/DESIGN.md matches the tree: its module map names every module and only modules that exist,
and every "DESIGN x.y" a docstring or doc cites is a section of it."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(ROOT, "docs", "DESIGN.md")
PATH = re.compile(r"\b(?:maskco|pipelines|scripts)/[\w/]*\w\.(?:py|sh)\b")
CITED = re.compile(r"DESIGN(?:\.md)? (\d+(?:\.\d+)?)")


def design() -> str:
    with open(DESIGN, encoding="utf-8") as handle:
        return handle.read()


def modules() -> set[str]:
    found = set()
    for package in ("maskco", "pipelines"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            found |= {os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/")
                      for name in files if name.endswith(".py")}
    return found


def test_every_module_is_named_in_the_design():
    named = set(PATH.findall(design()))
    assert sorted(modules() - named) == []


def test_every_path_the_design_names_exists():
    missing = [path for path in set(PATH.findall(design())) if not os.path.exists(os.path.join(ROOT, path))]
    assert missing == []


def test_every_cited_design_section_exists():
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", design(), flags=re.M))
    cited = {}
    for folder in ("maskco", "pipelines", "tests", "docs", "scripts"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".py", ".md", ".yaml", ".sh")) and name != "DESIGN.md":
                    with open(os.path.join(base, name), encoding="utf-8") as handle:
                        for number in CITED.findall(handle.read()):
                            cited.setdefault(number, name)
    assert {"2.1", "4.4", "4.8"} <= set(cited)  # the scan finds the citations at all
    assert {number: where for number, where in cited.items() if number not in sections} == {}
