"""The command line: one-line errors (no traceback) for user mistakes, and a corpus of odd
files. (docs/usage.md's train, eval and generate commands run in tests/test_repository.py.)"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/lm_tiny.py:smoke"


def _main(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "lcx.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT),
    )


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--config.train.stepz=3"], "no key 'stepz'"),
        (["--config.train.steps=abc"], "--config.train.steps"),
        (["--config.data.paths=/no/such/corpus"], "does not exist"),
        (["--config.data.packing=zigzag"], "data.packing"),
        (["--config.mode=eval"], "no checkpoint"),
        (["--config.mode=generate"], "no checkpoint"),
        (["--config.mode=dance"], "config.mode"),
    ],
)
def test_user_errors_are_one_line(tmp_path, extra, expected):
    result = _main("--config", SMOKE, "--workdir", str(tmp_path / "w"), *extra)
    assert result.returncode == 2  # one exit status for every mistake a user can fix
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("lcx: error")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = _main("--config", SMOKE, "--workdir", str(blocker / "sub"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--workdir" in result.stderr and "not writable" in result.stderr


def test_missing_config_file(tmp_path):
    result = _main("--config", "configs/nope.py", "--workdir", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "configs/nope.py" in result.stderr


def test_odd_files_train(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (corpus / "latin1.txt").write_bytes("café crème brûlée ".encode("latin-1") * 20)
    (corpus / "notes.md").write_text("# notes\n" * 50)
    config = os.path.join(ROOT, "configs", "lm_tiny.py:smoke")
    result = _main(
        "--config", config, "--workdir", "w", f"--config.data.paths={corpus}",
        "--config.train.steps=2", cwd=tmp_path,
    )  # fmt: skip  # the workdir relative to the working directory, as `make train` gives it
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 empty and 1 binary files skipped" in result.stderr  # binary.bin has NUL bytes
    assert (tmp_path / "w" / "checkpoints" / "2").exists()
    assert (tmp_path / "w" / "metrics.jsonl").read_text().strip()
