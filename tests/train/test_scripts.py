"""The seed's training scripts as users run them: torchrun DDP over two gloo processes, kill -9 then --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _support.models import save_tiny_pair
from _support.training import PYTHON, REPO, tiny_config
from kronos.config import Config
from kronos.model import build_predictor
from kronos.train import train_predictor, train_tokenizer

pytestmark = pytest.mark.slow  # end-to-end / subprocess tests: `make test-fast` skips them

# Runs a finetune script in-process after patching the trainer (test-side hooks only): it can record the window
# indices each rank trains on, and SIGKILL itself inside the n-th write of checkpoints/last/.
DRIVER = textwrap.dedent(
    """
    import json, os, runpy, signal, sys
    from pathlib import Path
    import kronos.io as kio
    from kronos.train import trainer

    out = os.environ.get("TEST_SAMPLES_DIR")
    if out:
        orig_setup = trainer.Trainer.setup
        def setup(self, *args, **kwargs):
            orig_setup(self, *args, **kwargs)
            base = type(self.train_sampler)
            class Recording(base):
                def __iter__(self):
                    indices = list(base.__iter__(self))
                    with open(Path(out) / f"rank{os.environ.get('RANK', '0')}.jsonl", "a") as f:
                        f.write(json.dumps(indices) + "\\n")
                    return iter(indices)
            self.train_sampler.__class__ = Recording
        trainer.Trainer.setup = setup

    kill_write = int(os.environ.get("TEST_KILL_IN_WRITE", "0"))
    if kill_write:
        orig_write = kio.write_folder
        calls = {"n": 0}
        def write(target, fill):
            if Path(target).name == "last":
                calls["n"] += 1
                if calls["n"] == kill_write:
                    def killing_fill(folder):
                        fill(folder)
                        os.kill(os.getpid(), signal.SIGKILL)  # folder written, not yet renamed into place
                    return orig_write(target, killing_fill)
            return orig_write(target, fill)
        kio.write_folder = write

    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` would
    runpy.run_path(script, run_name="__main__")
    """
)


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # shared test machine: no OpenMP spin-waiting on oversubscribed cores
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    env.update(extra)
    return env


def _run(args: list, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PYTHON), *map(str, args)], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses (OMP_NUM_THREADS=1)
    yield
    torch.set_num_threads(before)


def _write_config(path: Path, config: Config) -> Path:
    config.save(path)
    return path


def _same_safetensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and (ta[k] == tb[k]).all() for k in ta)


def test_torchrun_two_gloo_processes_split_the_samples(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, dataset, epochs=1, n_train_iter=16 * 6)
    cfg_path = _write_config(tmp_path / "cfg.json", cfg)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    samples = tmp_path / "samples"
    samples.mkdir()
    proc = _run(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            driver,
            REPO / "finetune" / "train_tokenizer.py",
            "--config-path",
            cfg_path,
            "--cpu",
        ],
        cwd=REPO,
        timeout=180,
        TEST_SAMPLES_DIR=str(samples),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((Path(cfg.tokenizer_dir) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["device"] == "cpu"
    # 96 samples over 2 ranks -> 48 per rank -> 3 steps of 16 per rank.
    assert summary["steps_per_epoch"] == 3 and summary["global_step"] == 3
    seen = {}
    for rank in (0, 1):
        epochs = [json.loads(line) for line in (samples / f"rank{rank}.jsonl").read_text().splitlines()]
        assert len(epochs) == 1 and len(epochs[0]) == 48  # one epoch of this rank's windows
        seen[rank] = set(epochs[0])
    assert len(seen[0]) == 48 and len(seen[1]) == 48
    assert not seen[0] & seen[1]  # ranks train on disjoint windows
    assert (Path(cfg.tokenizer_dir) / "checkpoints" / "best_model" / "model.safetensors").exists()
    assert (Path(cfg.tokenizer_dir) / "checkpoints" / "last" / "rng_rank1.safetensors").exists()


def test_kill_9_then_resume_reproduces_the_uninterrupted_run_bit_exactly(dataset: Path, tmp_path: Path) -> None:
    # The predictor starts from a pretrained folder with dropout and uses the released scripts' sampled sibling
    # (Q13), so both dropout masks and multinomial draws must continue exactly from the restored RNG states.
    tok_cfg = tiny_config(tmp_path, dataset, epochs=1)
    train_tokenizer(tok_cfg)
    pretrained = tmp_path / "pretrained_predictor"
    build_predictor(
        "tiny", attn_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1, token_dropout_p=0.1
    ).save_pretrained(pretrained)
    common = dict(
        epochs=2,
        checkpoint_interval=3,
        teacher_forcing=False,
        pretrained_predictor_path=str(pretrained),
        finetuned_tokenizer_path=str(Path(tok_cfg.finetuned_tokenizer)),
    )
    reference = train_predictor(tiny_config(tmp_path / "ref", dataset, **common))

    cfg = tiny_config(tmp_path / "run", dataset, **common)
    cfg_path = _write_config(tmp_path / "cfg.json", cfg)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # 8 steps per epoch; last/ is written after steps 3, 6 and at the epoch end (8). kill -9 strikes inside the
    # epoch-end write, after its files exist but before the folder swap: the step-6 checkpoint must survive.
    killed = _run(
        [driver, REPO / "finetune" / "train_predictor.py", "--config-path", cfg_path, "--cpu"],
        cwd=REPO,
        TEST_KILL_IN_WRITE="3",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = Path(cfg.predictor_dir) / "checkpoints" / "last"
    state = json.loads((last / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (6, 0, 6)
    assert not (Path(cfg.predictor_dir) / "summary.json").exists()

    # Resume with the CPU script, run from finetune/ (the seed's documented working directory).
    resumed = _run(["train_predictor_cpu.py", "--config-path", cfg_path, "--resume"], cwd=REPO / "finetune")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((Path(cfg.predictor_dir) / "summary.json").read_text())
    assert summary["global_step"] == reference["global_step"] == 16
    assert summary["best_val_loss"] == reference["best_val_loss"]
    ref_last = Path(reference["last_checkpoint"])
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert _same_safetensors(last / name, ref_last / name), name
    assert _same_safetensors(
        Path(summary["best_model"]) / "model.safetensors", Path(reference["best_model"]) / "model.safetensors"
    )
    assert not list(last.parent.glob(".last.tmp-*"))  # the killed run's temp folder was cleaned up

    # The resumed metrics log continues the interrupted one: same rows, no duplicates.
    def rows(stage_dir: Path) -> list:
        lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in map(json.loads, lines)]

    assert rows(Path(cfg.predictor_dir)) == rows(ref_last.parents[1])


def test_script_reports_config_errors_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"batch_sise": 4}))
    proc = _run([REPO / "finetune" / "train_tokenizer.py", "--config-path", bad], cwd=REPO, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "batch_sise" in lines[0] and "batch_size" in lines[0]


def test_torchrun_lora_over_two_gloo_processes(dataset: Path, tmp_path: Path) -> None:
    """LoRA under DDP: only the adapters train, best_model is a plain official-format checkpoint (freeze is the
    same DDP path with fewer trainable weights: tests/train/test_finetune_modes.py)."""
    mode = "lora"
    from kronos.model import Kronos

    pretrained = tmp_path / "pretrained"
    save_tiny_pair(pretrained / "tokenizer", pretrained / "predictor", seed=3)
    cfg = tiny_config(
        tmp_path,
        dataset,
        epochs=1,
        n_train_iter=16 * 4,
        finetune_mode=mode,
        freeze_layers=1,
        lora_rank=2,
        finetune_tokenizer=False,
        pretrained_tokenizer_path=str(pretrained / "tokenizer"),
        pretrained_predictor_path=str(pretrained / "predictor"),
    )
    train_tokenizer(cfg)  # finetune_tokenizer false: the pretrained tokenizer is the run's
    cfg_path = _write_config(tmp_path / "cfg.json", cfg)
    proc = _run(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            REPO / "finetune" / "train_predictor.py",
            "--config-path",
            cfg_path,
            "--cpu",
        ],
        cwd=REPO,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((Path(cfg.predictor_dir) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    assert 0 < summary["trainable_parameters"] < summary["parameters"]
    start = Kronos.from_pretrained(pretrained / "predictor").state_dict()
    best = Kronos.from_pretrained(cfg.finetuned_predictor).state_dict()
    assert best.keys() == start.keys()
    assert any(not torch.equal(best[k], start[k]) for k in start)
    assert (Path(cfg.predictor_dir) / "checkpoints" / "last" / "adapter.safetensors").exists()
