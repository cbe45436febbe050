"""The package's import rules, checked on the source (AST), not by convention.

Rooms: `model/` (the forward pass) and `decode/` (pure array code and the loop) import nothing
above them; the runtime never imports `bench/` or `prepare/` (the CLI dispatches to them
lazily); no module imports another in a cycle; the schema imports no MLX.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ss_mlx"

# What each room may import from ss_mlx (its own modules always).
ALLOWED = {
    "ss_mlx._blas": set(),
    "ss_mlx._version": set(),
    "ss_mlx.config": set(),
    "ss_mlx.files": set(),
    "ss_mlx.cliargs": set(),
    "ss_mlx.model": {"ss_mlx.config"},
    "ss_mlx.decode": {"ss_mlx.config"},
    "ss_mlx.tuned": {"ss_mlx._blas", "ss_mlx.config", "ss_mlx.files", "ss_mlx.decode"},
    "ss_mlx.drafters": {"ss_mlx.config", "ss_mlx.files", "ss_mlx.decode", "ss_mlx.model",
                        "ss_mlx.tuned"},
    "ss_mlx.loader": {"ss_mlx.config", "ss_mlx.files", "ss_mlx.decode", "ss_mlx.model"},
}
RUNTIME = ("ss_mlx.model", "ss_mlx.decode", "ss_mlx.drafters", "ss_mlx.loader",
           "ss_mlx.generation", "ss_mlx.tuned", "ss_mlx.config", "ss_mlx.files")
COMMANDS_ONLY = ("ss_mlx.bench", "ss_mlx.prepare")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every ss_mlx module `path` imports, function-local imports included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ss_mlx")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ss_mlx"):
                continue
            for alias in node.names:  # `from . import x` may name a module
                sub = f"{target}.{alias.name}"
                found.add(sub if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PKG.parent / sub.replace(".", "/")).is_dir() else target)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def room(name: str) -> str:
    for r in sorted(ALLOWED, key=len, reverse=True):
        if name == r or name.startswith(r + "."):
            return r
    return name


def in_any(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        r = room(mod)
        for dep in deps:
            if dep == "ss_mlx" and in_any(mod, RUNTIME):
                bad.append(f"{mod} imports the package root (import the module itself)")
            if r in ALLOWED and room(dep) != r and not in_any(dep, tuple(ALLOWED[r])):
                bad.append(f"{mod} ({r}) may not import {dep}")
            if in_any(mod, RUNTIME) and in_any(dep, COMMANDS_ONLY):
                bad.append(f"runtime module {mod} imports {dep}")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if dep not in g:
                continue
            if state.get(dep) == 1:
                found.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in g:
        if node not in state:
            visit(node, [node])
    return found


def test_rooms_import_only_below_them():
    assert violations(graph()) == []


def test_no_import_cycles():
    # The package root re-exports lazily (PEP 562), so it is no edge of a cycle.
    g = {k: {d for d in v if d != "ss_mlx"} for k, v in graph().items() if k != "ss_mlx"}
    assert cycles(g) == []


def test_rule_checker_catches_a_runtime_module_importing_bench():
    g = graph()
    g["ss_mlx.decode.loop"] = g["ss_mlx.decode.loop"] | {"ss_mlx.bench.bench"}
    g["ss_mlx.generation"] = g["ss_mlx.generation"] | {"ss_mlx.prepare.default_model"}
    bad = violations(g)
    assert any("ss_mlx.decode.loop" in b and "ss_mlx.bench.bench" in b for b in bad)
    assert any("runtime module ss_mlx.generation imports ss_mlx.prepare" in b for b in bad)
    g["ss_mlx.decode.tree"] = g["ss_mlx.decode.tree"] | {"ss_mlx.decode.loop"}
    assert cycles({k: v for k, v in g.items() if k != "ss_mlx"})


@pytest.mark.parametrize(
    "code",
    [
        "import sys, ss_mlx.config; assert 'mlx.core' not in sys.modules",
        "import sys, ss_mlx.files; assert 'mlx.core' not in sys.modules",
        "import sys, ss_mlx.cliargs; assert 'mlx.core' not in sys.modules",
        # `ss-mlx --help` imports no command module.
        "import sys, ss_mlx.cli; ss_mlx.cli.main(['--help']); "
        "assert 'mlx.core' not in sys.modules and 'ss_mlx.bench' not in sys.modules",
    ],
)
def test_light_imports(code):
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_torch_commands_restart_torch_first():
    # ss_mlx preloads OpenBLAS globally; a torch loaded after it ran training 2.5x slower, so the
    # console script re-executes PyTorch commands with torch imported first. A fresh process:
    # torch must not be imported yet. execv is stubbed to record the restart.
    probe = """
import json, os, sys
import ss_mlx.cli as cli
from ss_mlx import _blas
_blas.BLAS_PATH = _blas.BLAS_PATH or "/usr/lib/libopenblas.so.0"
calls = []
os.execv = lambda exe, argv: calls.append(argv)
def run(argv, console):
    sys.argv = ["ss-mlx", *argv]
    try:
        cli.main() if console else cli.main(argv)
    except SystemExit:
        pass
run(["train", "--bogus"], True)
run(["models", "--help"], True)  # not a PyTorch command
print(json.dumps(calls))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    [argv] = json.loads(r.stdout.strip().splitlines()[-1])
    boot = argv[2]
    assert argv[1] == "-c" and argv[3:] == ["train", "--bogus"]
    assert boot.index("import torch") < boot.index("ss_mlx")


def test_torch_command_through_the_restart_runs():
    boot = (
        "import sys\nsys.argv = ['ss-mlx', 'train', '--help']\n"
        "from ss_mlx.cli import main\nmain()"
    )
    r = subprocess.run([sys.executable, "-c", boot], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--targets" in r.stdout and "--stream-positions" in r.stdout
