"""The house rules of the repository, checked on its own source: one room per idea.

- every library module (a ``.py`` file at the repository root) has a row in the README's architecture
  table, and imports only modules in rows above its own, so the import graph has no circle;
- no library module is over ``MODULE_LINES`` lines and no function over ``FUNCTION_LINES`` lines, its
  docstring included (a room that outgrew one idea);
- every module opens with a docstring saying what it owns.

The imports are read from the source (``ast``), at module level and inside functions alike, so a late
import cannot hide a circle.
"""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_LINES = 800
FUNCTION_LINES = 70
NOT_LIBRARY = {"conftest.py"}


def library_modules():
    return sorted(name[:-3] for name in os.listdir(ROOT)
                  if name.endswith(".py") and name not in NOT_LIBRARY)


def parsed(module):
    with open(os.path.join(ROOT, module + ".py"), encoding="utf-8") as file:
        text = file.read()
    return text, ast.parse(text)


def imported_library_modules(module):
    """The library modules that ``module`` imports anywhere in its source."""
    modules = set(library_modules())
    found = set()
    for node in ast.walk(parsed(module)[1]):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant):
            found.add(str(node.args[0].value).split(".")[0])
    return (found & modules) - {module}


def architecture_order():
    """The modules in the order of the README's architecture table (a row may name several)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        text = file.read()
    section = text[text.index("## Architecture"):]
    section = section[:section.index("\n## ", 1)]
    order = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            order.append([name for name in re.findall(r"`([a-z_]+)\.py`", first_cell)])
    return order


def test_every_module_has_a_row_in_the_architecture_table_and_imports_only_rows_above_it():
    order = architecture_order()
    row_of = {module: row for row, modules in enumerate(order) for module in modules}
    missing = [module for module in library_modules() if module not in row_of]
    assert not missing, f"modules without a row in the README's architecture table: {missing}"
    upward = [(module, imported) for module in library_modules() for imported in imported_library_modules(module)
              if row_of[imported] >= row_of[module]]
    assert not upward, f"imports of a module in the same row or a row below (a circle, or one in the making): {upward}"


def test_the_import_graph_has_no_circle():
    graph = {module: imported_library_modules(module) for module in library_modules()}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import circle: {' -> '.join(path + [module])}"
        state[module] = "open"
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        state[module] = "done"

    for module in library_modules():
        visit(module, [])


@pytest.mark.parametrize("module", library_modules())
def test_rooms_hold_one_idea(module):
    text, tree = parsed(module)
    assert text.count("\n") <= MODULE_LINES, f"{module}.py has {text.count(chr(10))} lines"
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > FUNCTION_LINES]
    assert not long, f"functions of {module}.py over {FUNCTION_LINES} lines: {long}"
    assert ast.get_docstring(tree), f"{module}.py opens with no docstring saying what it owns"
