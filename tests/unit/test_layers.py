"""The architecture, enforced: every import in src/rampup (at the top of a module, inside functions, and
the knob families rampup.knobs discovers) points down the layer order stated in rampup/__init__.py, the
import graph has no cycle, few imports hide inside functions, and no function is longer than a screen."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "rampup"

LAYERS = [
    {"rampup.errors", "rampup.units", "rampup.protocols", "rampup.configbase", "rampup.seeding"},
    {"rampup.schedule"},
    {"rampup.models", "rampup.data"},
    {"rampup.engine"},
    {"rampup.knobs"},
    {"rampup.config"},
    {"rampup.tools", "rampup.integrations"},
    {"rampup.cli", "rampup.commands", "rampup.__main__", "rampup"},
]
"""Lowest first: a module may import from its own layer's packages or lower ones (``rampup`` itself, the
public API, re-exports from every layer)."""

MAX_FUNCTION_LINES = 60
MAX_INNER_IMPORTS = 30

LAZY = (
    "transformers",
    "datasets",
    "pyarrow",
    "tensorboard",
    "torch.utils.tensorboard",
    "wandb",
    "rampup.commands",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "matplotlib",
)
"""What may be imported inside a function: optional dependencies (the ``hf``, ``parquet`` and ``loggers``
extras); the commands, which rampup.cli imports once a command runs so that ``rampup --help`` stays fast;
and the heavy parts of torch and matplotlib that only some runs use (DCP and DTensor, FSDP2, plotting):
at the top of a module, every ``rampup`` process would pay for them (torch.distributed.checkpoint alone
took 0.8 s of a 4 s start here)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports(path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported rampup module, inside a function, line) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    inner: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for n in names:
            out.append((n, id(node) in inner, node.lineno))
    return out


def layer(module: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(module == g or module.startswith(g + ".") for g in group if g != "rampup") or module in group:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and to rampup/__init__.py")


def graph() -> tuple[dict[str, set[str]], list[tuple[str, int]]]:
    mods = modules()
    known = set(mods)
    g: dict[str, set[str]] = {m: set() for m in mods}
    inner = []
    for m, p in mods.items():
        for target, in_function, line in imports(p, known):
            if in_function and (f"{m}:{line}", target) not in inner:
                inner.append((f"{m}:{line}", target))
            if target.startswith("rampup"):
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                if target in known and target != m:
                    g[m].add(target)
    import rampup.knobs as families  # the families rampup.knobs discovers are its imports too

    for info in pkgutil.iter_modules(families.__path__):
        g["rampup.knobs"].add(f"rampup.knobs.{info.name}")
    return g, inner


def test_every_import_points_down_the_layers():
    g, _ = graph()
    upward = [f"{a} -> {b}" for a, deps in g.items() for b in deps if layer(b) > layer(a)]
    assert not upward, "imports up the layer order:\n  " + "\n  ".join(sorted(upward))


def test_no_module_imports_an_old_path():
    """rampup.MOVED keeps old import paths working for users; the package itself uses the new ones."""
    import rampup

    mods = modules()
    old = [
        f"{m}:{line} {target}"
        for m, p in mods.items()
        for target, _, line in imports(p, set(mods) | set(rampup.MOVED))
        if target in rampup.MOVED
    ]
    assert not old, "imports through an old path:\n  " + "\n  ".join(old)


def test_the_import_graph_has_no_cycle():
    g, _ = graph()
    # a package imports its own modules (re-exports); its modules importing the package's name is the cycle
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(g[n]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d) :] + [d] if d in path else [n, d])
            elif d not in state:
                visit(d, [*path, d])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles[:10])


def test_few_imports_hide_inside_functions():
    _, inner = graph()
    statements = {where for where, _ in inner}
    eager = sorted(f"{where} {what}" for where, what in inner if not what.startswith(LAZY))
    assert not eager, "imports inside functions that should be at the top of their module:\n  " + "\n  ".join(eager)
    assert len(statements) < MAX_INNER_IMPORTS, (
        f"{len(statements)} import statements inside functions:\n  "
        + "\n  ".join(f"{where} {what}" for where, what in inner)
    )


def test_no_function_is_longer_than_a_screen():
    long = []
    for p in PKG.rglob("*.py"):
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = fn.end_lineno - fn.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module_name(p)}.{fn.name}: {n} lines")
    assert not long, "functions longer than a screen:\n  " + "\n  ".join(long)


def test_the_core_and_the_public_api_never_import_a_host_loop():
    """The integrations' libraries are optional extras: `import rampup`, its exported names, the engine
    and the command line load none of them (a subprocess, so this session's imports do not count)."""
    code = (
        "import sys, rampup, rampup.cli, rampup.engine.trainer, rampup.tools.plan\n"
        "[getattr(rampup, n) for n in rampup.EXPORTS]\n"
        "print(sorted(m for m in ('transformers', 'trl', 'lightning', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
