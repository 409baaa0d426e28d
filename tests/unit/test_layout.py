"""The layout is the architecture (docs/architecture.md, "Which folder is which tier"): front →
shared ← gpu, and no import cycle among the modules of services/. Read from the source, so an
import that crosses the line or closes a cycle fails here before it ships, whether at module
level or inside a function."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"
# The one crossing: PromptService names LLMService for bentoml.depends.
ALLOWED = {("services/front/prompt_service.py", "services.gpu.llm_service")}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name == "services" or name.startswith("services.")}


def tier(module_or_path: str) -> str:
    parts = module_or_path.replace("/", ".").removesuffix(".py").split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ("front", "gpu") else "shared"


MODULES = sorted(SERVICES.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVICES.parent)))
def test_imports_follow_the_tiers(path: Path) -> None:
    """Shared modules import no tier; a tier imports the shared layer and itself only."""
    relative = str(path.relative_to(SERVICES.parent))
    own = tier(relative)
    crossing = sorted(
        name for name in imported_modules(path)
        if tier(name) not in ("shared", own) and (relative, name) not in ALLOWED
    )
    assert not crossing, f"{relative} ({own}) imports {crossing}: front → shared ← gpu only"


def test_the_check_sees_a_crossing(tmp_path: Path) -> None:
    """The check itself can fail: a shared module importing the GPU tier is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from services.gpu.lora import AdapterRegistry\n")
    assert imported_modules(bad) == {"services.gpu.lora"}
    assert tier("services.gpu.lora") == "gpu" and tier("services/config.py") == "shared"


def test_every_tier_folder_has_modules() -> None:
    assert {tier(str(p.relative_to(SERVICES.parent))) for p in MODULES} == {"shared", "front", "gpu"}


def module_name(path: Path, root: Path) -> str:
    """services/front/health.py -> services.front.health; a package's __init__.py -> the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each module of root/services and the modules of services it imports, wherever the import
    sits (module level, a function, an `if TYPE_CHECKING:`). `from package import module` counts as
    an import of that module; a relative import is resolved against the importing module."""
    paths = sorted((root / "services").rglob("*.py"))
    known = {module_name(path, root) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                edges.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                             for alias in node.names)
        graph[name] = (edges & known) - {name}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of imports (its modules, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported):
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def test_no_import_cycle_among_the_services_modules() -> None:
    """No module of services/ imports, even inside a function, a module that imports it back,
    directly or through others: each module can be read, and imported, on its own."""
    cycle = import_cycle(import_graph(SERVICES.parent))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle_through_a_function(tmp_path: Path) -> None:
    """The check itself can fail: a -> b at module level, b -> a inside a function."""
    package = tmp_path / "services" / "front"
    package.mkdir(parents=True)
    (tmp_path / "services" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from services.front import b\n")
    (package / "b.py").write_text("def f():\n    from .a import thing\n")
    (package / "c.py").write_text("import services.front.a\n")
    graph = import_graph(tmp_path)
    assert graph["services.front.a"] == {"services.front.b"} and graph["services.front.b"] == {"services.front.a"}
    assert import_cycle(graph) == ["services.front.a", "services.front.b", "services.front.a"]
    assert import_cycle({"x": {"y"}, "y": set()}) is None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVICES.parent)))
def test_every_module_opens_with_a_short_docstring(path: Path) -> None:
    """3 to 8 lines, quotes included: what the module is for and the one thing to know. The
    reasoning and the measured numbers belong in docs/architecture.md and docs/benchmarks.md."""
    body = ast.parse(path.read_text(), str(path)).body
    first = body[0] if body else None
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str), \
        f"{path.relative_to(SERVICES.parent)} has no module docstring"
    lines = first.end_lineno - first.lineno + 1
    assert 3 <= lines <= 8, f"{path.relative_to(SERVICES.parent)}: its docstring is {lines} lines, not 3 to 8"


TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".txt", ".toml", ".ini", ".json", ".cfg"}
CONFLICT_MARKER = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)


def test_no_file_carries_merge_conflict_markers() -> None:
    """A merge left `<<<<<<< HEAD` ... `>>>>>>>` in docs/architecture.md once; nothing catches that
    in a document but this."""
    root = SERVICES.parent
    skipped = {".venv", ".git", ".cache", "build", "node_modules"}
    marked = [str(path.relative_to(root)) for path in root.rglob("*")
              if path.suffix in TEXT_SUFFIXES and path.is_file() and not skipped & set(path.relative_to(root).parts)
              and CONFLICT_MARKER.search(path.read_text(errors="replace"))]
    assert marked == []


def test_loading_the_bento_imports_no_engine_or_model_library() -> None:
    """Every process that loads the Bento imports its entry module: the GPU tier's server process
    before it starts a worker, and each LLMService worker before it starts the engine. torch,
    transformers and vLLM (seconds to import) come later, in the worker that needs them; imported
    here they delayed every GPU replica's engine start (docs/architecture.md, "A replica's start")."""
    import subprocess
    import sys

    code = ("import sys, services.front.prompt_service; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'vllm'}))")
    env = {"PIPELINE_INTERNAL_TOKEN": "a-token-for-the-import-check", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=SERVICES.parent, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
