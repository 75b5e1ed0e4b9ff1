"""The repository stands alone: no file points outside it for its reasons, every doc it cites exists.

The facts behind the servers' flags live in docs/infrastructure.md; a note outside the repository
(a workplace's shared folder) is invisible to whoever clones it.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Built from pieces so this file does not match itself.
OUTSIDE = re.compile("INFRA" + r"\.md|\.\./" + "shared/")
CITED_DOC = re.compile(r"\bdocs/[\w.-]+\.md\b")


def tracked_text_files() -> dict[str, str]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    out = {}
    for name in names:
        path = REPO / name
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            out[name] = path.read_text()
        except UnicodeDecodeError:
            continue
    return out


def test_no_file_cites_a_note_outside_the_repository():
    hits = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for name, text in tracked_text_files().items() for m in OUTSIDE.finditer(text)]
    assert not hits, "cite docs/infrastructure.md (in the repository) instead of:\n" + "\n".join(hits)


def test_every_cited_doc_exists():
    missing = sorted({f"{name}: {m.group(0)}" for name, text in tracked_text_files().items()
                      for m in CITED_DOC.finditer(text) if not (REPO / m.group(0)).is_file()})
    assert not missing, "cited docs that do not exist:\n" + "\n".join(missing)
