from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    from ppml_kms.demo import spark_session

    session = spark_session("ppml-kms tests", master="local[2]")
    yield session
    session.stop()
