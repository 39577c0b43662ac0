"""`ppml-kms query`: SQL over encrypted CSV from the command line."""

from __future__ import annotations

from pathlib import Path

from ppml_kms.demo import IRIS_DDL

IRIS = Path(__file__).resolve().parents[2] / "examples" / "data" / "iris"


def test_query_groups_encrypted_iris(spark, cli, app, tmp_path, monkeypatch) -> None:
    app.env(monkeypatch)
    monkeypatch.setenv("PPML_KMS_CREDENTIALS", app.credentials_file)
    assert cli("generate-primary-key", "--out", tmp_path / "pk").code == 0
    assert cli("encrypt", IRIS, "--out", tmp_path / "enc", "--primary-key", tmp_path / "pk").code == 0
    result = cli(
        "query", tmp_path / "enc", "--schema", IRIS_DDL, "--table", "iris",
        "--sql", "SELECT class, count(*) AS n FROM iris GROUP BY class ORDER BY class",
    )
    assert result.code == 0, result.err
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in result.out.splitlines() if line.startswith("|")]
    assert rows == [["class", "n"], ["Iris-setosa", "50"], ["Iris-versicolor", "50"], ["Iris-virginica", "50"]]

    wrong = cli("query", tmp_path / "enc", "--schema", "a INT NOT NULL")
    assert wrong.code == 1 and "Expected 1 columns, got 5" in wrong.err
    assert "Iris" not in wrong.err  # decrypted rows never appear in error messages
    bad_sql = cli("query", tmp_path / "enc", "--schema", IRIS_DDL, "--sql", "SELECT * FROM nope")
    assert bad_sql.code == 1 and "TABLE_OR_VIEW_NOT_FOUND" in bad_sql.err and bad_sql.err.count("\n") == 1
