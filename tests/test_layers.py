"""The package's layers, read from its source: imports (at module level or inside functions, absolute
or relative) point down only, convert and runtime never import each other, no parts import each
other round a cycle; one GGUF reader and one GGUF writer; tests/ and benchmarks/ share `reference`
and never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bottom first. A part (a subpackage or top-level module of ggufkit) may import from the layers below
# its own and, without cycles, from its own layer.
LAYERS = (
    ("ggufkit", "errors", "progress", "gguffile", "kquants", "models"),  # "ggufkit": the package's __init__
    ("mixtures", "budget", "gptq"),
    ("convert", "runtime", "qat"),  # qat: training on the Hugging Face side
    ("commands",),
    ("cli", "__main__"),
)
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}
APART = {"convert", "runtime"}  # the Hugging Face side and the llama.cpp side meet only in commands
READER_HOME, WRITER_HOME = "gguffile.reader", "gguffile.writer"


def package_sources(root: Path = ROOT / "ggufkit") -> dict[str, tuple[str, bool]]:
    """{dotted module name: (source, is a package's __init__)} for every module under `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path.read_text(encoding="utf-8"), is_package)
    return out


def imported(name: str, tree: ast.AST, is_package: bool, known) -> list[tuple[str, int]]:
    """(module, line) of every import in `tree`, relative ones resolved; `from package import module`
    names the module itself, when `known` has it."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{module}" if module else base
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.append((sub if sub in known else module, node.lineno))
        elif isinstance(node, ast.Call) and _names_import_module(node.func) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            out.append((node.args[0].value, node.lineno))
    return out


def _names_import_module(func: ast.AST) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id == "import_module")


def part(module: str) -> str:
    """ggufkit.convert.pipeline -> convert; ggufkit -> ggufkit."""
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def layer_violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import that points up or across convert/runtime, every part outside LAYERS, and every
    cycle between parts."""
    problems, edges = [], {}
    for name, (source, is_package) in sources.items():
        src = part(name)
        if src not in LAYER:
            problems.append(f"{name}: part {src!r} is in no layer (add it to LAYERS)")
            continue
        for target, line in imported(name, ast.parse(source), is_package, sources):
            if target.split(".")[0] != "ggufkit" or part(target) == src:
                continue
            dst = part(target)
            where = f"{name}:{line} imports {target}"
            if dst not in LAYER:
                problems.append(f"{where}: part {dst!r} is in no layer")
            elif LAYER[dst] > LAYER[src]:
                problems.append(f"{where}: {dst} is above {src}")
            elif {src, dst} == APART:
                problems.append(f"{where}: convert and runtime never import each other")
            edges.setdefault(src, set()).add(dst)
    problems += [f"import cycle between parts: {' -> '.join(c)}" for c in cycles(edges)]
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) through each group of parts that import each other."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = path[path.index(node):] + [node]
            if not set(cycle) <= done:
                found.append(cycle)
                done.update(cycle)
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, path + [node])

    for start in sorted(edges):
        visit(start, [])
    return found


def single_format_violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Uses of gguf's reader anywhere (the package has its own), and GGUFWriters built outside the
    writer module (every GGUF goes through it; naming the class in a type is fine)."""
    problems = []
    for name, (source, _) in sources.items():
        for node in ast.walk(ast.parse(source)):
            if _named(node) == "GGUFReader" or (isinstance(node, ast.ImportFrom)
                                               and any(a.name == "GGUFReader" for a in node.names)):
                problems.append(f"{name}:{node.lineno} uses gguf.GGUFReader (read with {READER_HOME})")
            if isinstance(node, ast.Call) and _named(node.func) == "GGUFWriter" and not name.endswith(WRITER_HOME):
                problems.append(f"{name}:{node.lineno} builds a GGUFWriter (write with {WRITER_HOME})")
    return problems


def _named(node: ast.AST) -> str | None:
    """The name `node` refers to: x for x and for a.x."""
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None


def test_imports_point_down_only():
    assert layer_violations(package_sources()) == []


def test_one_gguf_reader_and_one_writer():
    assert single_format_violations(package_sources()) == []


def test_tests_and_benchmarks_share_only_reference():
    crossing = []
    for folder, others in (("tests", {"benchmarks"}), ("benchmarks", {"tests"}),
                           ("reference", {"tests", "benchmarks"})):
        for path in sorted((ROOT / folder).glob("*.py")):
            name = f"{folder}.{path.stem}"
            for target, line in imported(name, ast.parse(path.read_text(encoding="utf-8")), False, ()):
                if target.split(".")[0] in others:
                    crossing.append(f"{name}:{line} imports {target}")
    assert crossing == []


def test_the_checks_catch_violations():
    """Each rule on a small made-up package, so that a check that silently passes would show."""
    fake = {
        "ggufkit": ("", True),
        "ggufkit.errors": ("", False),
        "ggufkit.gguffile": ("", True),
        "ggufkit.gguffile.reader": ("from ggufkit.errors import GgufkitError\n", False),
        "ggufkit.kquants": ("", True),
        "ggufkit.kquants.api": ("def f():\n    from ..convert import pipeline\n", False),  # up, in a function
        "ggufkit.convert": ("", True),
        "ggufkit.convert.pipeline": ("import ggufkit.runtime.load\n", False),  # across
        "ggufkit.runtime": ("", True),
        "ggufkit.runtime.load": ("import gguf\nr = gguf.GGUFReader('x')\n", False),
        "ggufkit.models": ("from ggufkit import progress\n", False),
        "ggufkit.progress": ("import importlib\nimportlib.import_module('ggufkit.models')\n", False),  # cycle
        "ggufkit.commands": ("", True),
        "ggufkit.commands.quantize": ("import gguf\nw = gguf.GGUFWriter(None, 'llama')\n"
                                      "def f(w: gguf.GGUFWriter): pass\n", False),
        "ggufkit.extra": ("", False),
    }
    problems = layer_violations(fake)
    assert any("kquants.api:2 imports ggufkit.convert.pipeline: convert is above kquants" in p for p in problems)
    assert any("convert.pipeline:1 imports ggufkit.runtime.load: convert and runtime" in p for p in problems)
    assert any(p.startswith("import cycle") and "models" in p and "progress" in p for p in problems)
    assert any("'extra' is in no layer" in p for p in problems)
    assert len(problems) == 4, problems
    formats = single_format_violations(fake)
    assert [p.split(" ")[0] for p in formats] == ["ggufkit.runtime.load:2", "ggufkit.commands.quantize:2"]
