"""The training pipeline: loss goes down, exact resume after a kill, schedule, CLI and checkpoint errors."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slcompile.recipes.compare import compare
from slcompile.recipes.schedule import warmup_cosine
from slcompile.recipes.sweep import sweep
from slcompile.recipes.train import TrainConfig, build_model, main, train

TINY = {"model": "llama-tiny", "corpora": ("wiki",), "vocab_size": 512, "batch_size": 4, "seq_len": 32,
        "progress": False, "log_every": 1}


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    """One tokenizer/token cache for the whole session (tokenizing costs seconds)."""
    monkeypatch.setenv("SLCOMPILE_CACHE", str(tmp_path_factory.getbasetemp() / "slcompile-cache"))


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def test_schedule_warmup_and_cosine_end():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(99, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(54, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    with pytest.raises(ValueError, match="warmup"):
        warmup_cosine(0, 20, 10)


@pytest.mark.parametrize("method", ["sltrain", "full", "lowrank"])
def test_few_steps_reduce_loss(tmp_path, method):
    summary = train(TrainConfig(**TINY, method=method, steps=25, lr=1e-2, warmup=2, out=str(tmp_path)))
    losses = [loss for _, loss in _losses(tmp_path)]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert math.isfinite(summary["val_ppl"]) and summary["trainable_params"] > 0
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "summary.json").exists()


def test_lowrank_b0_is_a_dead_network_and_matched_init_is_not():
    for method, dead in (("lowrank-b0", True), ("lowrank", False)):
        model, seq_len, _ = build_model(TrainConfig(**TINY, method=method), vocab_size=512)
        tokens = torch.randint(0, 512, (2, seq_len + 1))
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        factor_grads = [p.grad for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
        assert factor_grads and all((g is None or not g.any()) for g in factor_grads) == dead


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    args = ["--model", "llama-tiny", "--corpora", "wiki", "--vocab-size", "512", "--batch-size", "4",
            "--seq-len", "32", "--steps", "60", "--log-every", "1", "--eval-every", "30", "--checkpoint-every", "5",
            "--lr", "3e-3", "--no-progress", "--threads", "1"]
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "slcompile.recipes.train", *args]
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed_dir)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed_dir / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed_dir / "summary.json").exists()
    subprocess.run(cmd + ["--out", str(killed_dir)], check=True, env=env, capture_output=True)
    assert _losses(killed_dir) == _losses(tmp_path / "full")
    assert [s for s, _ in _losses(killed_dir)] == list(range(1, 61))


def test_corrupt_and_mismatched_checkpoints_are_refused_and_kept(tmp_path):
    train(TrainConfig(**TINY, method="sltrain", steps=2, out=str(tmp_path)))
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(ValueError, match="other settings.*lr: checkpoint 0.003 vs now 0.001"):
        train(TrainConfig(**TINY, method="sltrain", steps=2, lr=1e-3, out=str(tmp_path)))
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    corrupt = ckpt.read_bytes()
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        train(TrainConfig(**TINY, method="sltrain", steps=2, out=str(tmp_path)))
    assert ckpt.read_bytes() == corrupt


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--method", "dense"], "invalid choice"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--warmup", "500", "--steps", "10"], "--warmup must lie in"),
    (["--batch-size", "x"], "invalid int value"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_hf_llama_config_trains(tmp_path):
    pytest.importorskip("transformers")
    config = tmp_path / "llama.json"
    config.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "max_position_embeddings": 64}))
    summary = train(TrainConfig(**{**TINY, "model": "unused"}, hf_config=str(config), method="sltrain", rank=4,
                                alpha=1.0, steps=3, out=str(tmp_path / "run")))
    assert summary["linear_params"] < summary["linear_params_full"] and math.isfinite(summary["val_loss"])


def test_sweep_picks_the_lowest_loss_and_compare_writes_the_table(tmp_path):
    base = TrainConfig(**TINY, steps=4, eval_every=4, checkpoint_every=4)
    report = sweep(base, ["sltrain", "full"], [1e-3, 1e-2], tmp_path / "sweep")
    for method in ("sltrain", "full"):
        results = [r for r in report["results"] if r["method"] == method]
        assert report["best_lr"][method] == min(results, key=lambda r: r["val_loss"])["lr"]
    rows = compare([tmp_path / "sweep" / "full-lr0.01", tmp_path / "sweep" / "sltrain-lr0.01"], tmp_path / "cmp")
    assert rows[0]["ppl_vs_full"] == 1.0 and rows[1]["linear_params_vs_full"] < 1
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == {"table.md", "table.json", "val_curves.png"}


def test_per_layer_optimizer_in_the_loop_equals_plain_adamw(tmp_path):
    """Accumulation and global-norm clipping (two-pass) through the CLI's loop: same losses."""
    common = dict(TINY, method="sltrain", steps=5, grad_accum=2, clip=0.5, lr=1e-2)
    train(TrainConfig(**common, out=str(tmp_path / "plain")))
    train(TrainConfig(**common, per_layer=True, out=str(tmp_path / "per_layer")))
    plain, per_layer = _losses(tmp_path / "plain"), _losses(tmp_path / "per_layer")
    assert [s for s, _ in per_layer] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(plain, per_layer):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_memory_stack_flags_are_validated():
    with pytest.raises(ValueError, match="--state-bits must be 32, 8 or 4"):
        TrainConfig(state_bits=16)
    with pytest.raises(ValueError, match="--int8-weights .* needs --method sltrain"):
        TrainConfig(method="full", int8_weights=True)
    with pytest.raises(ValueError, match="not supported with --parallel"):
        TrainConfig(per_layer=True, parallel="ddp")


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    common = dict(TINY, method="sltrain", steps=3)
    train(TrainConfig(**common, out=str(tmp_path / "plain")))
    train(TrainConfig(**common, checkpoint_activations=True, out=str(tmp_path / "ckpt")))
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "ckpt")
