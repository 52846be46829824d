"""Every tutorial runs, through the same runner as `python tutorials/run.py`, on a CPU.

Tutorials that read the offline assets skip, with the reason, when ../shared/assets is absent (and
those that need SmolLM2-135M when it cannot be fetched). The runner also enforces the tutorials'
rules (no-ci blocks have a twin, figures are drawn by the tutorial's own code, "What to read next"
names things that exist, and every number a `<!-- from the run -->` paragraph quotes is one the run
printed, within one unit of the quoted number's last digit); the last tests check that it does, on
small markdown files written here. Figures go to a temporary folder: running the tests never
rewrites the committed PNGs (`python tutorials/run.py --write-figures` does, and only it).
"""
import importlib.util
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIALS = REPO / "tutorials"

# tutorials/ is not a package, and the repository root has its own run.py: load ours under its own name
_spec = importlib.util.spec_from_file_location("tutorials_run", TUTORIALS / "run.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)


@pytest.mark.parametrize("path", runner.tutorial_paths(), ids=lambda p: p.stem)
def test_tutorial_runs(path):
    try:
        runner.run_tutorial(path)
    except runner.Skipped as e:
        pytest.skip(str(e))


def test_readme_links_every_tutorial_in_order():
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    linked = re.findall(r"\]\((\d\d-[^)]+\.md)\)", readme)
    assert linked == [p.name for p in runner.tutorial_paths()]


# --- the runner's rules, on small markdown files ----------------------------------------------

def write(tmp_path, text, name="01-demo.md"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


NEXT = "\n## What to read next in the code\n\n- `minisink/cache.py`: `SinkCache.begin`\n"


def test_blocks_share_a_namespace_and_no_ci_blocks_are_skipped(tmp_path):
    path = write(tmp_path, "# demo\n```python\nx = 2\n```\n```python no-ci\nraise SystemExit('ran')\n```\n"
                           "```python\nassert x == 2\nopen('seen.txt', 'w').write(str(x))\n```\n" + NEXT)
    runner.run_tutorial(path, quiet=True)
    assert (tmp_path / "seen.txt").read_text() == "2"   # written in the tutorial's folder


def test_tracebacks_point_at_the_markdown_line(tmp_path):
    path = write(tmp_path, "# demo\n\n```python\nx = 1\nraise ValueError('line 5')\n```\n" + NEXT)
    with pytest.raises(ValueError) as info:
        runner.run_tutorial(path, quiet=True)
    frame = info.traceback[-1]
    assert Path(frame.path) == path and frame.lineno + 1 == 5   # pytest counts lines from 0


def test_missing_needs_skip_with_the_reason(tmp_path):
    path = write(tmp_path, "<!-- needs: no/such/folder -->\n```python\nraise AssertionError\n```\n" + NEXT)
    with pytest.raises(runner.Skipped, match="no/such/folder"):
        runner.run_tutorial(path, quiet=True)


def test_a_no_ci_block_needs_a_twin(tmp_path):
    path = write(tmp_path, "```python\nx = 1\n```\n```python no-ci\nbig()\n```\n" + NEXT)
    with pytest.raises(runner.TutorialError, match="twin"):
        runner.run_tutorial(path, quiet=True)


def test_stale_pointers_fail(tmp_path):
    path = write(tmp_path, "```python\n```\n## What to read next in the code\n\n"
                           "- `minisink/cache.py`: `SinkCache.no_such_method` (and `prose` here is fine)\n")
    with pytest.raises(runner.TutorialError, match="no_such_method"):
        runner.run_tutorial(path, quiet=True)
    path = write(tmp_path, "```python\n```\n## What to read next in the code\n\n- `minisink/gone.py`\n")
    with pytest.raises(runner.TutorialError, match="gone.py"):
        runner.run_tutorial(path, quiet=True)


def test_figures_must_be_drawn_by_the_tutorial(tmp_path):
    (tmp_path / "old.png").write_bytes(b"")
    os.utime(tmp_path / "old.png", (0, 0))              # a figure left over from an earlier run
    path = write(tmp_path, "```python\nx = 1\n```\n![a figure](old.png)\n" + NEXT)
    with pytest.raises(runner.TutorialError, match="old.png"):
        runner.run_tutorial(path, quiet=True)


def test_figures_go_to_the_folder_asked_for_never_beside_the_markdown(tmp_path):
    path = write(tmp_path, "```python\nimport matplotlib.pyplot as plt\nfig = plt.figure()\n"
                           "fig.savefig('drawn.png')\n```\n![a figure](drawn.png)\n" + NEXT)
    runner.run_tutorial(path, quiet=True)                          # default: a temporary folder
    assert not (tmp_path / "drawn.png").exists()
    runner.run_tutorial(path, quiet=True, figures_dir=tmp_path / "figures")
    assert (tmp_path / "figures" / "drawn.png").is_file() and not (tmp_path / "drawn.png").exists()


def test_quoted_numbers_must_be_printed_by_the_run(tmp_path):
    code = "```python\nprint('window 192.24, sink 78.0 and 12.4 %')\n```\n"
    ok = "<!-- from the run -->\nWindow 192.2, sink 78 (not checked: no decimals) and 12%.\n\nLater 3.14 is free.\n"
    runner.run_tutorial(write(tmp_path, code + ok + NEXT), quiet=True)
    for wrong in ("192.4", "78.2", "13.5"):
        path = write(tmp_path, code + f"<!-- from the run -->\nWindow {wrong}, quoted wrongly.\n" + NEXT)
        with pytest.raises(runner.TutorialError, match=wrong.replace(".", r"\.")):
            runner.run_tutorial(path, quiet=True)
