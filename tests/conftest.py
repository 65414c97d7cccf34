"""pytest's set-up for the whole suite: a fixed seed per test, one thread, and eager decoding
by default. Shared test code lives in helpers.py."""

import os

import pytest
import torch

# Engines built without a decode path decode eager here (the Engine's own default, "auto",
# compiles a graph for about a minute the first time); servers started as subprocesses inherit
# it. Tests of the compiled step ask for it explicitly, and tests of the default unset it.
os.environ.setdefault("NANOSEEK_DECODE", "eager")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's, through Playwright) for the web chat's tests."""
    from serve_helpers import CHROMIUM, CHROMIUM_ARGS

    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


# Tiny models gain nothing from a second thread, and on a busy 2-core machine two
# threads per process make them 20-30x slower (measured by the serving tests).
# Subprocesses started by tests choose their own.
torch.set_num_threads(1)
