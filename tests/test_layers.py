"""The layers of docs/architecture.md hold: no module imports across a line the table forbids.

The table is read from the document itself (between `<!-- layers` and `<!-- /layers -->`), so
the document and this test cannot disagree; the imports are read with ast, nothing is run. No
mount, no root: milliseconds.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cowfs"
DOC = ROOT / "docs" / "architecture.md"
RULED_THIRD_PARTY = ("pyfuse3", "trio")


def _rows(text: str) -> list[list[str]]:
    """The body rows of every markdown table in *text*, as lists of cells."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-| ]+\|$", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _names(cell: str) -> list[str]:
    return re.findall(r"`([\w.]+)`", cell)


def read_rules(doc: str = None):
    """(layer of each module, what each layer may import, {(importer, imported): why})."""
    doc = DOC.read_text() if doc is None else doc
    block = doc.split("<!-- layers", 1)[1].split("<!-- /layers -->", 1)[0]
    layer_of, may = {}, {}
    exceptions = {}
    for row in _rows(block):
        if row[0] in ("layer", "importer"):
            continue        # a table's header
        if len(row) == 3 and not row[0].startswith("`"):
            layer, modules, allowed = row
            may[layer] = {w.strip() for w in allowed.split(",")}
            for m in _names(modules):
                layer_of[m] = layer
        elif len(row) == 3:
            importers, imported, why = row
            for a in _names(importers):
                for b in _names(imported):
                    exceptions[(a, b)] = why
    return layer_of, may, exceptions


def _module_imports(path: Path):
    return _imports_in(path.read_text(), str(path))


def _imports_in(source: str, filename: str = "<probe>"):
    """[(imported, at_module_level)] of the source of a cowfs module: cowfs modules by their
    short name, pyfuse3 and trio by theirs; anything else is left out."""
    tree = ast.parse(source, filename)
    found = []

    def note(name: str, top: bool) -> None:
        head = name.split(".")[0]
        if head == "cowfs":
            rest = name.split(".")[1:]
            found.append((rest[0] if rest else "__init__", top))
        elif head in RULED_THIRD_PARTY:
            found.append((head, top))

    def visit(node, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    note(alias.name, top)
            elif isinstance(child, ast.ImportFrom):
                if child.level:         # relative: within cowfs
                    if child.module:
                        found.append((child.module.split(".")[0], top))
                    else:
                        for alias in child.names:
                            is_module = (PACKAGE / f"{alias.name}.py").exists()
                            found.append((alias.name if is_module else "__init__", top))
                else:
                    note(child.module or "", top)
            visit(child, inner)

    visit(tree, True)
    return found


def all_imports():
    return {p.stem: _module_imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def violations(imports, layer_of, may, exceptions):
    out = []
    for module, found in imports.items():
        layer = layer_of.get(module)
        if layer is None:
            out.append(f"{module}.py is in no layer of docs/architecture.md")
            continue
        for imported, top in found:
            if imported == module:
                continue
            target = imported if imported in RULED_THIRD_PARTY else layer_of.get(imported)
            if target is None:
                continue        # reported as a module in no layer
            allowed = target in may[layer]
            if not allowed and not top and (module, imported) in exceptions:
                continue
            if not allowed:
                where = "at module level" if top else "in a function (not a listed exception)"
                out.append(f"{module} ({layer}) imports {imported} ({target}) {where}")
    return out


def client_reach(imports, layer_of):
    """For each client module, the ruled modules its module-level imports bring in, transitively."""
    out = []
    forbidden = {"daemon", "fs", *RULED_THIRD_PARTY}
    for start in (m for m, layer in layer_of.items() if layer == "client" and m in imports):
        seen, todo, via = set(), [start], {start: None}
        while todo:
            m = todo.pop()
            for imported, top in imports.get(m, ()):
                if top and imported not in seen:
                    seen.add(imported)
                    via[imported] = m
                    todo.append(imported)
        for bad in sorted(seen & forbidden):
            chain, m = [bad], via[bad]
            while m is not None:
                chain.append(m)
                m = via[m]
            out.append(f"importing {start} imports {bad}: {' <- '.join(chain)}")
    return out


def test_every_import_respects_the_layers_of_the_architecture_document():
    layer_of, may, exceptions = read_rules()
    assert violations(all_imports(), layer_of, may, exceptions) == []


def test_importing_a_client_module_never_brings_in_the_daemon_pyfuse3_or_trio():
    layer_of, _, _ = read_rules()
    assert client_reach(all_imports(), layer_of) == []


def test_every_listed_exception_is_still_needed():
    """An exception the code no longer makes is taken out of the document."""
    layer_of, may, exceptions = read_rules()
    imports = all_imports()
    made = {(m, i) for m, found in imports.items() for i, top in found if not top}
    assert sorted(set(exceptions) - made) == []


@pytest.mark.parametrize("module, line, top", [
    ("store", "from .capture import Capture", True),
    ("catalogue", "from . import fs", True),
    ("libc", "import trio", True),
    ("api", "from .daemon import MountOptions", True),
    ("noise", "import pyfuse3", True),
    ("cli", "from . import fs", False),
    ("control", "from .api import Workspace", True),
])
def test_a_forbidden_import_is_caught(module, line, top):
    """The checks above would fail if someone added one of these imports."""
    layer_of, may, exceptions = read_rules()
    imports = all_imports()
    source = line if top else f"def _f():\n    {line}\n"
    imports[module] = imports[module] + _imports_in(source)
    assert violations(imports, layer_of, may, exceptions) or client_reach(imports, layer_of)


def test_an_import_reaching_trio_through_another_module_is_caught():
    """api importing retention at module level is allowed by no row, and would bring trio in."""
    layer_of, may, exceptions = read_rules()
    imports = all_imports()
    imports["agent"] = imports["agent"] + [("api", True)]      # allowed: client to client
    imports["api"] = imports["api"] + [("retention", True)]
    assert any("trio" in v for v in client_reach(imports, layer_of))



def test_the_figure_draws_every_module_in_its_layer():
    """The figure under the tables is a picture of them: each module appears in its layer's band
    (the lines from the layer's name to the next layer's)."""
    layer_of, may, _ = read_rules()
    doc = DOC.read_text()
    figure = doc.split("<!-- /layers -->", 1)[1].split("```\n", 2)[1]
    bands, layer = {}, None
    for line in figure.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in may:
            layer = first
        if layer is not None:
            bands.setdefault(layer, set()).update(re.findall(r"\w+", line))
    missing = [f"{m} ({layer})" for m, layer in layer_of.items()
               if not m.startswith("__") and m not in bands.get(layer, ())]
    assert missing == []
