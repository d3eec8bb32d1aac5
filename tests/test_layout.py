"""How the top-level files fit together: imports flow one way, so that each file can be read (and copied) with only
the files below it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(ROOT.glob("*.py"))
MODULES = {f.stem for f in FILES}


def project_imports(node) -> set[str]:
    """The top-level project modules an import statement names."""
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names} & MODULES
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return {node.module.split(".")[0]} & MODULES
    return set()


def module_level_imports() -> dict[str, set[str]]:
    """file -> the project modules it imports outside any function."""
    graph = {}
    for f in FILES:
        tree = ast.parse(f.read_text())
        functions = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                     for n in ast.walk(fn) if n is not fn}
        graph[f.stem] = set().union(*(project_imports(n) for n in ast.walk(tree) if id(n) not in functions))
    return graph


def test_no_import_cycle_among_top_level_files():
    graph, done, path = module_level_imports(), set(), []

    def visit(module):
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if module not in done:
            path.append(module)
            for dependency in sorted(graph[module]):
                visit(dependency)
            path.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)
    ground = {"model", "tokenizer", "cli"}
    assert not any(graph[m] for m in ground)
    assert graph["quantize"] <= ground and graph["anyprec"] <= ground and graph["tp"] <= ground


def test_project_imports_inside_functions_only_in_entry_points():
    """An import inside a function hides a dependency: only a command line's main() may reach up the layers."""
    for f in FILES:
        for fn in ast.walk(ast.parse(f.read_text())):
            if isinstance(fn, ast.FunctionDef) and fn.name != "main":
                hidden = set().union(*(project_imports(n) for n in ast.walk(fn)))
                assert not hidden, f"{f.name}: {fn.name}() imports {sorted(hidden)}"


def test_each_docstring_names_the_files_it_needs():
    for module, needs in module_level_imports().items():
        doc = ast.get_docstring(ast.parse((ROOT / f"{module}.py").read_text()))
        missing = [m for m in sorted(needs) if f"{m}.py" not in doc]
        assert not missing, f"{module}.py's docstring does not say it needs {missing}"
