"""pytest's set-up for the whole suite: a fixed seed per test and one thread.
Shared test code lives in helpers.py."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tiny models gain nothing from a second thread, and on a busy 2-core machine two
# threads per process make them 20-30x slower (measured by the serving tests).
# Subprocesses started by tests choose their own.
torch.set_num_threads(1)
