"""The package's layers: a module imports only from its own layer or lower ones, and no two modules import each other.

Layers, lowest first (every module of the package must be placed; a new module fails this test until it is):

0. files, resources, concepts, expansion, prompt_sets, attention, the toy world's renderer, captions and tokenizer:
   plain data and files, no model code;
1. pipeline (loading), toyworld.models;
2. diffusion, convert, sampling, edit, suppression, embedding_override, lora, testing: maths on a loaded pipeline,
   and the edit formats;
3. generate, methods.base, methods.closed_form: what methods are built from;
4. methods (registry) and each method, export;
5. evaluation, grid, comparison, report, toyworld.quality, toyworld.judge: scoring and drawing;
6. demo and the other jobs built from them;
7. cli, __main__: argument wiring only.

Lazy (function-level) imports count like top-level ones: they are still dependencies.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "erasure"

LAYERS: dict[int, set[str]] = {
    0: {"erasure", "files", "resources", "concepts", "expansion", "prompt_sets", "attention", "toyworld",
        "toyworld.render", "toyworld.captions", "toyworld.tokenizer"},
    1: {"pipeline", "toyworld.models"},
    2: {"diffusion", "convert", "sampling", "edit", "suppression", "embedding_override", "lora", "testing"},
    3: {"generate", "methods.base", "methods.closed_form"},
    4: {"methods", "methods.*", "export"},
    5: {"evaluation", "evaluation.*", "grid", "comparison", "report", "report.*", "toyworld.quality",
        "toyworld.judge"},
    6: {"demo", "attacks", "attacks.*"},
    7: {"cli", "cli.*", "__main__"},
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or "erasure"


def layer_of(name: str) -> int:
    """The layer of a module (``name`` without the ``erasure.`` prefix)."""
    exact = [layer for layer, names in LAYERS.items() if name in names]
    if exact:
        return exact[0]
    parent = name.rpartition(".")[0]
    wildcard = [layer for layer, names in LAYERS.items() if f"{parent}.*" in names]
    assert wildcard, f"erasure.{name} has no layer: add it to LAYERS in tests/test_layers.py"
    return wildcard[0]


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (``erasure.x.y`` -> ``x.y``), at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "erasure" or name.startswith("erasure."):
                short = name.removeprefix("erasure").removeprefix(".") or "erasure"
                if short in modules:
                    found.add(short)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(files)) - {name} for name, path in files.items()}


def test_every_module_imports_only_its_own_layer_or_lower():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if target == "erasure" or target == name.partition(".")[0]:
                continue  # the package's __init__ (version) and a subpackage's own registry
            if layer_of(target) > layer_of(name):
                wrong.append(f"erasure.{name} (layer {layer_of(name)}) imports erasure.{target} ({layer_of(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    cycles = []

    def visit(node, path):
        for target in edges.get(node, ()):
            if target in path:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start])
    # a subpackage's registry discovers its modules dynamically and they register into it: not a static cycle
    static = [c for c in cycles if not c.startswith("methods -> methods.")]
    assert not static, "\n".join(sorted(set(static)))
