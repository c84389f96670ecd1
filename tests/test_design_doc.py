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


def rooms() -> tuple[dict, dict]:
    """DESIGN 7.1's table -> ({path prefix: room}, {room: rooms it may import})."""
    section = design().split("### 7.1 ", 1)[1].split("\n## ", 1)[0]
    where, allowed = {}, {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("room", "---") or not line.startswith("|"):
            continue
        room, paths, may = cells
        allowed[room] = {"every room"} if may == "every room" else set() if may.startswith("nothing") else \
            {name.strip() for name in may.split(",")}
        for path in re.findall(r"`((?:maskco|pipelines)/[\w/.]*)`", paths):
            where[path] = room
    return where, allowed


def room_of(path: str, where: dict) -> str:
    matches = [prefix for prefix in where if path == prefix or (prefix.endswith("/") and path.startswith(prefix))]
    return where[max(matches, key=len)] if matches else "tools"


def project_imports(path: str) -> set[str]:
    """Modules of the project ``path`` imports (absolute imports, at any depth of the file), as file paths."""
    import ast

    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    def file_of(name: str) -> str | None:
        base = name.replace(".", "/")
        return next((candidate for candidate in (base + ".py", base + "/__init__.py")
                     if os.path.exists(os.path.join(ROOT, candidate))), None)

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:  # `from maskco import vocab` imports maskco/vocab.py, not the package
                found.add(file_of(f"{node.module}.{alias.name}") or file_of(node.module))
        elif isinstance(node, ast.Import):
            found |= {file_of(alias.name) for alias in node.names}
    return {name for name in found if name and name.split("/")[0] in ("maskco", "pipelines")} - {path}


def test_every_import_follows_the_rooms_of_the_design():
    where, allowed = rooms()
    assert {"vocabulary", "data", "configuration", "method", "assembly", "tools"} <= set(allowed)
    wrong = []
    for path in sorted(modules()):
        room = room_of(path, where)
        for target in sorted(project_imports(path)):
            other = room_of(target, where)
            if other != room and "every room" not in allowed[room] and other not in allowed[room]:
                wrong.append(f"{path} ({room}) imports {target} ({other})")
    assert wrong == []
