"""The trainer: 1 vs 2 processes (torchrun, gloo), kill + resume, checkpoints, CLI errors."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from certify_fx.errors import CheckpointError, RecipeError
from certify_fx.train import Trainer, load_checkpoint, load_recipe, save_checkpoint, train

from conftest import BIN, CLI_ENV, ROOT, run_cli

SMOKE = ROOT / "recipes" / "smoke.yaml"


def _weights(path):
    return load_checkpoint(path)["model"]


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The smoke recipe, uninterrupted, in one process."""
    out = tmp_path_factory.mktemp("single")
    result = run_cli("train", SMOKE, "--set", f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    return out


def test_single_process_run_writes_log_checkpoint_and_recipe(single_run):
    lines = [json.loads(line) for line in (single_run / "log.jsonl").read_text().splitlines()]
    recipe = load_recipe(SMOKE)
    assert [m["epoch"] for m in lines] == list(range(1, recipe.epochs + 1))
    last = lines[-1]
    assert {"loss", "clean_accuracy", "vra", "K", "K_estimate", "seconds", "lr", "eps_train"} <= set(last)
    assert last["sound"] and 0 <= last["vra"]["0.1"] <= last["clean_accuracy"] <= 1
    assert last["clean_accuracy"] > 0.5  # the synthetic task is learnable in 3 short epochs
    state = load_checkpoint(single_run / "checkpoint.pt")
    assert state["epoch"] == recipe.epochs and state["recipe"]["model"]["name"] == recipe.model.name
    assert any(k.startswith("iterate_") for k in state["bound"])  # power-iteration state is kept
    assert load_recipe(single_run / "recipe.yaml") == load_recipe(SMOKE, [f"output_dir={single_run}"])
    assert not list(single_run.glob(".*"))  # no temporary files left behind


def test_two_gloo_processes_match_one(single_run, tmp_path):
    out = tmp_path / "ddp"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "certify_fx", "train",
           str(SMOKE), "--set", f"output_dir={out}"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=CLI_ENV, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir() if p.name != "tensorboard")  # only rank 0 writes
    assert files == ["checkpoint.pt", "log.jsonl", "recipe.yaml", "summary.csv"]
    assert result.stdout.count("certify-fx train:") == 1  # only rank 0 prints
    assert _max_diff(_weights(out / "checkpoint.pt"), _weights(single_run / "checkpoint.pt")) < 1e-4
    one = [json.loads(x) for x in (single_run / "log.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(one) == len(two)
    for a, b in zip(one, two):  # metrics are all-reduced over both processes
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["clean_accuracy"] == b["clean_accuracy"]


def test_kill_mid_epoch_then_resume_matches_the_uninterrupted_run(single_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "certify-fx"), "train", str(SMOKE), "--set", f"output_dir={out}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CLI_ENV, cwd=ROOT)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.2)  # now inside epoch 2 (an epoch takes about a second)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out / "checkpoint.pt")["epoch"]
    assert killed_at < load_recipe(SMOKE).epochs, "the run finished before it could be killed"
    assert len((out / "log.jsonl").read_text().splitlines()) == killed_at

    result = run_cli("train", SMOKE, "--set", f"output_dir={out}", "--resume", out / "checkpoint.pt")
    assert result.returncode == 0, result.stderr
    assert f"resumed after epoch {killed_at}" in result.stdout
    assert _max_diff(_weights(out / "checkpoint.pt"), _weights(single_run / "checkpoint.pt")) == 0.0
    a = load_checkpoint(out / "checkpoint.pt")
    b = load_checkpoint(single_run / "checkpoint.pt")
    assert all(torch.equal(a["bound"][k], b["bound"][k]) for k in a["bound"])
    assert (out / "log.jsonl").read_text().count("\n") == a["epoch"]
    assert [m["loss"] for m in a["history"]] == [m["loss"] for m in b["history"]]


def test_resume_without_the_recipe_uses_the_checkpoints(single_run, tmp_path):
    result = run_cli("train", "--resume", single_run / "checkpoint.pt", "--set", f"output_dir={tmp_path}",
                  "--set", "epochs=4")
    assert result.returncode == 0, result.stderr
    assert "resumed after epoch 3" in result.stdout and load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 4
    assert "differs from the checkpoint's in epochs" in result.stdout  # a longer schedule is a different run


def test_corrupt_checkpoint_is_one_clear_line(single_run, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes((single_run / "checkpoint.pt").read_bytes()[:5000])
    for args in (("certify", bad), ("train", SMOKE, "--resume", bad)):
        result = run_cli(*args)
        assert result.returncode == 2
        assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
        assert f"{bad} is not a readable torch file" in result.stderr
    not_ours = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, not_ours)
    with pytest.raises(CheckpointError, match="not a certify-fx training checkpoint"):
        load_checkpoint(not_ours)


def test_malformed_recipe_and_missing_dataset_are_one_clear_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("epochs: 2\noptim: {lr: 1e-3, warmup: 3}\n")
    result = run_cli("train", bad, "--set", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "unknown recipe key 'optim.warmup'" in result.stderr and "warmup_epochs" in result.stderr
    result = run_cli("train", SMOKE, "--set", "data.name=cifar10", "--set", f"data.root={tmp_path}",
                  "--set", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert str(tmp_path / "cifar-10-batches-py") in result.stderr
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"recipe": {}, "epoch": 1, "model": {"w": torch.ones(3)}, "bound": {}, "optimizer": {},
                           "history": []})

    def dies_halfway(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C while writing

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"recipe": {}, "epoch": 2, "model": {}, "bound": {}, "optimizer": {}, "history": []})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_attacks_never_flip_what_the_trained_model_certifies(single_run):
    import certify_fx as cfx
    from certify_fx.train import build_model, build_split, recipe_from_dict
    from conftest import pgd_l2

    state = load_checkpoint(single_run / "checkpoint.pt")
    recipe = recipe_from_dict(state["recipe"])
    model = build_model(recipe)
    model.load_state_dict(state["model"])
    model.eval()
    x = torch.stack([build_split(recipe, "test")[i][0] for i in range(128)])
    bound = cfx.bound(model, tuple(x.shape[1:]), estimate_steps=0)
    cert = cfx.certify(model, x, eps=recipe.eps.eps, bound=bound)
    robust = cert.certified
    assert robust.sum() > 32  # the trained model certifies most of the synthetic test set
    assert torch.equal(pgd_l2(model, x[robust], cert.pred[robust], recipe.eps.eps), cert.pred[robust])


def test_certify_cli_json_and_plot(single_run, tmp_path):
    plot = tmp_path / "curve.png"
    result = run_cli("certify", single_run / "checkpoint.pt", "--json", "--eps", "0.05,0.1", "--plot", plot)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"clean_accuracy", "vra", "bound", "seconds"} <= set(summary)
    assert set(summary["vra"]) == {"0.05", "0.1"} and summary["vra"]["0.05"] >= summary["vra"]["0.1"]
    final = json.loads((single_run / "log.jsonl").read_text().splitlines()[-1])
    assert summary["clean_accuracy"] == final["clean_accuracy"] and summary["vra"]["0.1"] == final["vra"]["0.1"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    table = run_cli("certify", single_run / "checkpoint.pt")
    assert "VRA @ eps=0.1" in table.stdout and "clean accuracy" in table.stdout


@pytest.mark.slow
def test_fashion_mnist_recipe_reaches_a_useful_vra(tmp_path):
    """The full CPU recipe (about 13 minutes): LiResNet + EMMA, certified with the proven bound."""
    history = train(load_recipe(ROOT / "recipes" / "fashion_mnist.yaml", [f"output_dir={tmp_path}"]))
    assert history[-1]["sound"] and history[-1]["clean_accuracy"] > 0.8 and history[-1]["vra"]["0.1"] > 0.7


def test_trades_lambda_schedule_and_cll_train_in_process(tmp_path):
    base = load_recipe(SMOKE, ["epochs=1", "data.synthetic.size=128"]).to_dict()
    for loss in ({"name": "trades", "options": {"lam": 2.0}, "lam_start": 0.0, "lam_epochs": 1.0},
                 {"name": "cll", "options": {"p": 0.05, "lam": 1e-4}}, {"name": "gloro_ce"}):
        history = train({**base, "loss": loss, "output_dir": str(tmp_path / loss["name"])}, console=None)
        assert len(history) == 1 and history[0]["loss"] > 0


def test_bad_optimizer_and_mismatched_certify_data_are_clear_errors(single_run, tmp_path):
    with pytest.raises(RecipeError, match="recipe key 'optim.opt': cannot create optimizer 'adamm'"):
        Trainer(load_recipe(SMOKE, [f"output_dir={tmp_path}", "optim.opt=adamm"]))
    result = run_cli("certify", single_run / "checkpoint.pt", "--data", "cifar10")
    assert result.returncode == 2 and "--data cifar10 has inputs (3, 32, 32)" in result.stderr


def test_resume_with_another_batch_size_is_refused(single_run, tmp_path):
    recipe = load_recipe(SMOKE, [f"output_dir={tmp_path}", "data.batch_size=32"])
    with pytest.raises(RecipeError, match="steps per epoch"):
        Trainer(recipe, resume=single_run / "checkpoint.pt")


def test_bf16_autocast_keeps_the_bound_in_fp32():
    from certify_fx import GloRo
    from certify_fx.models import LiResNet
    from certify_fx.train.trainer import LogitsAndMargin

    model = LiResNet(num_classes=3, depth=2, width=8, in_chans=1, img_size=16, neck_dim=16)
    x = torch.rand(4, 1, 16, 16)
    plain = LogitsAndMargin(model, GloRo(model, 0.1, (1, 16, 16), power_steps=0), autocast=False).train()
    amp = LogitsAndMargin(model, GloRo(model, 0.1, (1, 16, 16), power_steps=0), autocast=True).train()
    (l1, k1, _), (l2, k2, _) = plain(x), amp(x)
    assert l2.dtype == k2.dtype == torch.float32
    assert torch.equal(k1, k2)  # the margin never goes through bf16
    assert torch.allclose(l1, l2, atol=0.05) and not torch.equal(l1, l2)  # the logits did


def test_nccl_is_chosen_on_gpus_and_gloo_on_cpu(monkeypatch):
    """No GPU here: the CUDA calls are mocked to check which backend the launcher would pick."""
    import torch.distributed as dist

    from certify_fx.train import DistributedContext

    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: chosen.append(backend))
    ctx = DistributedContext.from_env("auto")
    assert chosen == ["gloo"] and ctx.device.type == "cpu" and ctx.rank == 1 and not ctx.is_main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    ctx = DistributedContext.from_env("auto")
    assert chosen[-1] == "nccl" and ctx.device == torch.device("cuda", 1)


def test_cuda_requested_without_a_gpu_is_a_clear_error(monkeypatch):
    from certify_fx.train import DistributedContext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available; use device=auto or cpu"):
        DistributedContext.from_env("cuda")
