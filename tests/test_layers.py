"""The package's layers (elmojax/__init__.py's docstring) as its imports have them: each module
imports only its own folder and the layers below it, and no function grows past 60 lines."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# folder -> layer; modules at the package's top (the command lines, the public API) are above all.
LAYERS = {"formats": 0, "process": 0, "model": 1, "data": 1, "train": 2, "infer": 2}
TOP = len(set(LAYERS.values()))
MAX_FUNCTION_LINES = 60


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else ""


def _layer(folder: str) -> int:
    return LAYERS.get(folder, TOP)


def _modules():
    for path in sorted(glob.glob(os.path.join(ROOT, "elmojax", "**", "*.py"), recursive=True)):
        relative = os.path.relpath(path, ROOT)[: -len(".py")]
        yield relative, relative.replace(os.sep, ".").removesuffix(".__init__"), ast.parse(open(path).read())


def _imported(module: str, tree: ast.Module):
    package = module if module.count(".") == 0 or module.endswith(tuple(LAYERS)) else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("elmojax"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base == "elmojax":
                yield from ((node.lineno, f"elmojax.{a.name}") for a in node.names)
            elif base.startswith("elmojax"):
                yield node.lineno, base


def import_violations() -> list[str]:
    found = []
    for path, module, tree in _modules():
        folder = _folder(module) if module != "elmojax" else ""
        for line, target in _imported(module, tree):
            other = _folder(target)
            if target in ("elmojax", "elmojax.__init__"):
                other = ""
            wrong = (_layer(other) > _layer(folder)
                     or (_layer(other) == _layer(folder) and other != folder and folder))
            if wrong:
                found.append(f"{path}.py:{line}: {folder or 'top'} imports {target} ({other or 'top'})")
    return found


def _code_lines(source_lines: list[str], node) -> int:
    skip = set()
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        skip = set(range(first.lineno, first.end_lineno + 1))
    return sum(1 for n in range(node.lineno, node.end_lineno + 1)
               if n not in skip and source_lines[n - 1].strip() and not source_lines[n - 1].strip().startswith("#"))


def long_functions() -> list[str]:
    found = []
    for path, _, tree in _modules():
        source_lines = open(os.path.join(ROOT, path + ".py")).read().split("\n")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(source_lines, node)
                if n > MAX_FUNCTION_LINES:
                    found.append(f"{path}.py:{node.lineno}: {node.name} has {n} lines of code")
    return found


def test_imports_point_down_the_layers():
    assert import_violations() == []


def test_the_checker_sees_an_import_against_the_layers(tmp_path, monkeypatch):
    tree = ast.parse("from elmojax.infer import mix\nfrom elmojax.formats import files\n")
    assert [t for _, t in _imported("elmojax.train.loop", tree)] == ["elmojax.infer", "elmojax.formats"]
    assert _layer(_folder("elmojax.infer.mix")) == _layer(_folder("elmojax.train.loop"))
    assert _folder("elmojax.infer.mix") != _folder("elmojax.train.loop")
    assert _layer(_folder("elmojax.main")) > _layer(_folder("elmojax.train.loop"))


def test_no_function_is_longer_than_60_lines_of_code():
    assert long_functions() == []
