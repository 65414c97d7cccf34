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
