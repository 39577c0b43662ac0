"""The ppml-kms command, in-process (fast) and as a real process (the console script)."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tree

IRIS = Path(__file__).resolve().parents[2] / "examples" / "data" / "iris"


@pytest.fixture
def keys(tmp_path, app, monkeypatch, cli):
    app.env(monkeypatch)
    primary, data = tmp_path / "keys" / "encrypted_primary_key", tmp_path / "keys" / "encrypted_data_key"
    assert cli("generate-primary-key", "--out", primary).code == 0
    assert cli("generate-data-key", "--primary-key", primary, "--out", data).code == 0
    return primary, data


def test_help_explains_every_command(cli) -> None:
    result = cli("--help")
    assert result.code == 0
    for command in ("server", "enroll", "generate-primary-key", "generate-data-key", "encrypt", "decrypt", "demo"):
        assert command in result.out
        sub = cli(command, "--help")
        assert sub.code == 0 and "usage: ppml-kms " + command in sub.out


def test_enroll_prints_sourceable_lines_and_saves(cli, kms_server, tmp_path) -> None:
    save = tmp_path / "creds"
    result = cli("enroll", "--url", kms_server.url, "--ca-cert", kms_server.ca_cert, "--save", save)
    assert result.code == 0, result.err
    lines = dict(line.split("=", 1) for line in result.out.splitlines())
    assert set(lines) == {"PPML_KMS_URL", "PPML_KMS_APPID", "PPML_KMS_APIKEY", "PPML_KMS_CA_CERT"}
    assert len(lines["PPML_KMS_APIKEY"]) == 32
    assert stat.S_IMODE(os.stat(save).st_mode) == 0o600
    # The saved file is a working credentials file.
    primary = tmp_path / "pk"
    assert cli("generate-primary-key", "--out", primary, "--credentials", save).code == 0


def test_key_generation_writes_private_files(keys) -> None:
    primary, data = keys
    assert len(primary.read_text()) == 36
    assert stat.S_IMODE(os.stat(primary).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o600


def test_key_files_are_not_overwritten(keys, cli) -> None:
    primary, data = keys
    before = primary.read_bytes()
    result = cli("generate-primary-key", "--out", primary)
    assert result.code == 1
    assert "already exists" in result.err and "Traceback" not in result.err
    assert primary.read_bytes() == before
    assert cli("generate-primary-key", "--out", primary, "--force").code == 0
    assert primary.read_bytes() != before


def test_directory_round_trip_keeps_layout(tmp_path, keys, cli) -> None:
    primary, data = keys
    src = tmp_path / "plain"
    shutil.copytree(IRIS, src / "iris")
    (src / "nested" / "deeper").mkdir(parents=True)
    (src / "nested" / "deeper" / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (src / "empty.txt").write_bytes(b"")
    result = cli("encrypt", src, "--out", tmp_path / "enc", "--primary-key", primary, "--data-key", data)
    assert result.code == 0, result.err
    encrypted = tree(tmp_path / "enc")
    assert set(encrypted) == {f"{name}.encrypted" for name in tree(src)}
    assert all(b"sepal" not in blob for blob in encrypted.values())
    result = cli("decrypt", tmp_path / "enc", "--out", tmp_path / "dec")
    assert result.code == 0, result.err
    assert tree(tmp_path / "dec") == tree(src)


def test_single_file_defaults_and_fresh_data_key(tmp_path, keys, cli) -> None:
    primary, _ = keys
    src = tmp_path / "iris_1.csv"
    shutil.copy(IRIS / "iris_1.csv", src)
    assert cli("encrypt", src, "--primary-key", primary).code == 0  # data key generated for this run
    assert (tmp_path / "iris_1.csv.encrypted").is_file()
    src.rename(tmp_path / "original.csv")
    assert cli("decrypt", tmp_path / "iris_1.csv.encrypted").code == 0
    assert (tmp_path / "iris_1.csv").read_bytes() == (IRIS / "iris_1.csv").read_bytes()


def test_tampered_file_fails_cleanly(tmp_path, keys, cli) -> None:
    primary, data = keys
    src = tmp_path / "p.csv"
    shutil.copy(IRIS / "iris_2.csv", src)
    cli("encrypt", src, "--out", tmp_path / "p.enc", "--primary-key", primary, "--data-key", data)
    blob = bytearray((tmp_path / "p.enc").read_bytes())
    blob[-20] ^= 0x40
    (tmp_path / "p.enc").write_bytes(bytes(blob))
    result = cli("decrypt", tmp_path / "p.enc", "--out", tmp_path / "p.out")
    assert result.code == 1
    assert result.err.startswith("ppml-kms: error: ") and result.err.count("\n") == 1
    assert not (tmp_path / "p.out").exists()


def test_encrypt_refuses_existing_output_and_input_as_output(tmp_path, keys, cli) -> None:
    primary, data = keys
    src = tmp_path / "p.csv"
    src.write_text("a\n")
    (tmp_path / "p.csv.encrypted").write_text("precious")
    result = cli("encrypt", src, "--primary-key", primary, "--data-key", data)
    assert result.code == 1 and "already exists" in result.err
    assert (tmp_path / "p.csv.encrypted").read_text() == "precious"
    result = cli("encrypt", src, "--out", src, "--primary-key", primary, "--data-key", data, "--force")
    assert result.code == 1 and "input" in result.err
    assert src.read_text() == "a\n"


def test_user_errors_are_one_line_without_traceback(tmp_path, cli, monkeypatch, app) -> None:
    # No endpoint at all.
    result = cli("generate-primary-key", "--out", tmp_path / "pk")
    assert result.code == 1 and "PPML_KMS_URL" in result.err
    # Endpoint but no credentials.
    monkeypatch.setenv("PPML_KMS_URL", app.url)
    monkeypatch.setenv("PPML_KMS_CA_CERT", app.ca_cert)
    result = cli("generate-primary-key", "--out", tmp_path / "pk")
    assert result.code == 1 and "PPML_KMS_APPID" in result.err
    # Wrong apikey: the server's refusal becomes one line.
    monkeypatch.setenv("PPML_KMS_APPID", app.appid)
    monkeypatch.setenv("PPML_KMS_APIKEY", "Z" * 32)
    result = cli("generate-primary-key", "--out", tmp_path / "pk")
    assert result.code == 1 and "sign error" in result.err
    # Missing input, bad context syntax.
    app.env(monkeypatch)
    result = cli("encrypt", tmp_path / "nope", "--primary-key", tmp_path / "pk")
    assert result.code == 1 and "does not exist" in result.err
    for r in (result,):
        assert "Traceback" not in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "pk").exists()


def test_context_round_trip_and_mismatch(tmp_path, keys, cli) -> None:
    primary, data = keys
    src = tmp_path / "p"
    src.write_text("x")
    assert cli("encrypt", src, "--primary-key", primary, "--data-key", data, "--context", "owner=alice").code == 0
    bad = cli("decrypt", tmp_path / "p.encrypted", "--out", tmp_path / "o1", "--context", "owner=bob")
    assert bad.code == 1 and "context" in bad.err and not (tmp_path / "o1").exists()
    good = cli("decrypt", tmp_path / "p.encrypted", "--out", tmp_path / "o2", "--context", "owner=alice")
    assert good.code == 0 and (tmp_path / "o2").read_text() == "x"


def test_console_script_end_to_end(tmp_path, app) -> None:
    """The installed `ppml-kms` command as a real process, credentials from the environment only."""
    exe = shutil.which("ppml-kms", path=str(Path(sys.executable).parent)) or "ppml-kms"
    env = dict(os.environ, PPML_KMS_URL=app.url, PPML_KMS_APPID=app.appid,
               PPML_KMS_APIKEY=app.apikey, PPML_KMS_CA_CERT=app.ca_cert)

    def run(*args: object) -> subprocess.CompletedProcess[str]:
        argv = [exe, *map(str, args)]
        assert app.apikey not in " ".join(argv)
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    assert run("generate-primary-key", "--out", tmp_path / "pk").returncode == 0
    assert run("generate-data-key", "--primary-key", tmp_path / "pk", "--out", tmp_path / "dk").returncode == 0
    done = run("encrypt", IRIS, "--out", tmp_path / "enc", "--primary-key", tmp_path / "pk", "--data-key", tmp_path / "dk")
    assert done.returncode == 0, done.stderr
    assert run("decrypt", tmp_path / "enc", "--out", tmp_path / "dec").returncode == 0
    assert tree(tmp_path / "dec") == tree(IRIS)
    failed = run("decrypt", tmp_path / "missing.encrypted")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr


def test_parallel_batch_round_trip_without_progress_noise(tmp_path, keys, cli) -> None:
    primary, data = keys
    src = tmp_path / "many"
    for i in range(12):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}.bin").write_bytes(os.urandom(i * 100_003))
    result = cli("encrypt", src, "--out", tmp_path / "enc", "--primary-key", primary, "--data-key", data, "-j", "3")
    assert result.code == 0, result.err
    assert "\r" not in result.err  # stderr is not a terminal: no progress bar
    assert "Encrypted 12 files" in result.out
    result = cli("decrypt", tmp_path / "enc", "--out", tmp_path / "dec", "--jobs", "3")
    assert result.code == 0, result.err
    assert tree(tmp_path / "dec") == tree(src)


def test_batch_stops_on_a_bad_file_and_leaves_no_partial_output(tmp_path, keys, cli) -> None:
    primary, data = keys
    src = tmp_path / "plain"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(50_000))
    cli("encrypt", src, "--out", tmp_path / "enc", "--primary-key", primary, "--data-key", data)
    bad = tmp_path / "enc" / "f2.encrypted"
    bad.write_bytes(bad.read_bytes()[:-100])
    for jobs in ("1", "3"):
        result = cli("decrypt", tmp_path / "enc", "--out", tmp_path / "dec", "-j", jobs)
        assert result.code == 1
        assert "f2.encrypted" in result.err and result.err.count("\n") == 1
        assert not (tmp_path / "dec").exists()  # all or nothing: the run's outputs and directory are gone
    (tmp_path / "dec").mkdir()
    (tmp_path / "dec" / "f0").write_bytes(b"old output")
    result = cli("decrypt", tmp_path / "enc", "--out", tmp_path / "dec", "--force", "-j", "1")
    assert result.code == 1 and "removed the 1 outputs" in result.err  # f1; f0 existed; f3 never started
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["f0"]  # pre-existing output left alone


def test_existing_output_is_refused_before_any_work(tmp_path, keys, cli) -> None:
    primary, data = keys
    src = tmp_path / "plain"
    src.mkdir()
    (src / "a").write_text("a")
    (src / "b").write_text("b")
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "b.encrypted").write_text("keep")
    result = cli("encrypt", src, "--out", tmp_path / "enc", "--primary-key", primary, "--data-key", data)
    assert result.code == 1 and "b.encrypted already exists" in result.err
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["b.encrypted"]


def test_progress_bar_draws_on_a_terminal() -> None:
    from ppml_kms.cli._progress import Progress

    stream = io.StringIO()
    with Progress(100 << 20, "Encrypted", stream=stream, enabled=True) as progress:
        progress(50 << 20)
        progress(50 << 20)
    last = stream.getvalue().rstrip("\n").split("\r")[-1]
    assert "100.0%" in last and "100.0 MiB / 100.0 MiB" in last
    assert Progress(100 << 20, "x", stream=io.StringIO()).enabled is False  # not a terminal


@pytest.mark.parametrize(
    "argv",
    [
        ["generate-data-key", "--primary-key", "pk", "--out", "dk", "--length", "0"],
        ["generate-data-key", "--primary-key", "pk", "--out", "dk", "--length", "99999"],
        ["encrypt", "x", "--primary-key", "pk", "--segment-size", "1"],
        ["encrypt", "x", "--primary-key", "pk", "-j", "0"],
        ["server", "--data-dir", "d", "--port", "99999"],
    ],
)
def test_bad_option_values_are_usage_errors(cli, argv) -> None:
    result = cli(*argv)
    assert result.code == 2 and "Traceback" not in result.err


@pytest.mark.parametrize("context", ["=x", "novalue", "k=" + "v" * 2000])
def test_bad_context_is_a_usage_error(tmp_path, keys, cli, context) -> None:
    primary, data = keys
    (tmp_path / "p").write_text("x")
    result = cli("encrypt", tmp_path / "p", "--primary-key", primary, "--data-key", data, "--context", context)
    assert result.code == 2 and "--context" in result.err
    assert not (tmp_path / "p.encrypted").exists()


def test_plain_http_urls_need_insecure(cli, tmp_path) -> None:
    result = cli("enroll", "--url", "http://127.0.0.1:9/ehsm")
    assert result.code == 1 and "plain-HTTP" in result.err


def test_enroll_checks_save_target_before_enrolling(cli, kms_server, tmp_path) -> None:
    existing = tmp_path / "creds"
    existing.write_text("keep")
    result = cli("enroll", "--url", kms_server.url, "--ca-cert", kms_server.ca_cert, "--save", existing)
    assert result.code == 1 and "already exists" in result.err
    assert result.out == "" and existing.read_text() == "keep"


def test_no_key_is_created_when_the_key_file_cannot_be_written(tmp_path, app, monkeypatch, cli) -> None:
    app.env(monkeypatch)
    with app.client() as client:
        before = len(client.list_keys())
        (tmp_path / "adir").mkdir()
        (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
        for target in (tmp_path / "adir", tmp_path / "dangling"):
            result = cli("generate-primary-key", "--out", target, "--force")
            assert result.code == 1, result.err
        assert len(client.list_keys()) == before


def test_current_directory_and_trailing_slash_outputs(tmp_path, keys, cli, monkeypatch) -> None:
    primary, data = keys
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.csv").write_text("a\n")
    (work / ".hidden").write_text("secret\n")
    monkeypatch.chdir(work)
    result = cli("encrypt", ".", "--primary-key", primary, "--data-key", data)
    assert result.code == 0, result.err
    assert sorted(tree(tmp_path / "work.encrypted")) == [".hidden.encrypted", "a.csv.encrypted"]
    result = cli("encrypt", "a.csv", "--out", str(tmp_path / "newdir") + "/", "--primary-key", primary, "--data-key", data)
    assert result.code == 0, result.err
    assert (tmp_path / "newdir" / "a.csv.encrypted").is_file()
    result = cli("decrypt", tmp_path / "work.encrypted", "--out", tmp_path / "back")
    assert result.code == 0 and "bytes of plaintext" in result.out
    assert tree(tmp_path / "back") == tree(work)


def test_sigterm_cancels_and_removes_partial_output(tmp_path, app) -> None:
    """A long encryption stopped by SIGTERM exits 130 and leaves no output and no temporary file."""
    import signal
    import time

    exe = shutil.which("ppml-kms", path=str(Path(sys.executable).parent)) or "ppml-kms"
    env = dict(os.environ, PPML_KMS_URL=app.url, PPML_KMS_APPID=app.appid,
               PPML_KMS_APIKEY=app.apikey, PPML_KMS_CA_CERT=app.ca_cert)
    big = tmp_path / "in" / "big.bin"
    big.parent.mkdir()
    with open(big, "wb") as handle:  # sparse: cheap to make, slow enough to encrypt
        handle.truncate(8 << 30)
    subprocess.run([exe, "generate-primary-key", "--out", tmp_path / "pk"], env=env, check=True, timeout=60)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [exe, "encrypt", big.parent, "--out", out, "--primary-key", tmp_path / "pk"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not any(out.glob(".ppml-kms-*.part")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not out.exists()  # no partial file, no temporary file, no directory made for them


def test_force_never_replaces_what_is_not_a_regular_file(tmp_path, keys, cli) -> None:
    primary, data = keys
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    (tmp_path / "p").write_text("x")
    for out in (fifo, link):
        result = cli("encrypt", tmp_path / "p", "--out", out, "--primary-key", primary, "--data-key", data, "--force")
        assert result.code == 1 and "not a regular file" in result.err
        result = cli("generate-primary-key", "--out", out, "--force")
        assert result.code == 1
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()


def test_key_file_that_is_a_fifo_is_refused(tmp_path, keys, cli) -> None:
    primary, _ = keys
    fifo = tmp_path / "dk"
    os.mkfifo(fifo)
    (tmp_path / "p").write_text("x")
    result = cli("encrypt", tmp_path / "p", "--primary-key", primary, "--data-key", fifo)
    assert result.code == 1 and "not a regular file" in result.err


def test_context_too_large_in_total_is_a_usage_error(tmp_path, keys, cli) -> None:
    primary, data = keys
    (tmp_path / "p").write_text("x")
    pairs = []
    for i in range(40):
        pairs += ["--context", f"{i:04d}{'k' * 1000}={'v' * 1000}"]
    result = cli("encrypt", tmp_path / "p", "--primary-key", primary, "--data-key", data, *pairs)
    assert result.code == 2 and "in all" in result.err
