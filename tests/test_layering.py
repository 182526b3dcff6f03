"""The package is a straight stack: no module imports a module above it, at the top of the
file or inside a function. The stack is README.md's "How it fits together"; this test reads
every ``import`` of every module and fails on an upward one, or on a module the stack does not
place (a new module must be given its level)."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "distilkit")

# Bottom to top. A module may import modules of its own level or below. A package entry
# ("compress") covers its submodules unless a submodule is listed itself.
STACK = [
    ["files", "device", "metrics", "losses", "shard_store", "values", "sharding"],
    ["loss_terms", "modeling", "collate", "students.word_vocab", "students.bilstm"],
    ["config", "budget"],
    ["data"],
    ["compress"],
    ["kernels", "students", "teachers"],
    ["teacher_cache", "augment"],
    ["trainer", "cache_admin"],
    ["evaluate", "seq2seq", "finetune"],
    ["report"],
    ["card"],
    ["hub"],
    ["recipe"],
    ["tasks"],
    ["pipeline", "evaluate_run", "export", "search"],
    ["cli", "__main__", "__init__"],
]
LEVEL = {name: i for i, names in enumerate(STACK) for name in names}


def _modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__") if rel != "__init__" else rel] = os.path.join(d, f)
    return out


def level_of(module: str) -> int:
    """The level of ``module`` (dotted, without the ``distilkit.`` prefix): its own entry, else
    that of the nearest enclosing package."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in LEVEL:
            return LEVEL[name]
    raise KeyError(module)


def _imports(path: str) -> list[tuple[int, str]]:
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            # ``from distilkit import losses`` imports the module distilkit.losses
            if node.module == "distilkit":
                found += [(node.lineno, f"distilkit.{a.name}") for a in node.names]
            elif node.module.startswith("distilkit."):
                found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                          if os.path.isfile(os.path.join(ROOT, *f"{node.module}.{a.name}".split(".")[1:]) + ".py")]
    return [(n, m[len("distilkit."):]) for n, m in found if m.startswith("distilkit.")]


def test_every_module_has_a_level():
    missing = [m for m in _modules() if not any(
        ".".join(m.split(".")[:i]) in LEVEL for i in range(len(m.split(".")), 0, -1))]
    assert not missing, f"give these modules a level in STACK (and README): {missing}"


def test_no_module_imports_one_above_it():
    upward = []
    for mod, path in sorted(_modules().items()):
        own = level_of(mod)
        for line, target in _imports(path):
            if target == "distilkit" or not target:
                continue
            if level_of(target) > own:
                upward.append(f"{os.path.relpath(path, ROOT)}:{line} {mod} (level {own}) imports "
                              f"{target} (level {level_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The reader finds imports inside functions too (the lazy ones)."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from distilkit.pipeline import run_recipe\n")
    assert _imports(str(f)) == [(2, "pipeline")]
    with pytest.raises(KeyError):
        level_of("no_such_module")
