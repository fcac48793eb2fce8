"""The fault-injection suite (issue 29, docs/reliability.md): faults are injected into the real code paths
(tests/faults.py patches them in from outside) and each test checks that nothing is lost: a full disk, a read-only
directory and a denied permission are one clear error that names the newest intact checkpoint, with no temporary
files left and exact resumption afterwards; a second writer is refused with the holder's pid and a killed holder
blocks nobody; non-finite losses are stopped, skipped or rolled back (and a rollback resumes exactly); a dying rank
ends the job at once with an intact checkpoint; damaged shards are named before training. The chaos loops (many
random SIGKILLs) are marked slow."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faults import install
from safetensors.torch import load_file
from test_train import cli, corpus, metrics, overrides  # noqa: F401  (corpus is a fixture)

from helmlm.config import load_train_config
from helmlm.data.shards import prepare_data, verify_shards
from helmlm.errors import DataError, NonFiniteLossError, StorageError
from helmlm.storage import OWNER_FILE, check_free_space, disk_errors, exclusive
from helmlm.training.checkpoint import latest_checkpoint, verify_checkpoint
from helmlm.training.optim import lr_multiplier
from helmlm.training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def run_config(corpus: Path, out: Path, *extra: str):  # noqa: F811
    """12 steps of the tiny test model, a checkpoint every 4 (all kept)."""
    return load_train_config(None, overrides(corpus, out, "checkpoint.keep_last=10", *extra))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{k}": v for name in ("model.safetensors", "optimizer.safetensors")
            for k, v in load_file(checkpoint / name).items()}


def assert_identical(a: Path, b: Path) -> None:
    """The final checkpoints of runs ``a`` and ``b``: same step, and every tensor (weights, optimizer state, RNG)
    bit for bit."""
    ca, cb = latest_checkpoint(a), latest_checkpoint(b)
    assert ca.name == cb.name
    wa, wb = weights(ca), weights(cb)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def no_temporaries(run: Path) -> bool:
    return not [p for p in run.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:  # noqa: F811
    """An uninterrupted 12-step run: what every interrupted run must end identical to."""
    out = tmp_path_factory.mktemp("straight")
    train(run_config(corpus, out))
    return out


def hold(directory: Path, side: bool = False) -> subprocess.Popen:
    """Another process holding ``directory``'s one-writer lock (until killed)."""
    code = ("import sys, time; from helmlm.storage import exclusive\n"
            f"with exclusive({str(directory)!r}, 'a test', side={side}):\n"
            "    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# ------------------------------------------------------------------------------------------------ one writer


def test_a_second_writer_is_refused_with_the_pid_and_a_killed_holder_blocks_nobody(tmp_path):
    holder = hold(tmp_path / "run")
    try:
        with pytest.raises(StorageError, match=f"run is in use by pid {holder.pid} "):
            with exclusive(tmp_path / "run", "this run"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive(tmp_path / "run", "this run"):  # the kernel dropped the dead holder's lock
        assert json.loads((tmp_path / "run" / OWNER_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / OWNER_FILE).exists()
    # a lock that wrote nothing leaves nothing: no directory it created, no lock file beside an export's target
    with exclusive(tmp_path / "fresh" / "dir", "x"), exclusive(tmp_path / "model", "y", side=True):
        pass
    assert not (tmp_path / "fresh" / "dir").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "run"]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "helmlm", "train", *args], cwd=ROOT, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None and time.time() < deadline, "the run ended (or stalled) before the condition held"
        time.sleep(0.05)


def _owner_pid(run: Path) -> int | None:
    try:
        return json.loads((run / OWNER_FILE).read_text())["pid"]
    except (OSError, ValueError):
        return None


def test_two_trainers_on_one_out_dir(corpus, tmp_path):  # noqa: F811
    """The issue's cases from the command line: a second run started before the first checkpoint exists, and a
    second --resume of a running run, are refused with the writer's pid (exit 2, no traceback); the second round
    starts over the first round's killed writer: its lock blocks nobody."""
    run = tmp_path / "run"
    prepare_data(run_config(corpus, tmp_path / "x").data, progress=False)
    for every, second_args in ((100_000, ()), (2, ("--resume",))):
        args = overrides(corpus, run, "train.steps=100000", f"checkpoint.every={every}", "log.every=1000")
        first = _start(args)  # the second round starts over a killed writer's lock and its leftovers
        try:
            _wait_for(lambda: _owner_pid(run) == first.pid and (every > 2 or latest_checkpoint(run)), first)
            second = cli("train", *args, *second_args)
            assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
            assert f"error: {run} is in use by pid {first.pid} " in second.stderr, second.stderr[-2000:]
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        if every > 2:
            shutil.rmtree(run / "checkpoints", ignore_errors=True)


def test_prepare_sweep_and_export_take_the_lock(corpus, tmp_path, straight):  # noqa: F811
    from helmlm.training.export import export_checkpoint
    from helmlm.training.sweep import Sweep, SweepSpec

    data = run_config(corpus, tmp_path).data
    data.dir = str(tmp_path / "data")
    sweep = SweepSpec(recipe="tiny", models=["llama_tiny"], lr=[3e-3], embedding_lr=[None], seeds=[0],
                      out_dir=str(tmp_path / "sweep"))
    cases = [(tmp_path / "data", False, lambda: prepare_data(data, progress=False)),
             (tmp_path / "sweep", False, lambda: Sweep(sweep, log=lambda m: None).run()),
             (tmp_path / "model", True, lambda: export_checkpoint(straight, tmp_path / "model"))]
    for directory, side, work in cases:
        holder = hold(directory, side)
        try:
            with pytest.raises(StorageError, match=f"in use by pid {holder.pid}"):
                work()
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    assert not (tmp_path / "model").exists() and not (tmp_path / "data" / "manifest.json").exists()
    export_checkpoint(straight, tmp_path / "model")  # free again
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------------------------ disk faults


def test_disk_faults_become_one_message(tmp_path):
    with pytest.raises(StorageError) as err:
        with disk_errors("checkpoint step 8", tmp_path, needed=5_000_000, then="continue with --resume"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value).startswith(f"cannot write checkpoint step 8 in {tmp_path}: no space left on the device "
                                      "(it needs 5.0 MB, ")
    assert " free). Free some space" in str(err.value) and str(err.value).endswith("; continue with --resume")
    with pytest.raises(StorageError, match="the file system is read-only. Make the directory writable"):
        with disk_errors("x", tmp_path):  # safetensors' and tokenizers' Rust errors carry the errno in the text
            raise Exception('Error while serializing: I/O error: Read-only file system (os error 30) at path "x"')
    for other in (FileNotFoundError(errno.ENOENT, "gone"), ValueError("not a disk fault")):
        with pytest.raises(type(other)):
            with disk_errors("x", tmp_path):
                raise other
    with pytest.raises(StorageError, match=r"it needs [\d.]+ TB and the disk has [\d.]+ .B free; nothing was"):
        check_free_space(tmp_path, 1 << 60, "a huge file")


@pytest.mark.parametrize("fault", ["enospc_save", "eacces_save"])
def test_a_disk_fault_mid_checkpoint_loses_nothing(corpus, tmp_path, straight, monkeypatch, fault):  # noqa: F811
    """The model file of the step-8 checkpoint fails halfway (a full disk, a denied permission): one error naming
    the step-4 checkpoint, no temporary directory, step 4 intact; resumed, the run ends identical to ``straight``."""
    install({fault: 3}, monkeypatch.setattr)  # files: step 4 model, step 4 optimizer, step 8 model
    run = tmp_path / "run"
    with pytest.raises(StorageError) as err:
        train(run_config(corpus, run))
    message = str(err.value)
    assert message.startswith(f"cannot write checkpoint step 8 in {run / 'checkpoints'}: ")
    assert ("no space left on the device (it needs" in message) if fault == "enospc_save" else \
        ("permission denied. Make the directory writable" in message)
    assert message.endswith(f"the newest is {run / 'checkpoints' / 'step-00000004'}; continue from it with the same "
                            "command and --resume")
    assert no_temporaries(run) and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest",
                                                                                             "step-00000004"]
    verify_checkpoint(run / "checkpoints" / "step-00000004")
    monkeypatch.undo()
    train(run_config(corpus, run), resume=True)
    assert_identical(straight, run)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_in_prepare_export_and_sweep_leaves_nothing(corpus, tmp_path, straight, monkeypatch):  # noqa: F811
    """The other writers: preparation keeps what it flushed and resumes to the same shards; an export leaves no
    target, temporary directory or lock; a sweep leaves no directory."""
    import helmlm.data.shards as shards
    from helmlm.models.modeling import HELMForCausalLM
    from helmlm.training.export import export_checkpoint
    from helmlm.training.sweep import Sweep, SweepSpec

    data = run_config(corpus, tmp_path).data
    data.dir, data.shard_tokens, data.batch_documents = str(tmp_path / "data"), 10_000, 50
    bins = []

    class FullDisk:  # a file on a disk that fills halfway through the write
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, blob):
            self.file.write(blob[: len(blob) // 2])
            _enospc()

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):  # the third shard's tokens hit the full disk
        if ".bin.tmp" in str(path):
            bins.append(path)
            if len(bins) == 3:
                return FullDisk(path, mode)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(shards, "open", open_on_a_filling_disk, raising=False)  # shards' own open, nobody else's
    with pytest.raises(StorageError, match=r"cannot write shard train-00001 in .*data: no space left on the device.*"
                                           r"what was flushed so far is kept: run the same command again"):
        prepare_data(data, progress=False)
    assert no_temporaries(tmp_path / "data") and not (tmp_path / "data" / ".helmlm.lock").exists()
    monkeypatch.undo()
    prepare_data(data, progress=False)
    verify_shards(tmp_path / "data")
    clean = run_config(corpus, tmp_path).data
    clean.dir, clean.shard_tokens, clean.batch_documents = str(tmp_path / "clean"), 10_000, 50
    prepare_data(clean, progress=False)
    for name in sorted(p.name for p in (tmp_path / "clean").glob("*-0000*")):
        assert (tmp_path / "data" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name

    monkeypatch.setattr(HELMForCausalLM, "save_pretrained", _enospc)
    with pytest.raises(StorageError, match="cannot write the model directory model in .*: no space left.*nothing "
                                           "was written to"):
        export_checkpoint(straight, tmp_path / "model")
    assert not [p for p in tmp_path.iterdir() if "model" in p.name]

    real_write_text = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: _enospc() if self.name.startswith("sweep.json")
                        else real_write_text(self, *a, **k))
    sweep = SweepSpec(recipe="tiny", models=["llama_tiny"], lr=[3e-3], embedding_lr=[None], seeds=[0],
                      out_dir=str(tmp_path / "sweep"))
    with pytest.raises(StorageError, match=r"cannot write sweep.json in .*sweep: no space left"):
        Sweep(sweep, log=lambda m: None).run()
    assert not (tmp_path / "sweep").exists()


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(corpus, tmp_path, monkeypatch):  # noqa: F811
    import helmlm.storage

    trainer = Trainer(run_config(corpus, tmp_path / "run", "train.steps=4"))
    monkeypatch.setattr(helmlm.storage, "free_bytes", lambda path: 1000)
    with pytest.raises(StorageError, match=r"cannot write checkpoint step 4 in .*run: it needs [\d.]+ MB and the disk "
                                           r"has 1\.0 kB free; nothing was written.*start it again"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoints").exists() and no_temporaries(tmp_path / "run")


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_a_real_full_disk_and_a_read_only_one_from_the_command_line(corpus, tmp_path, straight):  # noqa: F811
    """The issue's case: out_dir on a tmpfs with room for one checkpoint and a half. The second checkpoint is an
    error (exit 2, no traceback, no temporary directory); the disk made read-only, --resume says so; given room,
    --resume ends byte-identical to the uninterrupted run."""
    size = sum(f.stat().st_size for f in (straight / "checkpoints" / "step-00000004").iterdir())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(size * 1.6) + 200_000):
        pytest.skip("cannot mount a tmpfs here")
    try:
        args = overrides(corpus, disk / "run", "checkpoint.keep_last=10")
        full = cli("train", *args)
        assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
        error = full.stderr.strip().splitlines()[-1]
        assert error.startswith(f"error: cannot write checkpoint step 8 in {disk / 'run'}"), error
        assert "step-00000004" in error and "--resume" in error
        assert no_temporaries(disk / "run")
        verify_checkpoint(disk / "run" / "checkpoints" / "step-00000004")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        readonly = cli("train", *args, "--resume")
        assert readonly.returncode == 2 and "the file system is read-only" in readonly.stderr, readonly.stderr[-2000:]
        subprocess.run(["mount", "-o", f"remount,rw,size={4 * size + 1_000_000}", str(disk)], check=True)
        resumed = cli("train", *args, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert_identical(straight, disk / "run")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ------------------------------------------------------------------------------------------------ non-finite


def nonfinite_events(run: Path) -> list[dict]:
    return metrics(run, "nonfinite")


def test_on_nonfinite_stop_records_the_event_and_names_the_last_checkpoint(corpus, tmp_path, monkeypatch):  # noqa: F811
    install({"nan_rows": [26]}, monkeypatch.setattr)  # 4 rows a step: row 26 is read at step 7
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 7;.*step-00000004"):
        train(run_config(corpus, tmp_path / "run"))
    assert [(e["step"], e["action"], e["rows"]) for e in nonfinite_events(tmp_path / "run")] == [(7, "stop", [24, 28])]


def test_on_nonfinite_skip(corpus, tmp_path, monkeypatch):  # noqa: F811
    install({"nan_rows": [26]}, monkeypatch.setattr)
    train(run_config(corpus, tmp_path / "run", "train.on_nonfinite=skip"))
    assert [(e["step"], e["action"], e["in_a_row"]) for e in nonfinite_events(tmp_path / "run")] == [(7, "skip", 1)]
    steps = [r["step"] for r in metrics(tmp_path / "run")]
    assert steps == list(range(1, 13))  # 12 optimizer steps, the skipped batch not among them
    state = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert state["data_position"] == 13 * 4
    monkeypatch.undo()
    install({"nan_from_step": 5}, monkeypatch.setattr)  # never recovers: stops after max_nonfinite in a row
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row at step 5 .train.max_nonfinite=2"):
        train(run_config(corpus, tmp_path / "bad", "train.on_nonfinite=skip", "train.max_nonfinite=2"))
    assert [e["action"] for e in nonfinite_events(tmp_path / "bad")] == ["skip", "skip", "stop"]


def test_on_nonfinite_rollback_and_exact_resume_across_it(corpus, tmp_path, monkeypatch):  # noqa: F811
    """A poisoned batch at step 7: back to step 4, past the 12 rows read since; a run killed after the rollback and
    resumed from step 4 rolls back the same way and ends bit-identical."""
    install({"nan_rows": [26]}, monkeypatch.setattr)
    a = tmp_path / "a"
    train(run_config(corpus, a, "train.on_nonfinite=rollback"))
    events = nonfinite_events(a)
    assert [(e["step"], e["action"], e["to_step"], e["skipped_rows"], e["lr_scale"]) for e in events] == \
        [(7, "rollback", 4, 12, 0.5)]
    records = metrics(a)
    assert [r["step"] for r in records] == list(range(1, 13))  # the abandoned steps 5-6 are dropped
    t = run_config(corpus, a).train
    assert records[4]["lr"] == pytest.approx(0.5 * t.lr * lr_multiplier(4, t.steps, t.resolved_warmup(),
                                                                         t.min_lr_ratio), rel=1e-12)
    assert json.loads((latest_checkpoint(a) / "state.json").read_text())["data_position"] == (12 + 3) * 4
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for later in ("step-00000008", "step-00000012"):
        shutil.rmtree(b / "checkpoints" / later)
    (b / "checkpoints" / "latest").write_text("step-00000004\n")
    train(run_config(corpus, b, "train.on_nonfinite=rollback"), resume=True)
    assert_identical(a, b)
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in metrics(b)]


def test_a_second_failure_goes_further_back_and_a_kill_after_it_resumes_exactly(corpus, tmp_path):  # noqa: F811
    """Poisoned rows at steps 7 and (after the first rollback) 7 again: back to step 4, then to step 0 (the newest
    checkpoint may hold the diverging state), each time at half the lr before. A run SIGKILLed after the second
    rollback resumes from the rewritten step-0 checkpoint and ends bit-identical to the run left alone."""
    faults = {"nan_rows": [26, 38]}
    args = overrides(corpus, tmp_path / "a", "train.on_nonfinite=rollback", "checkpoint.keep_last=10")
    env = {"HELMLM_FAULTS": json.dumps(faults), "PYTHONPATH": str(TESTS)}
    a = subprocess.run([sys.executable, str(TESTS / "faults.py"), "train", *args], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert a.returncode == 0, a.stderr[-2000:]
    events = [(e["step"], e["to_step"], e["skipped_rows"], e["lr_scale"]) for e in nonfinite_events(tmp_path / "a")]
    assert events == [(7, 4, 12, 0.5), (7, 0, 40, 0.25)]
    assert json.loads((latest_checkpoint(tmp_path / "a") / "state.json").read_text())["data_position"] == 40 + 48
    args_b = overrides(corpus, tmp_path / "b", "train.on_nonfinite=rollback", "checkpoint.keep_last=10")
    b = subprocess.run([sys.executable, str(TESTS / "faults.py"), "train", *args_b], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env,
                                      "HELMLM_FAULTS": json.dumps({**faults, "kill_rows": [62]})})
    assert b.returncode == -signal.SIGKILL
    state = json.loads((latest_checkpoint(tmp_path / "b") / "state.json").read_text())
    assert (state["step"], state["data_position"], state["recovery"]["lr_scale"]) == (4, 56, 0.25)
    resumed = cli("train", *args_b, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_identical(tmp_path / "a", tmp_path / "b")


def test_rollback_before_any_checkpoint_and_one_that_cannot_recover(corpus, tmp_path, monkeypatch):  # noqa: F811
    install({"nan_rows": [5]}, monkeypatch.setattr)  # step 2, before the first scheduled checkpoint
    train(run_config(corpus, tmp_path / "early", "train.on_nonfinite=rollback"))
    assert [(e["step"], e["to_step"]) for e in nonfinite_events(tmp_path / "early")] == [(2, 0)]
    monkeypatch.undo()
    install({"nan_from_step": 6}, monkeypatch.setattr)
    with pytest.raises(NonFiniteLossError, match="3 rollbacks without getting past step 6 at step 6"):
        train(run_config(corpus, tmp_path / "bad", "train.on_nonfinite=rollback", "train.max_nonfinite=2"))
    assert [e["action"] for e in nonfinite_events(tmp_path / "bad")] == ["rollback", "rollback", "stop"]


# ------------------------------------------------------------------------------------------------ a dying rank


def torchrun(args: list[str], faults: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HELMLM_FAULTS": json.dumps(faults or {}),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29700 + os.getpid() % 200), str(TESTS / "faults.py"), "train", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_a_dying_rank_ends_the_job_and_resume_continues_exactly(corpus, tmp_path, strategy):  # noqa: F811
    """Rank 1 SIGKILLed mid-step 6 (after its forward pass, while rank 0 waits in the all-reduce): the job ends
    within seconds with one message from rank 0 naming the step-4 checkpoint, which is intact; resumed, it ends
    bit-identical to an uninterrupted 2-process run."""
    common = overrides(corpus, tmp_path, "train.steps=8", "train.micro_batch=2", f"train.strategy={strategy}",
                       "checkpoint.keep_last=10")
    a, b = tmp_path / "a", tmp_path / "b"
    assert torchrun([*common, f"out_dir={a}"]).returncode == 0
    stamp = tmp_path / "killed"
    dead = torchrun([*common, f"out_dir={b}"], {"kill_rank": 1, "kill_step": 6, "kill_stamp": str(stamp)},
                    timeout=120)
    seconds = time.time() - float(stamp.read_text())
    assert dead.returncode != 0
    assert "error: lost another rank during step 6 (" in dead.stderr, dead.stderr[-3000:]
    assert f"the newest checkpoint is {b / 'checkpoints' / 'step-00000004'}: continue" in dead.stderr
    assert seconds < 20, seconds  # a hang would end only at torchrun's or gloo's timeouts (30 s / 30 min)
    verify_checkpoint(b / "checkpoints" / "step-00000004")
    assert no_temporaries(b)
    assert torchrun([*common, f"out_dir={b}", "--resume"]).returncode == 0
    assert_identical(a, b)


# ------------------------------------------------------------------------------------------------ damaged data


def test_damaged_shards_are_refused_before_training(corpus, tmp_path):  # noqa: F811
    config = run_config(corpus, tmp_path / "run")
    data = tmp_path / "data"
    shutil.copytree(prepare_data(config.data, progress=False), data)
    shard = data / "train-00000.bin"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped bit pattern, same size: only the hash can tell
    shard.write_bytes(bytes(blob))
    result = cli("train", *overrides(corpus, tmp_path / "run"), f"data.dir={data}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {shard} is altered: its sha256 differs from the manifest's; delete {data}" in result.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match="altered"):
        verify_shards(data)


# ------------------------------------------------------------------------------------------------ chaos


@pytest.mark.slow
def test_chaos_loop_of_random_kills_and_full_disks_ends_identical(corpus, tmp_path):  # noqa: F811
    """scripts/chaos.py with a short schedule: SIGKILLs at random steps and inside checkpoint writes, and full
    disks mid-write, each followed by --resume; the run ends bit-identical to the uninterrupted one; and two
    torchrun jobs that lose a random rank resume to the uninterrupted job's weights."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--faults", "8", "--steps", "80",
                             "--rank-deaths", "2",
                             "--seed", "3", "--out", str(tmp_path / "chaos"), "--corpus", str(corpus)],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])["summary"]
    assert summary["identical"] and summary["intact_after_every_fault"] and not summary["leftover_temporaries"]
    assert summary["faults"] == 10 and summary["enospc_clear_errors"] == summary["enospc"]
    assert summary["rank_deaths_identical"] == summary["rank_deaths_clear_error"] == 2


def test_sigterm_unwinds_a_run_and_leaves_the_handler_as_it_was(corpus, tmp_path):  # noqa: F811
    """SIGTERM inside a step becomes an error naming the newest checkpoint (no temporary files); afterwards, in a
    single process, SIGTERM's handler is the one from before (a notebook must not be left deaf to it)."""
    from helmlm.errors import TrainingError

    trainer = Trainer(run_config(corpus, tmp_path / "run"))
    step = trainer.train_step

    def step_then_sigterm():
        metrics = step()
        if trainer.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    trainer.train_step = step_then_sigterm
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingError, match="^stopped by SIGTERM during step 7; the newest checkpoint is .*"
                                            "step-00000004: continue with the same command and --resume$"):
        trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is before and no_temporaries(tmp_path / "run")
