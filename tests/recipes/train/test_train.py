"""The training pipeline: loss goes down, exact resume after a kill or SIGTERM, schedule, CLI errors, and a run
that a hostile or unlucky user cannot turn against itself (unsafe or damaged checkpoints, NaN, a second run)."""
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
from slcompile.layers import SLLinear
from slcompile.model_configs import get_config
from slcompile.recipes.checkpoint import Checkpointer
from slcompile.recipes.files import sha256_file
from slcompile.recipes.models.llama import Llama
from slcompile.recipes.train import EXIT_STOPPED, TrainConfig, build_model, main, perplexity, train

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
    assert (tmp_path / "checkpoint" / "state.pt").exists() and (tmp_path / "summary.json").exists()


def test_lowrank_b0_is_a_dead_network_and_matched_init_is_not():
    for method, dead in (("lowrank-b0", True), ("lowrank", False)):
        model, seq_len, _ = build_model(TrainConfig(**TINY, method=method), vocab_size=512)
        tokens = torch.randint(0, 512, (2, seq_len + 1))
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        factor_grads = [p.grad for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
        assert factor_grads and all((g is None or not g.any()) for g in factor_grads) == dead


def _cli(out: Path, steps: int = 30, **flags) -> list[str]:
    args = ["--model", "llama-tiny", "--corpora", "wiki", "--vocab-size", "512", "--batch-size", "4",
            "--seq-len", "32", "--steps", str(steps), "--log-every", "1", "--eval-every", "15", "--lr", "3e-3",
            "--no-progress", "--threads", "1", "--out", str(out)]
    return args + [str(a) for kv in flags.items() for a in ("--" + kv[0].replace("_", "-"), kv[1])]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slcompile.recipes.train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, lines: int = 1) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.01)
    pytest.fail(f"{path} did not appear (run ended with {proc.poll()})")


def test_resume_after_sigkill_or_sigterm_equals_uninterrupted(tmp_path, capsys):
    """A SIGKILL loses the steps since the last checkpoint, a SIGTERM none (it saves, exits 75);
    both resume to the uninterrupted losses. A second run on a live run's --out is refused at once."""
    subprocess.run([sys.executable, "-m", "slcompile.recipes.train", *_cli(tmp_path / "full")], check=True,
                   capture_output=True)
    killed, stopped = tmp_path / "killed", tmp_path / "stopped"
    proc = _start(_cli(killed, checkpoint_every=5))
    _wait_for(killed / "checkpoint" / "manifest.json", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    stale = killed / ".metrics.jsonl.1234.cafe.tmp"  # as a kill during an atomic write leaves behind
    stale.write_text("partial")

    proc = _start(_cli(stopped, checkpoint_every=100))
    _wait_for(stopped / "metrics.jsonl", proc, lines=3)
    assert main(_cli(stopped)) == 2  # a real second process holds the lock
    assert "is in use by another run" in capsys.readouterr().err
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == EXIT_STOPPED, proc.stderr.read()
    assert "stopped: stopped by SIGTERM after step" in proc.stderr.read()
    saved = len(_losses(stopped))
    assert 3 <= saved < 30 and not (stopped / "summary.json").exists()

    for run_dir in (killed, stopped):
        subprocess.run([sys.executable, "-m", "slcompile.recipes.train", *_cli(run_dir)], check=True,
                       capture_output=True)
        assert _losses(run_dir) == _losses(tmp_path / "full")
        assert [s for s, _ in _losses(run_dir)] == list(range(1, 31))
    assert not stale.exists()


def _flip_bits(path: Path, count: int = 1000) -> bytes:
    """Flip one bit in each of ``count`` 4-byte words in the middle of ``path`` (a real storage fault)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 4 * count, 4):
        data[i] ^= 0x40
    path.write_bytes(bytes(data))
    return bytes(data)


def test_corrupt_and_mismatched_checkpoints_are_refused_and_kept(tmp_path):
    train(TrainConfig(**TINY, method="sltrain", steps=2, out=str(tmp_path)))
    state = tmp_path / "checkpoint" / "state.pt"
    with pytest.raises(ValueError, match="other settings.*lr: checkpoint 0.003 vs now 0.001"):
        train(TrainConfig(**TINY, method="sltrain", steps=2, lr=1e-3, out=str(tmp_path)))
    flipped = _flip_bits(state)
    with pytest.raises(ValueError, match=f"checkpoint file {state} is damaged"):
        train(TrainConfig(**TINY, method="sltrain", steps=2, out=str(tmp_path)))
    assert state.read_bytes() == flipped
    state.write_bytes(flipped[:1000])
    with pytest.raises(ValueError, match="is damaged"):
        train(TrainConfig(**TINY, method="sltrain", steps=2, out=str(tmp_path)))
    assert state.read_bytes() == flipped[:1000]


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a hostile checkpoint would do with a shell."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _plant(path: Path, marker: Path) -> bytes:
    """Replace ``path`` by a pickle carrying a payload and update the manifest, as an attacker would."""
    torch.save({"version": 2, "payload": _Payload(marker)}, path)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"][path.name] = sha256_file(path)
    manifest_path.write_text(json.dumps(manifest))
    return path.read_bytes()


@pytest.mark.parametrize("name", ["meta.pt", "state.pt"])
def test_a_checkpoint_that_would_run_code_is_refused_and_kept(tmp_path, name, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    train(TrainConfig(**TINY, steps=2, out=str(run)))
    planted = _plant(run / "checkpoint" / name, marker)
    assert main(_cli(run, steps=2)) == 2
    assert "could run code when loaded; refused" in capsys.readouterr().err
    assert not marker.exists() and (run / "checkpoint" / name).read_bytes() == planted
    torch.load(run / "checkpoint" / name, weights_only=False)  # the payload is real: unsafe loading runs it
    assert marker.exists()


def test_divergence_stops_before_saving_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    assert main(_cli(tmp_path, steps=8, lr=1e8, warmup=0, checkpoint_every=1)) == 2
    err = capsys.readouterr().err
    assert "error: the weights are not finite after step 2: not saved" in err and "(step 1) was kept" in err
    meta = torch.load(tmp_path / "checkpoint" / "meta.pt", weights_only=True)
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)
    assert meta["step"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())


def _nan_at_training_call(monkeypatch, call: int) -> None:
    """The model's training loss is NaN at its ``call``-th training forward (a bad batch)."""
    forward, calls = Llama.forward, []

    def poisoned(self, tokens, targets=None):
        loss = forward(self, tokens, targets)
        if self.training:
            calls.append(None)
            if len(calls) == call:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(Llama, "forward", poisoned)


def test_a_nan_step_stops_the_run_or_is_skipped_and_counted(tmp_path, monkeypatch):
    _nan_at_training_call(monkeypatch, 3)
    with pytest.raises(FloatingPointError, match="loss became nan .* at step 3.*checkpoint \\(step 2\\) was kept"):
        train(TrainConfig(**TINY, steps=5, checkpoint_every=1, out=str(tmp_path / "stop")))
    _nan_at_training_call(monkeypatch, 3)
    summary = train(TrainConfig(**TINY, steps=5, skip_nonfinite=True, out=str(tmp_path / "skip")))
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["val_loss"])
    losses = [loss for _, loss in _losses(tmp_path / "skip")]
    assert math.isnan(losses[2]) and all(math.isfinite(v) for i, v in enumerate(losses) if i != 2)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    save, calls = torch.save, []

    def disk_fills_up(obj, f, *args, **kwargs):  # the third torch.save: the second checkpoint's state.pt
        calls.append(f)
        if len(calls) == 3:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 4032")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    assert main(_cli(tmp_path, steps=4, checkpoint_every=2)) == 2
    assert "error: the disk is full: the checkpoint of step 4 could not be written" in capsys.readouterr().err
    assert torch.load(tmp_path / "checkpoint" / "meta.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / ".checkpoint.new").exists()


def test_a_resumed_run_keeps_the_recorded_compute_paths(tmp_path, monkeypatch):
    """The first process's calibration picked "factored"; the resuming one would pick "materialize"."""
    class Crash(Exception):
        pass

    save = Checkpointer.save

    def save_then_crash(self, model, optimizer, meta):
        save(self, model, optimizer, meta)
        if meta["step"] == 2:
            raise Crash

    cfg = TrainConfig(**TINY, steps=4, checkpoint_every=2, out=str(tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", save_then_crash)
        patch.setattr(SLLinear, "path_for", lambda self, x: "factored")
        with pytest.raises(Crash):
            train(cfg)
    monkeypatch.setattr(SLLinear, "path_for", lambda self, x: "materialize")
    summary = train(cfg)
    assert len(summary["paths"]) == 14 and set(summary["paths"].values()) == {"factored"}


def test_resuming_with_the_defaults_spelled_out_is_the_same_run(tmp_path):
    train(TrainConfig(**TINY, steps=2, out=str(tmp_path)))
    dims = get_config("llama-tiny")
    summary = train(TrainConfig(**TINY, steps=2, rank=dims.rank, alpha=dims.alpha, density=dims.density,
                                warmup=1, out=str(tmp_path)))
    assert json.loads((tmp_path / "config.json").read_text())["rank"] == dims.rank == summary["rank"]


def test_a_metrics_line_without_step_is_named_on_resume(tmp_path, capsys):
    train(TrainConfig(**TINY, steps=2, out=str(tmp_path)))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"loss": 1.0}\n{"step": 2}\n')
    assert main(_cli(tmp_path, steps=2)) == 2
    assert f"{tmp_path / 'metrics.jsonl'} line 4 has no integer \"step\"" in capsys.readouterr().err


def test_a_diverged_validation_loss_reports_infinite_perplexity(tmp_path):
    assert perplexity(710.0) == math.inf and perplexity(1.0) == pytest.approx(math.e)
    summary = train(TrainConfig(**TINY, steps=6, lr=10.0, out=str(tmp_path)))
    assert summary["val_ppl"] == math.inf


def test_run_folders_are_checked_before_any_write(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    unrelated, foreign = tmp_path / "unrelated.txt", tmp_path / "foreign"
    unrelated.write_text("keep me")
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    linked = tmp_path / "linked"
    train(TrainConfig(**TINY, steps=1, out=str(linked)))
    (linked / "config.json").unlink()
    (linked / "config.json").symlink_to(unrelated)
    for out, message in ((a_file, "is not a writable folder"), (a_file / "run", "is not a writable folder"),
                         (foreign, "is a non-empty folder that is not a run folder"),
                         (linked, "holds symbolic links (config.json)")):
        assert main(_cli(out, steps=1)) == 2
        assert f"--out {out} {message}" in capsys.readouterr().err
    assert a_file.read_text() == "mine" and unrelated.read_text() == "keep me"
    assert [p.name for p in foreign.iterdir()] == ["config.json"]


def test_an_unwritable_cache_is_refused_before_any_write(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("SLCOMPILE_CACHE", str(tmp_path / "a_file" / "cache"))
    assert main(_cli(tmp_path / "run", steps=1)) == 2
    assert "error: the data cache (SLCOMPILE_CACHE) " in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_a_read_only_out_is_refused(tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        assert main(_cli(tmp_path / "run", steps=1)) == 2
    finally:
        tmp_path.chmod(0o755)
    assert "is not a writable folder" in capsys.readouterr().err


HF = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
      "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.mark.parametrize("argv, hf, message", [
    (["--density", "1e-6"], None, "--density 1e-06 leaves SLLinear 'layers.0.self_attn.q_proj' (64 x 64) without"),
    (["--model", "llama-tyni"], None, "unknown model config 'llama-tyni'"),
    ([], [HF], "must hold a JSON object (a LlamaConfig), not a list"),
    ([], {**HF, "num_attention_heads": 5}, "num_attention_heads 5 must divide hidden_size 32"),
    ([], {**HF, "num_key_value_heads": 3}, "num_key_value_heads 3 must divide num_attention_heads 4"),
    ([], {**HF, "hidden_act": "swish2"}, "unknown hidden_act 'swish2'"),
    ([], {**HF, "intermediate_size": -64}, "intermediate_size must be an integer >= 1, got -64"),
])
def test_bad_settings_fail_before_any_write(tmp_path, argv, hf, message, capsys):
    if hf is not None:
        pytest.importorskip("transformers")
        (tmp_path / "llama.json").write_text(json.dumps(hf))
        argv = argv + ["--hf-config", str(tmp_path / "llama.json"), "--rank", "4", "--alpha", "1"]
    assert main(_cli(tmp_path / "run", steps=1) + argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--method", "dense"], "invalid choice"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--warmup", "500", "--steps", "10"], "--warmup must lie in"),
    (["--batch-size", "x"], "invalid int value"),
    (["--threads", "-1"], "--threads must be an integer >= 1, got -1"),
    (["--lr", "1e39"], "--lr must be a positive number below 3.4e+38"),
    (["--vocab-size", "10"], "--vocab-size must be >= 257"),
    (["--method", "full", "--rank", "100"], "--method full does not use --rank"),
    (["--method", "lowrank", "--density", "0.1"], "--method lowrank does not use --density"),
    (["--dist-timeout", "0"], "--dist-timeout must be a positive number"),
    (["--skip-nonfinite", "--per-layer"], "--skip-nonfinite cannot skip a --per-layer step"),
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
    # With several full-rank runs the ratios are to the best of them.
    runs = [tmp_path / "sweep" / f"full-lr{lr:g}" for lr in (1e-3, 1e-2)]
    rows = compare(runs, tmp_path / "cmp2")
    assert sorted(row["ppl_vs_full"] for row in rows)[0] == 1.0
    assert max(row["ppl_vs_full"] for row in rows) > 1.0


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
    with pytest.raises(ValueError, match="--state-bits must be one of 32, 8, 4, got 16"):
        TrainConfig(state_bits=16)
    with pytest.raises(ValueError, match="--int8-weights .* needs --method sltrain"):
        TrainConfig(method="full", int8_weights=True)
    with pytest.raises(ValueError, match="--int8-weights with --parallel fsdp2 needs --per-layer"):
        TrainConfig(int8_weights=True, parallel="fsdp2")
    TrainConfig(per_layer=True, state_bits=8, parallel="fsdp2")  # the rest of the stack scales out


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    common = dict(TINY, method="sltrain", steps=3)
    train(TrainConfig(**common, out=str(tmp_path / "plain")))
    train(TrainConfig(**common, checkpoint_activations=True, out=str(tmp_path / "ckpt")))
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "ckpt")
