"""The layout is the architecture (docs/architecture.md, "Which folder is which tier"): front →
shared ← gpu. Read from the source, so an import that crosses the line fails here before it
ships, whether at module level or inside a function."""

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
