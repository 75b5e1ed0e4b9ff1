"""perf/fuzz.py --quick: payloads through the bridge's parse path and byte streams through the
packet splitter, 0 crashes, every rejection with a documented reason."""
from __future__ import annotations

import json
import subprocess
import sys

from aimass.streams.payloads import REASONS
from tests.conftest import REPO


def test_fuzz_quick_finds_no_crash():
    run = subprocess.run([sys.executable, str(REPO / "perf" / "fuzz.py"), "--quick", "--seed", "7"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0 and result["crashes"] == 0, result["examples"]
    assert result["payloads"] == 20_000 and result["byte_streams"] == 20_000
    assert set(result["reasons"]) - {"accepted_readings"} <= set(REASONS)
    assert result["reasons"]["accepted_readings"] > 0 and result["streams"]["valid"] > 0
