"""Dependencies run one way: the model core (tmc/ but its training side) imports neither the data
readers (datasets/), the research tools (lab/) nor the training loop and its CLI config; datasets/
imports nothing of the training side nor lab/; nothing in tmc/ imports datasets/ or lab/ (so the two
folders never import each other both ways). Checked at module level and inside functions, and
transitively in a fresh interpreter. Also: no tracked file names an absolute path of a machine."""
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


# An absolute file path: POSIX folders from the root (two or more, or one of the usual top-level
# folders alone), a home-relative folder, a Windows drive (C:\ or C:/, JSON-escaped too) or a file
# URL. It must start a token (line start, space, quote, bracket, `=`, `:`, `,`, `;`, `|`), so web
# addresses (https://host/x), relative paths (results/x, ../x, RUN/best.pt) and this file's regular
# expressions never match.
_START = r"(?:^|(?<=[\s\"'`=(\[:,;|]))"
_PART = r"[\w.+@~-]+"
_ROOTS = "tmp|usr|opt|work|root|home|mnt|var|srv|etc|scratch|private|Users|Volumes"
ABSOLUTE_PATH = re.compile(_START + rf"""(?:
    (?:/{_PART}){{2,}}                                  # two or more folders from the root
  | /(?:{_ROOTS})\b                                    # a usual top-level folder alone
  | ~(?:/{_PART})+                                     # a home folder
  | [A-Za-z]:(?:\\\\?|/){_PART}(?:(?:\\\\?|/){_PART})*  # a drive: one or two backslashes, or slashes
  | file://(?:/{_PART})+                               # a file URL
)""", re.X)
# The kernel's interfaces, the same on every Linux machine: no one machine's folder.
SYSTEM = re.compile(r"/(?:dev/null|dev/shm|proc/[\w/]+|sys/[\w/]+)$")


def machine_paths(line: str) -> list[str]:
    """The absolute file paths one line names, the kernel's interfaces left out."""
    return [m.group() for m in ABSOLUTE_PATH.finditer(line) if not SYSTEM.search(m.group())]


def test_the_path_matcher_sees_absolute_paths_and_only_them():
    # «» mark what must be found; a mark starts no token, so this file itself names no path.
    for marked in ('"out": "«/tmp/lab/runs/aw0.3-s0»",', "in «/tmp/tmc/data/demo» and «/work/tmc/results»",
                   "«/opt/torch/.venv/lib/python3.12/site-packages/torch/profiler.py»:224: UserWarning",
                   "--root=«/data/qata» --seed 0", "| `«/usr/bin/chromium»` |", "written to «/tmp».",
                   "cd «~/data/qata»", '"root": "«C:\\\\Users\\\\me\\\\qata»"', "«C:\\data\\qata» or «D:/x»",
                   "see «file:///home/me/x.png»", "[x](«/home/me/notes.md»)"):
        line = marked.replace("«", "").replace("»", "")
        assert machine_paths(line) == re.findall("«(.*?)»", marked), line
    for line in ("https://github.com/microsoft/Swin-Transformer/blob/main/x.py", "results/demo_default/default-s0",
                 '{"out": "results/qata_gpu/full-s0", "root": "data/qata"}', "../shared/data/qata",
                 "[results/README.md](results/README.md#speed-on-one-gpu)", "runs/demo-s0-<date>-<time>/best.pt",
                 "runs/qata-s{0,1,2}/best.pt", "RUN/best.pt and $OUT/x", "Dice/IoU, 1/8, uni/bilateral, a / b",
                 "#!/usr/bin/env bash", "> /dev/null", 'Path("/proc/cpuinfo")', "/runs/ and /data/ (.gitignore)",
                 r're.compile(r"(?:^|(?<=[\s])(?:/[\w.-]+){2,}")', "f'{x}:\\n'", "10 images /s, km/h"):
        assert machine_paths(line) == [], line


def tracked_text_files() -> dict[str, str]:
    """Every file git tracks, as text, binaries (a NUL byte near the start) left out."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = {}
    for name in names.decode().split("\0"):
        data = (REPO / name).read_bytes() if name and (REPO / name).is_file() else b"\0"
        if b"\0" not in data[:8192]:
            files[name] = data.decode("utf-8", errors="replace")
    return files


def test_no_tracked_file_names_a_machine_path():
    """Code, docs and the records in results/ (JSON, logs, tables) speak of the repository, not of the
    folders of the machine that wrote them."""
    files = tracked_text_files()
    assert len(files) > 500 and {"README.md", "results/qata_gpu/full-s0/config.json"} <= set(files)
    offenders = [f"{name}:{i}: {path}" for name, text in files.items()
                 for i, line in enumerate(text.splitlines(), 1) for path in machine_paths(line)]
    assert offenders == []
