"""The layout a reader walks: imports run one way, no file but study.py and bench.py is longer than 450 lines, no
module takes more than a dozen names from another, and comments where a learner would ask why."""
import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The walk, top to bottom: each file may import only files after it (README.md, first section).
ORDER = ["train", "evaluate", "flags", "demo", "devices", "guard", "data", "runs", "load_qwen", "controller", "model"]
ABOVE = ["study", "bench", "smollm2"]  # scripts above the walk: they may import any file of it
LONG = {"study.py", "bench.py"}  # the two files allowed past 450 lines


def project_imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported project module, the names taken from it) for every import statement of the file, at any depth:
    an import inside a function counts too, so that none is hidden there to dodge a circle."""
    found = []
    for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in ORDER + ABOVE:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name in ORDER + ABOVE]
    return found


def comment_share(path: Path) -> float:
    """The share of a file's lines that hold a # comment, full-line or trailing (the measure nanoGPT's files
    reach 22-30% by)."""
    src = path.read_text()
    lines = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    return len(lines) / len(src.splitlines())


def test_every_top_level_file_is_placed():
    assert sorted(p.stem for p in ROOT.glob("*.py")) == sorted(ORDER + ABOVE)


@pytest.mark.parametrize("name", ORDER)
def test_imports_run_one_way(name):
    below = ORDER[ORDER.index(name) + 1:]
    assert [m for m, _ in project_imports(name) if m not in below] == []


@pytest.mark.parametrize("name", ORDER + ABOVE)
def test_at_most_a_dozen_names_from_one_module(name):
    taken = {}
    for module, names in project_imports(name):
        taken.setdefault(module, set()).update(names)
    assert {m: len(n) for m, n in taken.items() if len(n) > 12} == {}


def test_no_file_but_the_study_and_the_bench_is_longer_than_450_lines():
    lengths = {p.name: len(p.read_text().splitlines()) for p in ROOT.glob("*.py")}
    assert {n: k for n, k in lengths.items() if k > 450 and n not in LONG} == {}


@pytest.mark.parametrize("name", ORDER + ["smollm2"])
def test_a_fifth_of_the_lines_hold_a_comment(name):
    assert comment_share(ROOT / f"{name}.py") >= 0.2
