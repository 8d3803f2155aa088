"""Dependencies run one way: the model core (tmc/ but its training side) imports neither the data
readers (datasets/), the research tools (lab/) nor the training loop and its CLI config; datasets/
imports nothing of the training side nor lab/; nothing in tmc/ imports datasets/ or lab/ (so the two
folders never import each other both ways). Checked at module level and inside functions, and
transitively in a fresh interpreter. Also: the repository's code and docs name no machine's folders."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TMC = sorted((REPO / "tmc").glob("*.py"))
DATASETS = sorted((REPO / "datasets").glob("*.py"))
# The training loop, its CLI config and what only they use: train.py / eval.py import these.
TRAINING = ("tmc.engine", "tmc.step", "tmc.train_config", "tmc.optim", "tmc.run_folder",
            "tmc.epoch_loop")
CORE = [p for p in TMC if f"tmc.{p.stem}" not in TRAINING]
RULES = {  # who: what it must not import
    "tmc": ("datasets", "lab"),
    "core": ("datasets", "lab", *TRAINING),
    "datasets": ("lab", *TRAINING),
}


def forbidden_imports(source: str, forbidden: tuple[str, ...]) -> list[str]:
    """Every module a source imports that is one of `forbidden` or below it, wherever the import sits."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found += [n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
    return found


def test_the_scanner_sees_imports_anywhere():
    source = "import os\ndef f():\n    from datasets.registry import prepare\n    import lab\n"
    assert forbidden_imports(source, RULES["tmc"]) == ["datasets.registry", "datasets.registry.prepare", "lab"]
    assert forbidden_imports("import lab.bench as b\nfrom tmc.metrics import dice_score\n",
                             RULES["tmc"]) == ["lab.bench"]
    assert forbidden_imports("from tmc import engine\nfrom tmc.grid import resize_image\n",
                             RULES["datasets"]) == ["tmc.engine"]
    assert forbidden_imports("from tmc.train_config import SplitMode\n", RULES["core"]) == [
        "tmc.train_config", "tmc.train_config.SplitMode"]


def _offenders(files: list[Path], forbidden: tuple[str, ...]) -> dict:
    found = {p.relative_to(REPO).as_posix(): forbidden_imports(p.read_text(), forbidden) for p in files}
    return {k: v for k, v in found.items() if v}


def test_tmc_names_neither_datasets_nor_the_lab():
    assert len(TMC) > 10 and len(CORE) > 10  # the glob found the package
    assert _offenders(TMC, RULES["tmc"]) == {}


def test_the_core_names_nothing_of_the_training_side():
    assert _offenders(CORE, RULES["core"]) == {}


def test_datasets_names_nothing_of_the_training_side_nor_the_lab():
    assert len(DATASETS) > 10
    assert _offenders(DATASETS, RULES["datasets"]) == {}


def _loaded_by(modules: list[str]) -> list[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(modules) <= set(loaded)
    return loaded


def _below(loaded: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]


def test_importing_the_core_loads_neither_datasets_the_lab_nor_the_training_side():
    """Transitive imports too: a fresh interpreter imports every core module and lists what got loaded."""
    loaded = _loaded_by([f"tmc.{p.stem}" for p in CORE if p.stem != "__init__"])
    assert _below(loaded, RULES["core"]) == []


def test_importing_datasets_loads_nothing_of_the_training_side_nor_the_lab():
    loaded = _loaded_by([f"datasets.{p.stem}" for p in DATASETS if p.stem != "__init__"])
    assert _below(loaded, RULES["datasets"]) == []


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
