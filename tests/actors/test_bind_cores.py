"""Worker core binding (group_member.bind_cores), each case in a fresh process: binding is
process-wide and must not touch the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CASE = """
import json, os, sys
from shardwright.actors.group_member import bind_cores
rank, world, threads = map(int, sys.argv[1:4])
bound = bind_cores(rank, world, threads)
print(json.dumps({"bound": bound, "affinity": sorted(os.sched_getaffinity(0))}))
"""


def run_case(rank: int, world: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CASE, str(rank), str(world), str(threads)], check=True,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return json.loads(out.stdout)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two usable cores and sched_setaffinity")
def test_each_rank_gets_its_own_cores_and_oversubscribed_gangs_stay_unbound():
    usable = sorted(os.sched_getaffinity(0))
    per = len(usable) // 2
    for rank in (0, 1):
        got = run_case(rank, 2, per)
        want = usable[rank * per:(rank + 1) * per]
        assert got == {"bound": want, "affinity": want}
    assert run_case(0, 1, len(usable)) == {"bound": usable, "affinity": usable}  # all of them: as it was
    assert run_case(1, len(usable) + 1, 1) == {"bound": None, "affinity": usable}  # ranks would share
