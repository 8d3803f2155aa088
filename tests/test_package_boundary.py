"""The method package stands alone: tmc/ outside tmc/lab imports neither the data readers (datasets/)
nor the research tools (tmc.lab), at module level or inside a function; and the repository's code
and docs name no machine's folders."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = sorted(p for p in (REPO / "tmc").glob("*.py"))
FORBIDDEN = ("datasets", "tmc.lab")


def forbidden_imports(source: str) -> list[str]:
    """Every module a source imports that is `datasets`/`tmc.lab` or below them, wherever the import sits."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found += [n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]
    return found


def test_the_scanner_sees_imports_anywhere():
    source = "import os\ndef f():\n    from datasets.registry import prepare\n    from tmc import lab\n"
    assert forbidden_imports(source) == ["datasets.registry", "datasets.registry.prepare", "tmc.lab"]
    assert forbidden_imports("import tmc.lab.bench as b\nfrom tmc.metrics import dice_score\n") == ["tmc.lab.bench"]


def test_no_core_module_names_datasets_or_the_lab():
    assert len(CORE) > 10  # the glob found the package
    offenders = {p.name: forbidden_imports(p.read_text()) for p in CORE}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_core_module_loads_neither_datasets_nor_the_lab():
    """Transitive imports too: a fresh interpreter imports all of tmc's core modules and lists what
    got loaded."""
    modules = [f"tmc.{p.stem}" for p in CORE if p.stem != "__init__"]
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(modules) <= set(loaded)
    assert [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)] == []


MACHINE_PATHS = re.compile(r"/(?:work|root|home)/")


def test_no_source_or_document_names_a_machine_path():
    """Code and docs speak of the repository, not of one machine's folders (results/*.json, the
    records of runs, may name where they ran)."""
    files = [p for pattern in ("*.py", "*.md", "*.sh", "*.txt")
             for p in REPO.glob(f"**/{pattern}")
             if not set(p.relative_to(REPO).parts[:1]) & {".git", "cache", "runs", "data", ".whl", ".pytest_cache", ".benchmarks"}]
    assert len(files) > 30  # the glob found the tree
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in files
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
                 if MACHINE_PATHS.search(line)]
    assert offenders == []
