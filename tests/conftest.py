"""Fixtures shared by the test modules. What they build comes from :mod:`factories`; the test modules import
their helpers by module name (``from factories import ...``), as pytest puts this folder on ``sys.path``."""

from __future__ import annotations

import pytest

from fake_hub_server import FakeHub


@pytest.fixture
def hub():
    """A running :class:`~fake_hub_server.FakeHub` on 127.0.0.1, stopped after the test."""
    with FakeHub() as server:
        yield server
