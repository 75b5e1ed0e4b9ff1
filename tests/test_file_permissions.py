"""Private files: the run dir 0700; checkpoints, journal, alerter state and token 0600; a checkpoint
another user owns or group / others may write is refused before anything is unpickled."""
from __future__ import annotations

import os
import pickle

import pytest

from aimass.agents.sink import Journal, Manifest
from aimass.core.files import UnsafeFileError, private_dir
from aimass.models import online
from aimass.rules.alarms import StateDB


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
    ckpt = tmp_path / "predict" / "group" / "p0.pkl"
    online.OnlinePartition(8).save(ckpt)
    assert mode(ckpt) == "0o600" and mode(ckpt.parent) == "0o700"
    assert online.OnlinePartition.load(ckpt, 8, 3.0).k == 8
    journal = tmp_path / "sink" / "g.journal.json"
    Journal(journal).save(Manifest("b1"))
    assert mode(journal) == "0o600"
    db = StateDB(tmp_path / "alert" / "alerts.sqlite")
    with db:
        db.conn.execute("INSERT INTO kv VALUES ('k', x'00')")
    files = [p for p in (tmp_path / "alert").iterdir()]
    assert {p.name for p in files} >= {"alerts.sqlite", "alerts.sqlite-wal"}
    assert {mode(p) for p in files} == {"0o600"}


@pytest.mark.parametrize("how", ["group-writable", "world-writable", "foreign-owner"])
def test_an_unsafe_checkpoint_is_refused_and_never_unpickled(tmp_path, how):
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "p0.pkl"
    ckpt.write_bytes(pickle.dumps(Planted(str(marker))))
    ckpt.chmod(0o600)
    if how == "group-writable":
        ckpt.chmod(0o620)
    elif how == "world-writable":
        ckpt.chmod(0o602)
    else:
        if os.geteuid() != 0:
            pytest.skip("changing a file's owner needs root")  # the mode cases still run
        os.chown(ckpt, 65534, 65534)
    with pytest.raises(UnsafeFileError, match="refusing checkpoint .*(group or others may write|belongs to uid)"):
        online.OnlinePartition.load(ckpt, 8, 3.0)
    assert not marker.exists()
    # the defect this guards against: the same file, made private, does run code when loaded
    if how != "foreign-owner":
        ckpt.chmod(0o600)
        online.OnlinePartition.load(ckpt, 8, 3.0)
        assert marker.exists()
