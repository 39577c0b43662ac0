"""Hadoop-style line splitting over encrypted segments: every line exactly once, whatever the splits."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppml_kms import envelope
from ppml_kms.spark import plan_splits
from ppml_kms.spark._executor import iter_split_lines

SEG = 1024


@pytest.fixture(scope="module")
def setup(kms_server, tmp_path_factory):
    from tests.conftest import enroll_app

    app = enroll_app(kms_server)
    with app.client() as client:
        keyid = client.create_primary_key()
        wrapped = client.generate_wrapped_data_key(keyid, 32, envelope.DATA_KEY_AAD)
        encryptor = envelope.FileEncryptor.from_kms(client, keyid, wrapped, segment_size=SEG)
    return app, encryptor, tmp_path_factory.mktemp("splits")


def _lines_via_splits(path, config, split_size):
    out = b""
    for split in plan_splits([path], split_size):
        out += b"".join(iter_split_lines(split, config))
    return out


line = st.binary(min_size=0, max_size=3000).map(lambda b: b.replace(b"\n", b"x"))


@given(lines=st.lists(line, max_size=40), trailing_newline=st.booleans(), segs_per_split=st.integers(1, 4))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_each_line_exactly_once(setup, lines, trailing_newline, segs_per_split) -> None:
    app, encryptor, workdir = setup
    text = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    src = workdir / "plain"
    dst = workdir / "plain.enc"
    src.write_bytes(text)
    encryptor.encrypt_file(src, dst, overwrite=True)
    splits = plan_splits([dst], segs_per_split * SEG)
    pieces = [b"".join(iter_split_lines(s, app.config())) for s in sorted(splits, key=lambda s: s.first_segment)]
    assert b"".join(pieces) == text
    for piece in pieces[:-1]:  # every split but the last holds whole lines only
        assert piece == b"" or piece.endswith(b"\n")


def test_line_longer_than_several_splits(setup) -> None:
    app, encryptor, workdir = setup
    text = b"short\n" + b"L" * (5 * SEG) + b"\nend\n"
    src, dst = workdir / "long", workdir / "long.enc"
    src.write_bytes(text)
    encryptor.encrypt_file(src, dst, overwrite=True)
    assert _lines_via_splits(dst, app.config(), SEG) == text
    assert len(plan_splits([dst], SEG)) == 6
    os.remove(src)
