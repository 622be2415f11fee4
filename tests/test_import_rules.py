"""docs/architecture.md's import rules that `lint-imports` cannot see:
a function-local import is only for an optional or heavy dependency (or the
command line's lazy loading of the stack), and says so in a comment."""

import ast
import pathlib
import pkgutil

import keras_brainformer

PACKAGE = pathlib.Path(keras_brainformer.__file__).parent
# Where importing our own modules inside a function is the design: the
# command line defines and runs only the chosen command, so `--help` and
# `presets` load no backend.
LAZY_COMMAND_LINE = ("cli/", "search/command.py")


def function_local_imports(path):
    """`(line, module, lines)` of each import inside a function (`lines`:
    the file's lines)."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = list(ast.walk(node))
        for sub in body:
            if isinstance(sub, ast.Import):
                module = sub.names[0].name
            elif isinstance(sub, ast.ImportFrom):
                module = sub.module or ""
            else:
                continue
            found.append((sub.lineno, module, lines))
    return found


def says_why(lines, lineno):
    """Whether the import at `lineno` (1-based) carries a comment, or the
    run of imports it belongs to is preceded by one."""
    if "#" in lines[lineno - 1]:
        return True
    i = lineno - 2
    while i >= 0:
        text = lines[i].strip()
        if not text or text.startswith(("import ", "from ", ")")) or text.endswith(","):
            i -= 1
            continue
        return text.startswith("#") or "#" in lines[i]
    return False


def test_function_local_imports_are_heavy_or_optional_and_say_so():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("presets/"):
            continue
        explained = set()
        for lineno, module, lines in function_local_imports(path):
            where = f"{relative}:{lineno} ({module})"
            package = module.split(".")[0]
            if module.startswith("keras_brainformer") and not relative.startswith(
                LAZY_COMMAND_LINE
            ):
                offenders.append(f"{where}: our own module imported inside a function")
            elif says_why(lines, lineno):
                explained.add(package)
            elif package not in explained:  # `matplotlib.pyplot` after `matplotlib`
                offenders.append(f"{where}: no comment saying why it is local")
    assert not offenders, "\n".join(offenders)


def test_the_rule_catches_an_unexplained_local_import(tmp_path):
    """The checker itself fails on the cases it exists for."""
    path = tmp_path / "module.py"
    path.write_text(
        "def f():\n"
        "    import json\n"
        "    return json\n"
        "\n"
        "def g():\n"
        "    # heavy: only when plotting\n"
        "    import matplotlib\n"
        "    from matplotlib import pyplot\n"
        "    return matplotlib, pyplot\n"
    )
    imports = function_local_imports(path)
    assert [(line, module) for line, module, _ in imports] == [
        (2, "json"), (7, "matplotlib"), (8, "matplotlib")
    ]
    assert [says_why(lines, line) for line, _, lines in imports] == [False, True, True]


def _package_modules():
    return sorted(
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and "presets" not in path.relative_to(PACKAGE).parts
    )


def test_architecture_doc_lists_every_module():
    """docs/architecture.md's "Every module" tables name each module of the
    package, so a newcomer finds every file there (a new module fails here
    until it has its row)."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = doc.split("## Every module", 1)[1].split("\n## ", 1)[0]
    modules = _package_modules()
    assert len(modules) > 50
    assert [m for m in modules if f"| `{m}` |" not in section] == []
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert sorted(listed - set(modules)) == []  # no row for a module that is gone


def test_every_subpackage_loads_as_an_attribute_of_the_package():
    """`keras_brainformer.<subpackage>` loads lazily (the package's
    `__getattr__`): its list must name every subpackage there is."""
    subpackages = {m.name for m in pkgutil.iter_modules(keras_brainformer.__path__) if m.ispkg}
    assert set(keras_brainformer._SUBPACKAGES) == subpackages
    assert set(keras_brainformer._SUBPACKAGES) <= set(dir(keras_brainformer))
