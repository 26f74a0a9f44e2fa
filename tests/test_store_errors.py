"""A tracking store that cannot be opened is one line naming it (never its password), with the exit code that
tells the flows whether to retry (75), to wait for a person (3) or to report a setting (2). Real stores, real
MLflow: no mocks."""

import hashlib
import importlib.util
import pickle
import socket
import sqlite3
from pathlib import Path

import pytest
import yaml

from elf.errors import EXIT_BAD_INPUT, EXIT_NEEDS_FIX, EXIT_TEMPORARY, PERMANENT_EXIT_CODES, StoreError
from elf.tracking import mlflow_run, redact, register_candidate
from tests.conftest import inside, mlflow_store_in, tiny_owt_params


def open_store(uri: str, monkeypatch) -> StoreError:
    """Start a run against `uri` the way every stage does; the error it must fail with."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(StoreError) as caught:
        with mlflow_run("elf-test", "store-errors"):
            pass
    return caught.value


def assert_one_line_naming(error: StoreError, uri: str) -> str:
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    assert redact(uri) in message, message
    return message


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_unreachable_server_is_transient_and_never_shows_its_password(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        uri = f"http://user:secret@127.0.0.1:{probe.getsockname()[1]}"
    error = open_store(uri, monkeypatch)
    message = assert_one_line_naming(error, uri)
    assert error.exit_code == EXIT_TEMPORARY
    assert "not reachable" in message and "MLFLOW_TRACKING_URI" in message
    assert "secret" not in message and "user" not in message
    with pytest.raises(StoreError) as caught:  # registering probes the server the same way
        register_candidate("elf-test", "0" * 32, "model", "mauve", 0.5, True)
    assert caught.value.exit_code == EXIT_TEMPORARY and "secret" not in str(caught.value)


def test_a_locked_sqlite_store_is_transient(tmp_path, monkeypatch, capfd):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with mlflow_run("elf-test", "first"):  # a real store, then another process's write transaction holds it
        pass
    holder = sqlite3.connect(tmp_path / "mlruns.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        error = open_store(uri, monkeypatch)
    finally:
        holder.close()
    message = assert_one_line_naming(error, uri)
    assert error.exit_code == EXIT_TEMPORARY and "database is locked" in message
    assert "Traceback" not in capfd.readouterr().err


def garbage(path: Path) -> None:
    path.write_bytes(b"not an SQLite file\x00\xff" * 64)


def another_programs_database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('keep me')")


def unknown_revision(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("INSERT INTO alembic_version VALUES ('deadbeef1234')")


@pytest.mark.parametrize("make", [garbage, another_programs_database, unknown_revision])
def test_a_corrupt_store_needs_a_person_and_is_left_as_it_is(make, tmp_path, monkeypatch, capfd):
    store = tmp_path / "mlruns.db"
    make(store)
    before = digest(store)
    uri = f"sqlite:///{store}"
    error = open_store(uri, monkeypatch)
    message = assert_one_line_naming(error, uri)
    assert error.exit_code == EXIT_NEEDS_FIX
    assert "not a usable MLflow store" in message and "move the file aside" in message, message
    assert digest(store) == before, "the store must be neither changed nor deleted"
    assert "Traceback" not in capfd.readouterr().err


def test_an_out_of_date_schema_names_the_versions(tmp_path, monkeypatch):
    store = tmp_path / "mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'fresh.db'}")
    with mlflow_run("elf-test", "first"):
        pass
    (tmp_path / "fresh.db").rename(store)  # a store MLflow has not opened in this process
    with sqlite3.connect(store) as db:
        db.execute("UPDATE alembic_version SET version_num = 'bd07f7e963c5'")
    before = digest(store)
    uri = f"sqlite:///{store}"
    error = open_store(uri, monkeypatch)
    message = assert_one_line_naming(error, uri)
    assert error.exit_code == EXIT_NEEDS_FIX and "schema version bd07f7e963c5" in message, message
    assert digest(store) == before


DRIVERS = [("postgresql+psycopg2://user:secret@localhost/db", "psycopg2", "psycopg2-binary"),
           ("mysql+pymysql://user:secret@localhost/db", "pymysql", "PyMySQL"),
           ("mysql://user:secret@localhost/db", "MySQLdb", "mysqlclient")]


@pytest.mark.parametrize(("uri", "module", "package"), DRIVERS, ids=[module for _, module, _ in DRIVERS])
def test_a_missing_database_driver_is_bad_input_naming_the_package(uri, module, package, monkeypatch):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    error = open_store(uri, monkeypatch)
    message = assert_one_line_naming(error, uri)
    assert error.exit_code == EXIT_BAD_INPUT
    assert f"pip install '{package}'" in message and "secret" not in message, message


@pytest.mark.parametrize("uri", ["bogus://user:secret@host/x", "file://{tmp}/mlruns"])
def test_a_store_mlflow_rejects_is_one_line_bad_input(uri, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # MLflow 3 refuses a file store without it
    uri = uri.format(tmp=tmp_path)
    error = open_store(uri, monkeypatch)
    message = assert_one_line_naming(error, uri)
    assert error.exit_code == EXIT_BAD_INPUT and "secret" not in message


def test_the_cli_exits_3_for_a_corrupt_store_and_the_flows_retry_only_75(tmp_path, capsys):
    from elf.cli import main
    from flows.stages import PermanentStageError, StageFailed, classify

    params = tiny_owt_params()
    params["encoder"]["kind"] = "scratch"  # the first stage that opens the store
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    store = tmp_path / "mlruns.db"
    garbage(store)
    before = digest(store)
    with inside(tmp_path), mlflow_store_in(tmp_path):
        for args in (["prepare", "owt"], ["tokenizer"], ["tokenize", "owt"]):
            assert main(args) == 0, args
        capsys.readouterr()
        assert main(["encoder"]) == EXIT_NEEDS_FIX
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: MLflow tracking store sqlite:///{store} "), errors
    assert digest(store) == before

    def verdict(code: int) -> Exception:
        return classify(1, [f"ERROR: failed to run: elf encoder, exited with {code}", errors[0]],
                        ["repro", "encoder"])

    assert EXIT_TEMPORARY not in PERMANENT_EXIT_CODES
    assert isinstance(verdict(EXIT_TEMPORARY), StageFailed)
    assert isinstance(verdict(EXIT_NEEDS_FIX), PermanentStageError)


def test_a_store_error_keeps_its_exit_code_across_processes():
    error = pickle.loads(pickle.dumps(StoreError("MLflow tracking store x is busy", EXIT_TEMPORARY)))
    assert error.exit_code == EXIT_TEMPORARY and str(error) == "MLflow tracking store x is busy"
