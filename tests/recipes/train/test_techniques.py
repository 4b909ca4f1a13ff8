"""Refactorization, momentum reset, quick recovery and LR multipliers as flags of the training CLI."""
from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from slcompile.recipes.checkpoint import Checkpointer
from slcompile.recipes.files import sha256_file
from slcompile.recipes.schedule import warmup_cosine
from slcompile.recipes.train import TrainConfig, build_model, build_optimizer, main, parse_args, train

TINY = {"model": "llama-tiny", "corpora": ("wiki",), "vocab_size": 512, "batch_size": 4, "seq_len": 32,
        "progress": False, "log_every": 1, "eval_every": 100}
TECHNIQUES = {"refactor_every": 4, "momentum_reset_every": 6, "reset_values": True, "recovery_steps": 2,
              "lr_factors_mult": 2.0, "lr_values_mult": 0.5}


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SLCOMPILE_CACHE", str(tmp_path_factory.getbasetemp() / "slcompile-cache"))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("per_layer, every, crash", [(False, 5, 10), (True, 4, 8)])
def test_a_resumed_run_restarts_at_the_same_steps_with_the_same_losses(tmp_path, monkeypatch, per_layer, every,
                                                                        crash):
    """Refactorizations at 4, 8, 12, 16, momentum resets at 6, 12, 18; checkpoints every 5 (between
    them) or every 4 (on refactorizations). A crash right after the checkpoint of step ``crash`` resumes to the
    uninterrupted run's records, restarts and final weights."""
    class Crash(Exception):
        pass

    cfg = dict(TINY, steps=20, lr=1e-2, warmup=2, clip=1.0, checkpoint_every=every, per_layer=per_layer, **TECHNIQUES)
    layers = len(train(TrainConfig(**cfg, out=str(tmp_path / "full")))["paths"])  # one SLLinear each
    save = Checkpointer.save

    def save_then_crash(self, model, optimizer, meta):
        save(self, model, optimizer, meta)
        if meta["step"] == crash:
            raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", save_then_crash)
        with pytest.raises(Crash):
            train(TrainConfig(**cfg, out=str(tmp_path / "resumed")))
    train(TrainConfig(**cfg, out=str(tmp_path / "resumed")))

    full, resumed = _records(tmp_path / "full"), _records(tmp_path / "resumed")
    refactors = {r["step"]: r["refactor_max_dw"] for r in full if "refactor_max_dw" in r}
    resets = {r["step"]: r["reset_states"] for r in full if "reset_states" in r}
    assert list(refactors) == [4, 8, 12, 16] and max(refactors.values()) < 1e-4
    assert resets == {6: 3 * layers, 12: 3 * layers, 18: 3 * layers}  # A, B and (--reset-values) values
    for records in (full, resumed):
        for record in records:
            record.pop("tokens_per_s", None)
    assert resumed == full
    weights = [torch.load(tmp_path / run / "checkpoint" / "state.pt", weights_only=True)["model"]
               for run in ("full", "resumed")]
    for name, tensor in weights[0].items():
        assert torch.equal(weights[1][name], tensor), name
    lrs = {r["step"]: r["lr"] for r in full if "lr" in r}  # logged at step s: update s's LR (index s - 1)
    assert lrs[13] == pytest.approx(1e-2 * 0.001 * warmup_cosine(14, 2, 20))
    assert lrs[15] == pytest.approx(1e-2 * warmup_cosine(14, 2, 20))


def test_lowrank_refactorizes_and_trains(tmp_path):
    summary = train(TrainConfig(**TINY, method="lowrank", steps=12, lr=1e-2, warmup=2, refactor_every=5,
                                momentum_reset_every=5, recovery_steps=2, lr_factors_mult=0.5, out=str(tmp_path)))
    assert math.isfinite(summary["val_loss"])
    layers = 14  # llama-tiny: 2 decoder layers x 7 projections, each low rank (A, B)
    assert [(r["step"], r["reset_states"]) for r in _records(tmp_path) if "refactor_max_dw" in r] == [
        (5, 2 * layers), (10, 2 * layers)]


def test_build_optimizer_gives_values_and_factors_their_lr():
    cfg = TrainConfig(**TINY, lr=1e-2, lr_factors_mult=2.0, lr_values_mult=0.0)
    for per_layer in (False, True):
        model = build_model(cfg, 512)[0]
        optimizer = build_optimizer(model, TrainConfig(**TINY, lr=1e-2, lr_factors_mult=2.0, lr_values_mult=0.0,
                                                       per_layer=per_layer))
        groups = {group["lr"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
        named = dict(model.named_parameters())
        assert groups[0.0] == {id(p) for n, p in named.items() if n.endswith(".values")}
        assert groups[2e-2] == {id(p) for n, p in named.items() if n.endswith((".A", ".B"))}
        assert len(groups[1e-2]) == len(named) - len(groups[0.0]) - len(groups[2e-2]) > 0


@pytest.mark.parametrize("argv, message", [
    (["--refactor-every", "0"], "--refactor-every must be an integer >= 1, got 0"),
    (["--momentum-reset-every", "-2"], "--momentum-reset-every must be an integer >= 1"),
    (["--recovery-steps", "-1", "--momentum-reset-every", "5"], "--recovery-steps must be an integer >= 0"),
    (["--lr-values-mult", "-0.5"], "--lr-values-mult must be a finite number >= 0"),
    (["--lr-factors-mult", "inf"], "--lr-factors-mult must be a finite number >= 0"),
    (["--method", "full", "--refactor-every", "5"], "--method full has no factors A, B: drop --refactor-every"),
    (["--method", "lowrank", "--lr-values-mult", "2"], "--method lowrank has no sparse values"),
    (["--recovery-steps", "10", "--refactor-every", "5"], "act at momentum resets: add --momentum-reset-every"),
    (["--reset-values"], "act at momentum resets"),
    (["--refactor-every", "5", "--parallel", "fsdp2"], "--refactor-every needs each layer's whole B @ A"),
])
def test_bad_technique_flags_exit_2_before_any_write(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "run"), "--steps", "20", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_checkpoint_from_before_these_flags_still_resumes(tmp_path):
    """A checkpoint whose config lacks the new settings reads them as their defaults."""
    cfg = TrainConfig(**TINY, steps=2, out=str(tmp_path))
    train(cfg)
    meta_path = tmp_path / "checkpoint" / "meta.pt"
    meta = torch.load(meta_path, weights_only=True)
    for name in TECHNIQUES:
        del meta["config"][name]
    torch.save(meta, meta_path)
    manifest_path = tmp_path / "checkpoint" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"]["meta.pt"] = sha256_file(meta_path)
    manifest_path.write_text(json.dumps(manifest))
    train(TrainConfig(**TINY, steps=2, out=str(tmp_path)))


def test_the_study_commands_are_valid_train_commands(capsys):
    """``make quality-techniques``'s first phase: 6 variants x 3 LRs whose flags the CLI accepts."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    study = importlib.import_module("quality_techniques")
    assert study.main(["--dry-run"]) == 0
    commands = [line.split()[2:] for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 18
    configs = [parse_args(cmd) for cmd in commands]
    both = [c for c in configs if c.refactor_every and c.momentum_reset_every]
    assert len(both) == 3 and all(c.reset_values and c.recovery_steps == 10 and c.steps == 800 for c in both)
    assert sorted({c.alpha for c in configs if c.alpha}) == [12.0, 24.0]  # alpha/r 0.5 and 1 at rank 24


def test_the_study_summary_compares_to_the_best_full_run_and_pairs_the_seeds(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    study = importlib.import_module("quality_techniques")
    losses = {"full-lr0.003": 3.0, "full-lr0.01": 3.1, "both-lr0.01": 3.05, "both-lr0.01-seed1": 3.07}
    for name, loss in losses.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"val_loss": loss}))
    lines = study.summary_lines(tmp_path, list(losses))
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:6]}
    assert rows["full-lr0.003"].endswith("| 1.000x |")
    assert rows["both-lr0.01"].endswith(f"| {math.exp(0.05):.3f}x |")
    seeds = lines[-1].split(" | ")
    assert seeds[0] == "| both-lr0.01" and seeds[3] == f"{(math.exp(3.05) + math.exp(3.07)) / 2 / math.exp(3.0):.3f}x"
