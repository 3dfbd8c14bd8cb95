"""A refusal on rank 0 (a run lock held by another run, an error in rank-0-only work) ends every rank within
seconds, each with the same one-line error: two gloo processes launched with the launcher's environment (RANK,
WORLD_SIZE, MASTER_ADDR, ...) but no torchrun agent, so nothing but the package itself stops rank 1 (a single-node
agent would kill it; across nodes, or under another launcher, nothing does). Before rank 0 shared its refusal,
rank 1 of ``train-tokenizer`` waited in the training group (its 30-minute timeout) and rank 1 of ``pipeline`` died
on a lost connection with a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from _support.training import tiny_config

pytestmark = pytest.mark.slow  # subprocesses with torch.distributed

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
DEADLINE_S = 60  # both ranks must be gone well before this (the group's own timeouts are 30 minutes and more)

ON_MAIN = textwrap.dedent(
    """
    import sys
    from kronos.config import Config
    from kronos.errors import ConfigError
    from kronos.train import distributed as kd

    def refuse():
        raise ConfigError("config key 'run_id' is refused on rank 0 only")

    with kd.process_group(Config(device="cpu")) as ctx:
        assert ctx.world_size == 2 and ctx.backend == "gloo"
        shared = kd.on_main(lambda: "picked-on-rank-0" if ctx.is_main else "never run elsewhere")
        print(f"rank {ctx.rank} got {shared}", flush=True)
        try:
            kd.on_main(refuse)
        except ConfigError as exc:
            print(f"rank {ctx.rank} ConfigError: {exc}", flush=True)
            sys.exit(3)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], cwd: Path) -> list[tuple[int, str, float]]:
    """Run ``python ARGS`` as ranks 0 and 1 of a 2-process gloo job; (exit code, stderr + stdout, seconds) of each.
    A rank still running after :data:`DEADLINE_S` is killed and fails the test."""
    port = _free_port()
    procs = []
    start = time.monotonic()
    for rank in (0, 1):
        env = dict(
            os.environ,
            PYTHONPATH=str(SRC),
            OMP_NUM_THREADS="1",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    out = []
    for rank, proc in enumerate(procs):
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, DEADLINE_S - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.communicate()
            pytest.fail(f"rank {rank} was still waiting {DEADLINE_S}s after the launch")
        out.append((proc.returncode, stderr + stdout, time.monotonic() - start))
    return out


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another run: a process holding the run lock of ``folder`` until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(SRC)!r})
        from kronos.runlock import run_locks
        with run_locks([{str(folder)!r}]):
            print("held", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_on_main_shares_rank0s_text_and_its_error(tmp_path: Path) -> None:
    script = tmp_path / "on_main.py"
    script.write_text(ON_MAIN)
    results = _launch([str(script)], tmp_path)
    for rank, (code, text, _) in enumerate(results):
        assert code == 3, text[-3000:]
        assert f"rank {rank} got picked-on-rank-0" in text
        assert f"rank {rank} ConfigError: config key 'run_id' is refused on rank 0 only" in text  # the same error


@pytest.mark.parametrize("command", ["pipeline", "train-tokenizer"])
def test_a_held_run_lock_ends_every_rank_with_the_lock_message(dataset: Path, tmp_path: Path, command: str) -> None:
    cfg = tiny_config(tmp_path, dataset, run_folders=False)
    cfg.save(tmp_path / "cfg.json")
    owner = _hold_lock(Path(cfg.save_path))
    try:
        argv = ["-m", "kronos.cli", command, "--config-path", str(tmp_path / "cfg.json"), "--cpu"]
        if command == "pipeline":
            argv.append("--skip-data-process")
        results = _launch(argv, REPO)
    finally:
        owner.kill()
        owner.wait()
    messages = []
    for rank, (code, text, seconds) in enumerate(results):
        assert code == 1, text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"pid {owner.pid}" in errors[0] and "is writing into" in errors[0], text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        messages.append(errors[0])
        print(f"{command}: rank {rank} exited {code} after {seconds:.1f}s")
    assert messages[0] == messages[1]  # rank 1 says what stopped rank 0
    assert not (Path(cfg.tokenizer_dir) / "checkpoints").exists()  # stopped before any work
