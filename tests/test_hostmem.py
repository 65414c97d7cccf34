"""keep_freed_memory: a large tensor made again and again (as a training step makes its logits)
reuses the freed one's pages (no page faults)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

PROBE = """
import resource, sys, torch
from nanoseek.hostmem import keep_freed_memory
on = keep_freed_memory()
def faults_to_fill():  # minor page faults while a fresh 64 MiB tensor is written
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(3):  # the heap's layout settles (on, one of the first two may still fault)
    faults_to_fill()
print(on, sum(faults_to_fill() for _ in range(4)))
"""


def _probe(keep: str) -> tuple[bool, int]:
    env = {**os.environ, "PYTHONPATH": SRC, "NANOSEEK_KEEP_FREED_MEMORY": keep}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    on, faults = out.stdout.split()
    return on == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_large_tensor_made_again_reuses_its_pages():
    on, faults = _probe("1")
    off, faults_off = _probe("0")
    assert on and not off
    # off, glibc maps each 64 MiB afresh: 4 x 16384 faults with 4 KiB pages (4 x 32 with
    # transparent huge pages); on, every later tensor takes the freed one's pages
    assert faults_off > 0
    assert faults * 3 < faults_off


HUGE_PROBE = """
import os
from nanoseek.hostmem import tune_host_memory
tune_host_memory(huge_pages=True)
import torch
x = torch.ones(16 * 2**20)  # 64 MiB, written
huge = sum(int(l.split()[1]) for l in open("/proc/self/smaps") if l.startswith("AnonHugePages"))
print(os.environ["THP_MEM_ALLOC_ENABLE"], huge)
"""


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages")
def test_large_tensors_on_huge_pages_unless_the_environment_says_otherwise():
    def probe(**env) -> tuple[str, int]:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
        out = subprocess.run(
            [sys.executable, "-c", HUGE_PROBE],
            env={**env, "PYTHONPATH": SRC},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return out[0], int(out[1])

    asked, huge_kb = probe()
    assert asked == "1" and huge_kb >= 2048  # at least one 2 MB page
    assert probe(THP_MEM_ALLOC_ENABLE="0")[0] == "0"  # the user's choice stands
