"""Ctrl-C mid-run, then rerun: the result is byte-identical to an uninterrupted run."""

from __future__ import annotations

import contextlib
import shutil
import signal

import psutil
import pytest

from data_engine.layout import shard_name, sidecar_path
from tests.helpers import run_module, start_module, wait_until
from tests.shard_helpers import jpeg, output_bytes, read_back, write

MODULE = "data_engine.shard"
ARGS = ["--src", "folder", "--shard-size", "40k", "--workers", "1"]


@pytest.fixture(scope="module")
def slow_tree(tmp_path_factory):
    """Every identity has large JPEGs that must be resized and a few that pass through; one
    identity in the middle is entirely corrupt (relabelling)."""
    root = tmp_path_factory.mktemp("slow")
    big = jpeg(1, (400, 400))
    for person in range(16):
        for k in range(3):
            write(root / f"p{person:02d}" / f"big{k}.jpg", big)
        write(root / f"p{person:02d}" / "small.jpg", jpeg(person))
    write(root / "p05_bad" / "a.jpg", b"\xff\xd8 not really")
    return root


def _run(root, out, run_cli):
    result = run_cli(MODULE, *ARGS, "--root", root, "--out", out)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def reference(slow_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "shards"
    _run(slow_tree, out, run_module)
    read_back(out)
    return out


def test_interrupt_then_rerun_is_identical(slow_tree, reference, tmp_path, run_cli):
    """Ctrl-C once shards 0-2 are committed. The whole job takes well under a second, so
    the one worker is stopped (SIGSTOP) first, wherever it is: the signal then lands
    mid-run on any machine, unless the worker wrote the other 14 shards in the moment
    between this test seeing shard 2 committed and stopping it. Ctrl-C is the main
    process's to handle (a worker ignores it), so the test signals that process alone."""
    out = tmp_path / "interrupted"
    process = start_module(MODULE, *ARGS, "--root", slow_tree, "--out", out)
    try:
        wait_until(lambda: all(sidecar_path(out, shard_name(i)).is_file()
                               for i in range(3)), process)
        for worker in psutil.Process(process.pid).children():
            worker.suspend()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:  # a failure leaves no stopped worker behind
        with contextlib.suppress(psutil.Error):
            for leftover in psutil.Process(process.pid).children():
                leftover.kill()
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "data_engine.shard: interrupted"
    assert not (out / "manifest.json").exists(), "the run finished before the interrupt"
    assert not list(out.glob(".*")) and not list((out / "parts").glob(".*"))  # no temp files
    done = sorted(p.name for p in out.glob("shard-*.tar"))
    assert len(done) >= 3 and done == [shard_name(i) for i in range(len(done))]

    result = _run(slow_tree, out, run_cli)
    assert f"{len(done)} already done" in result.stderr
    assert output_bytes(out) == output_bytes(reference)


def test_damaged_shard_is_rewritten(slow_tree, reference, tmp_path, run_cli):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    shard = out / "shard-000003.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "shard-000007.tar").unlink()
    result = _run(slow_tree, out, run_cli)
    assert "2 to write" in result.stderr
    assert output_bytes(out) == output_bytes(reference)
