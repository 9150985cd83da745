"""Fixtures shared by the test modules. What they build comes from :mod:`factories`; the test modules import
their helpers by module name (``from factories import ...``), as pytest puts this folder on ``sys.path``."""

from __future__ import annotations

import pytest
import torch

from fake_hub_server import FakeHub


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Give every test the process's thread count back: CLI tests run ``--threads 1`` in-process, and a later test
    that compares outputs bitwise with a fresh process (which starts with the default count) must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub():
    """A running :class:`~fake_hub_server.FakeHub` on 127.0.0.1, stopped after the test."""
    with FakeHub() as server:
        yield server
