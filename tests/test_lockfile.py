"""dvc.lock guard (elf/lockfile.py): a kill during DVC's in-place write must not lose records silently."""

import threading

import pytest

from elf.errors import ElfError
from elf.lockfile import GOOD_COPY, lock_problem, repair, save_good_copy

LOCK = """schema: '2.0'
stages:
  prepare@owt:
    cmd: elf prepare owt
    outs:
    - path: data/raw/owt
      hash: md5
      md5: 0123456789abcdef0123456789abcdef.dir
  tokenizer:
    cmd: elf tokenizer
    outs:
    - path: data/tokenizer
      hash: md5
      md5: fedcba9876543210fedcba9876543210.dir
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.lock").write_text(LOCK)
    assert save_good_copy(tmp_path)
    return tmp_path


@pytest.mark.parametrize("broken, problem", [
    ("", "it is empty"),
    ("schema: '2.0'\nstages:\n  prepare@owt:\n    cmd: [elf", "it does not parse"),
    (LOCK.split("  tokenizer:")[0], "records missing for tokenizer"),
    (LOCK.split("    outs:\n    - path: data/tokenizer")[0], "records cut short for tokenizer"),
])
def test_a_lock_broken_as_a_kill_breaks_it_is_detected_and_restored(project, broken, problem):
    (project / "dvc.lock").write_text(broken)
    assert problem in lock_problem(project)
    assert not save_good_copy(project)  # a broken lock never replaces the good copy
    assert "restored the good copy" in repair(project, settle_seconds=0.01)
    assert (project / "dvc.lock").read_text() == LOCK and lock_problem(project) is None


def test_a_good_lock_is_left_alone_and_a_missing_copy_says_how_to_recover(project):
    assert repair(project, settle_seconds=0.01) is None
    (project / GOOD_COPY).unlink()
    (project / "dvc.lock").write_text("")
    with pytest.raises(ElfError, match="no good copy is kept; `git checkout dvc.lock`"):
        repair(project, settle_seconds=0.01)


def test_a_lock_being_written_right_now_is_not_overwritten(project):
    """DVC truncates, then writes: for a moment the lock looks empty. A repair in that moment must wait it out."""
    (project / "dvc.lock").write_text("")
    writer = threading.Timer(0.1, lambda: (project / "dvc.lock").write_text(LOCK + "  # newer\n"))
    writer.start()
    assert repair(project, settle_seconds=0.5) is None
    writer.join()
    assert (project / "dvc.lock").read_text().endswith("# newer\n")
