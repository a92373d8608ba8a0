"""Runs never lose work: guarded output folders, resuming where the checkpoint is, exact stops."""

import csv
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

from certify_fx.errors import RecipeError
from certify_fx.train import Trainer, TrainingInterrupted, load_checkpoint, load_recipe

from conftest import BIN, CLI_ENV, ROOT, run_cli

SMOKE = ROOT / "recipes" / "smoke.yaml"


def _recipe(out, *overrides):
    return load_recipe(SMOKE, [f"output_dir={out}", "data.augment=[crop, flip]", *overrides])


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The smoke recipe with augmentation, trained without a stop: final weights and history."""
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer = Trainer(_recipe(out))
    trainer.fit()
    return out, {k: v.clone() for k, v in trainer.model.state_dict().items()}, trainer.history


def _signal_at(trainer, call: int, sig=signal.SIGINT):
    """Make ``trainer`` receive ``sig`` during its ``call``-th training step."""
    loss_fn, calls = trainer.loss_fn, [0]

    def loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), sig)
        return loss_fn(*args, **kwargs)

    trainer.loss_fn = loss


@pytest.mark.parametrize("sig, at_call, workers", [(signal.SIGINT, 11, 0), (signal.SIGTERM, 5, 2)])
def test_a_signal_mid_epoch_checkpoints_that_step_and_resuming_is_bit_identical(uninterrupted, tmp_path, sig,
                                                                                at_call, workers):
    _, weights, history = uninterrupted
    trainer = Trainer(_recipe(tmp_path))
    _signal_at(trainer, at_call, sig)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit()
    assert stop.value.signal_name == signal.Signals(sig).name and stop.value.step == at_call
    state = load_checkpoint(stop.value.checkpoint)
    assert state["step"] == at_call and state["step"] % state["steps_per_epoch"]  # mid-epoch: no step lost
    # resumed with worker processes: each sample's augmentation is seeded by itself, not by who draws it
    resumed = Trainer(_recipe(tmp_path, f"data.num_workers={workers}"), resume=stop.value.checkpoint)
    assert resumed.step == at_call
    resumed.fit()
    assert _same_weights(resumed.model.state_dict(), weights)
    assert [m["loss"] for m in resumed.history] == [m["loss"] for m in history]
    assert [m["vra"] for m in resumed.history] == [m["vra"] for m in history]


def test_checkpoint_every_steps_bounds_the_work_a_crash_loses(uninterrupted, tmp_path):
    _, weights, _ = uninterrupted
    trainer = Trainer(_recipe(tmp_path, "checkpoint_every_steps=3"))
    loss_fn, calls = trainer.loss_fn, [0]

    def crashes(*args, **kwargs):  # a hard failure, not a signal: no checkpoint on the way out
        calls[0] += 1
        if calls[0] == 14:
            raise MemoryError("simulated crash")
        return loss_fn(*args, **kwargs)

    trainer.loss_fn = crashes
    with pytest.raises(MemoryError):
        trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 12  # the last multiple of 3 before the crash
    resumed = Trainer(_recipe(tmp_path), resume=tmp_path / "checkpoint.pt")
    resumed.fit()
    assert _same_weights(resumed.model.state_dict(), weights)


def test_sigint_to_the_cli_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path):
    augment = ("--set", "data.augment=[crop, flip]")
    reference = tmp_path / "reference"  # the same thread count as the interrupted one: bit-identical
    assert run_cli("train", SMOKE, "--set", f"output_dir={reference}", *augment).returncode == 0
    weights = load_checkpoint(reference / "checkpoint.pt")["model"]
    out = tmp_path / "run"
    cmd = [str(BIN / "certify-fx"), "train", str(SMOKE), "--set", f"output_dir={out}", *augment, "--set",
           "checkpoint_every_steps=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV, cwd=ROOT)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    stopped = [line for line in stdout.splitlines() if line.startswith("stopped by SIGINT after step")]
    assert stopped, stdout
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step  # the step in flight was kept
    assert f"certify-fx train --resume {out / 'checkpoint.pt'}" in stdout

    result = run_cli("train", "--resume", out / "checkpoint.pt")
    assert result.returncode == 0, result.stderr
    assert f"(step {step})" in result.stdout  # resumed from the very step it stopped at
    assert _same_weights(load_checkpoint(out / "checkpoint.pt")["model"], weights)
    assert (out / "log.jsonl").read_text() == (reference / "log.jsonl").read_text().replace(
        str(reference), str(out)) or [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()] == [
        json.loads(x)["loss"] for x in (reference / "log.jsonl").read_text().splitlines()]


def test_training_twice_into_one_folder_never_loses_the_first_run(uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = run_cli("train", SMOKE, "--set", f"output_dir={out}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error:")
    assert "already holds a run" in result.stderr and "--resume" in result.stderr and "--overwrite" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(RecipeError, match="already holds a run"):
        Trainer(load_recipe(SMOKE, [f"output_dir={out}"]))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    (out / "notes.txt").write_text("mine")
    result = run_cli("train", SMOKE, "--set", f"output_dir={out}", "--set", "epochs=1", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and len((out / "log.jsonl").read_text().splitlines()) == 1
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only the run's own files


def test_resume_writes_where_the_checkpoint_is_and_a_finished_run_says_so(uninterrupted, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(uninterrupted[0], moved)
    os.chdir(tmp_path)  # a relative recorded output_dir must not matter either
    try:
        result = run_cli("train", "--resume", moved / "checkpoint.pt", "--set", "epochs=4")
        assert result.returncode == 0, result.stderr
        assert load_checkpoint(moved / "checkpoint.pt")["epoch"] == 4
        assert len((moved / "log.jsonl").read_text().splitlines()) == 4
        assert load_recipe(moved / "recipe.yaml").output_dir == str(moved)
        assert len(list(uninterrupted[0].glob("*.pt"))) == 1  # the original folder was not written to
        assert load_checkpoint(uninterrupted[0] / "checkpoint.pt")["epoch"] == 3
        again = run_cli("train", "--resume", moved / "checkpoint.pt")
        assert again.returncode == 0 and "is complete (4/4 epochs)" in again.stdout
    finally:
        os.chdir(ROOT)


def test_interrupting_before_the_first_step_gives_no_resume_hint(tmp_path):
    trainer = Trainer(load_recipe(SMOKE, [f"output_dir={tmp_path}"]))
    trainer.train_epoch = lambda progress=None: (_ for _ in ()).throw(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert not (tmp_path / "checkpoint.pt").exists()
    # nothing was trained, so the folder holds no run and a new one may start there
    Trainer(load_recipe(SMOKE, [f"output_dir={tmp_path}"]))


def test_summary_csv_has_one_row_per_epoch_with_vra_columns(uninterrupted):
    out, _, history = uninterrupted
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [m["epoch"] for m in history]
    assert float(rows[-1]["vra@0.1"]) == history[-1]["vra"]["0.1"]
    assert float(rows[-1]["clean_accuracy"]) == history[-1]["clean_accuracy"]
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_runs_lists_each_run_with_its_best_vra(uninterrupted, tmp_path):
    from certify_fx.train import find_runs

    shutil.copytree(uninterrupted[0], tmp_path / "a" / "first")
    history = uninterrupted[2]
    runs = find_runs(tmp_path)
    assert [Path(r.path).name for r in runs] == ["first"]
    best = max(history, key=lambda m: m["vra"]["0.1"])
    assert runs[0].best_vra == best["vra"]["0.1"] and runs[0].complete and runs[0].has_checkpoint
    result = run_cli("runs", tmp_path, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)[0]["best_vra"] == best["vra"]["0.1"]
    table = run_cli("runs", tmp_path)
    assert "a/first" in table.stdout and f"{best['vra']['0.1']:.3f}" in table.stdout


def test_tensorboard_scalars_when_tensorboard_is_installed(uninterrupted):
    pytest.importorskip("tensorboard")  # an optional dependency; the test extra installs it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, history = uninterrupted
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    vra = events.Scalars("vra/0.1")
    assert [e.step for e in vra] == [m["epoch"] for m in history]
    assert [e.value for e in vra] == pytest.approx([m["vra"]["0.1"] for m in history])
    assert "clean_accuracy" in events.Tags()["scalars"] and "loss" in events.Tags()["scalars"]


def test_ctrl_c_to_torchrun_stops_both_processes_at_one_step_and_resumes_exactly(tmp_path):
    def torchrun(*args):
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "certify_fx", "train", *args]

    reference = tmp_path / "reference"
    done = subprocess.run(torchrun(str(SMOKE), "--set", f"output_dir={reference}"), capture_output=True, text=True,
                          env=CLI_ENV, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "run"
    proc = subprocess.Popen(torchrun(str(SMOKE), "--set", f"output_dir={out}", "--set", "checkpoint_every_steps=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV, cwd=ROOT)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # torchrun passes it on to both workers
    stdout, _ = proc.communicate(timeout=300)
    assert stdout.count("stopped by SIGINT after step") == 1  # rank 0 reports, once
    state = load_checkpoint(out / "checkpoint.pt")
    assert len(state["processes"]) == 2  # both processes' random state and progress
    done = subprocess.run(torchrun("--resume", str(out / "checkpoint.pt")), capture_output=True, text=True,
                          env=CLI_ENV, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"(step {state['step']})" in done.stdout
    assert _same_weights(load_checkpoint(out / "checkpoint.pt")["model"], load_checkpoint(reference / "checkpoint.pt")["model"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_with_data_workers_stops_cleanly(tmp_path, sig):
    # a terminal's Ctrl-C (or a batch scheduler's SIGTERM) reaches the data-loader workers too; the trainer
    # still stops at a step boundary with a checkpoint
    out = tmp_path / "run"
    cmd = [str(BIN / "certify-fx"), "train", str(SMOKE), "--set", f"output_dir={out}", "--set",
           "data.augment=[crop, flip]", "--set", "data.num_workers=2", "--set", "checkpoint_every_steps=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV, cwd=ROOT,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=300)
    said = f"stopped by {sig.name} after step "
    assert proc.returncode == 130 and said in stdout, stderr[-2000:]
    assert "Traceback" not in stderr and "exited unexpectedly" not in stderr
    step = int(stdout.split(said)[1].split(";")[0])
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step
    assert run_cli("train", "--resume", out / "checkpoint.pt").returncode == 0
    # the same run without workers and never stopped (one thread each, as the CLI runs): the same weights
    reference = tmp_path / "reference"
    assert run_cli("train", SMOKE, "--set", f"output_dir={reference}", "--set", "data.augment=[crop, flip]").returncode == 0
    assert _same_weights(load_checkpoint(out / "checkpoint.pt")["model"], load_checkpoint(reference / "checkpoint.pt")["model"])


def test_a_process_holding_data_workers_still_exits(tmp_path):
    # multiprocessing ends daemon workers with SIGTERM at exit and then waits for them: a worker that
    # ignored it would hang the interpreter forever (as it once hung this test suite after its last test)
    script = tmp_path / "holds_workers.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from certify_fx.train.interrupt import leave_stops_to_the_trainer\n"
        "loader = DataLoader(TensorDataset(torch.arange(100.0)), batch_size=10, num_workers=2,\n"
        "                    persistent_workers=True, worker_init_fn=leave_stops_to_the_trainer)\n"
        "held = iter(loader)\n"
        "next(held)\n"
        "print('holding', flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert done.returncode == 0 and "holding" in done.stdout, done.stderr[-2000:]

