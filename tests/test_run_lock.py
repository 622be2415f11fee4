"""RunFolderLock: one writer per run folder, stale locks taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from keras_brainformer.errors import TrainingError
from keras_brainformer.training.run_lock import LOCK_FILE
from keras_brainformer.training.run_lock import RunFolderLock
from keras_brainformer.training.trainer import _fit_phases


def test_second_holder_is_refused_and_the_first_releases(tmp_path):
    with RunFolderLock(tmp_path / "run"):
        holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert holder == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(TrainingError, match=f"in use by process {os.getpid()}"):
            with RunFolderLock(tmp_path / "run"):
                pass
        assert (tmp_path / "run" / LOCK_FILE).exists()  # the refusal took nothing
    assert not (tmp_path / "run").exists()  # created by the lock, left empty


def test_a_folder_it_did_not_create_is_kept(tmp_path):
    (tmp_path / "run").mkdir()
    with RunFolderLock(tmp_path / "run"):
        (tmp_path / "run" / "run.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json"]


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / LOCK_FILE).write_text(
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()})
    )
    with RunFolderLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()


def test_a_torn_lock_file_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"pid": ')  # killed while writing it
    with RunFolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(TrainingError, match="'elsewhere'"):
        with RunFolderLock(tmp_path):
            pass


@pytest.mark.parametrize(
    "start_step, expected",
    [
        (0, [(0, 3, 4, 0)]),
        (4, [(1, 3, 4, 4)]),
        (6, [(1, 2, 2, 6), (2, 3, 4, 8)]),  # finish epoch 2 from step 6, then epoch 3
        (11, [(2, 3, 1, 11)]),
        (12, []),  # done
    ],
)
def test_fit_phases_resume_at_the_exact_step(start_step, expected):
    assert _fit_phases(start_step, steps_per_epoch=4, epochs=3) == expected
