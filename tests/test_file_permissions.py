"""Private files: the run dir 0700; checkpoints, journal, alerter state and token 0600; a checkpoint
file that another user owns or others may write is refused; a detector checkpoint is data (NumPy
arrays, no pickles): one that carries a pickle is refused without running it."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

from aimass.agents.sink import Journal, Manifest
from aimass.core.config import DetectConfig
from aimass.core.files import private_dir, write_private
from aimass.models.detect import PartitionDetectors
from aimass.rules.alarms import StateDB
from aimass.streams.statestore import FileStateStore


class Planted:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def mode(path) -> str:
    return oct(os.stat(path).st_mode & 0o777)


def test_run_dir_is_created_0700_and_an_existing_one_is_tightened(tmp_path):
    assert mode(private_dir(tmp_path / "a" / "run")) == "0o700"
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o775)
    assert mode(private_dir(loose)) == "0o700"


def test_checkpoint_journal_and_alerter_state_are_0600(tmp_path):
    ckpt = tmp_path / "predict" / "group" / "p0.npz"
    write_private(ckpt, PartitionDetectors(DetectConfig(), 8).to_bytes())
    assert mode(ckpt) == "0o600" and mode(ckpt.parent) == "0o700"
    assert PartitionDetectors.from_bytes(ckpt.read_bytes(), DetectConfig(), 8).k == 8
    journal = tmp_path / "sink" / "g.journal.json"
    Journal(journal).save(Manifest("b1"))
    assert mode(journal) == "0o600"
    db = StateDB(tmp_path / "alert" / "alerts.sqlite")
    with db:
        db.conn.execute("INSERT INTO kv VALUES ('k', x'00')")
    files = [p for p in (tmp_path / "alert").iterdir()]
    assert {p.name for p in files} >= {"alerts.sqlite", "alerts.sqlite-wal"}
    assert {mode(p) for p in files} == {"0o600"}


def test_state_store_checkpoints_are_private_and_unsafe_ones_refused(tmp_path, monkeypatch):
    store = FileStateStore(tmp_path / "state", b"k" * 32)
    store.save("predict", 3, b"state", {"in": 7})
    path = store.path("predict", 3)
    assert mode(path) == "0o600" and mode(path.parent) == mode(path.parent.parent) == "0o700"
    assert store.load("predict", 3) == (b"state", {"in": 7})
    path.chmod(0o620)  # a sealed checkpoint that group members may write: not loaded
    assert store.load("predict", 3) is None
    path.chmod(0o600)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 1)  # the file is another user's
    assert store.load("predict", 3) is None
    monkeypatch.undo()
    assert store.load("predict", 3) == (b"state", {"in": 7})


def test_a_checkpoint_carrying_a_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    with np.load(io.BytesIO(PartitionDetectors(DetectConfig(), 8).to_bytes())) as z:
        arrays = dict(z)
    arrays["series_keys"] = np.array([Planted(str(marker))], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        PartitionDetectors.from_bytes(buf.getvalue(), DetectConfig(), 8)
    assert not marker.exists()
    # the defect this guards against: the same archive read with pickles allowed runs the code
    with np.load(io.BytesIO(buf.getvalue()), allow_pickle=True) as z:
        z["series_keys"]
    assert marker.exists()
