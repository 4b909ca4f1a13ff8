"""Hugging Face ``Trainer`` on an SLTrain model with slcompile's optimizer, then save and reload.

A tiny ``LlamaForCausalLM`` (random weights, built from a config: nothing is downloaded) is
transformed, trained by ``transformers.Trainer`` with ``slcompile.optim.build`` twice (per-layer
updates fused into backward with gradient accumulation, then a plain optimizer step), and saved and
reloaded two ways: the SLTrain checkpoint ``Trainer.save_model`` writes (loaded into a freshly
transformed model) and the merged dense model (``save_pretrained`` / ``from_pretrained``, no
slcompile needed to use it).

``Trainer`` settings with ``per_layer=True`` (each parameter is updated in its gradient hook and its
gradient freed at once):

- ``TrainingArguments(max_grad_norm=0)``: the ``Trainer`` clips after backward, when the gradients are
  already applied and gone. Clip in the optimizer: ``build(max_grad_norm=..., clip="per_param")``
  (``clip="global"`` needs ``step(closure)``, which the ``Trainer`` never calls).
- ``gradient_accumulation_steps=k`` and ``build(accumulation_steps=k)`` must agree: the update
  happens during the ``k``-th backward pass; a mismatch raises instead of updating silently.
- no ``fp16=True`` (its gradient scaler unscales after backward); ``bf16`` autocast is fine.

``per_layer=False`` is an ordinary optimizer: the ``Trainer``'s own clipping and accumulation apply.

    python examples/hf_trainer.py        # ~5 s on a laptop CPU
"""
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging

import slcompile

VOCAB, PERIOD, SEQ, EXAMPLES, STEPS = 64, 2, 16, 64, 16
CONFIG = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
CFG = slcompile.SLConfig(rank_ratio=0.25, alpha=4.0, density=0.05)


class Patterns(torch.utils.data.Dataset):
    """``EXAMPLES`` rows of a random ``PERIOD``-token pattern repeated to ``SEQ`` tokens (learnable by copying)."""

    def __init__(self) -> None:
        pattern = torch.randint(VOCAB, (EXAMPLES, PERIOD), generator=torch.Generator().manual_seed(1))
        self.tokens = pattern.repeat(1, SEQ // PERIOD)

    def __len__(self) -> int:
        return EXAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def sl_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model, _ = slcompile.transform(LlamaForCausalLM(CONFIG), CFG)
    return model


def train(model: LlamaForCausalLM, out: Path, per_layer: bool) -> Trainer:
    """``STEPS`` optimizer updates by the ``Trainer``; with ``per_layer`` two micro-batches per update."""
    accumulation = 2 if per_layer else 1
    opt = slcompile.optim.build(model, lr=1e-2, per_layer=per_layer, accumulation_steps=accumulation,
                                max_grad_norm=1.0 if per_layer else None, clip="per_param")
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8,
                             gradient_accumulation_steps=accumulation,
                             max_grad_norm=0.0 if per_layer else 1.0,  # per-layer: the optimizer clips
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Patterns(), optimizers=(opt, None))
    trainer.remove_callback(PrinterCallback)  # the losses are in trainer.state.log_history
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"per_layer={per_layer}: {len(losses)} updates, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return trainer


def max_diff(a: LlamaForCausalLM, b: LlamaForCausalLM, tokens: torch.Tensor) -> float:
    a.eval(), b.eval()
    with torch.no_grad():
        return (a(tokens).logits - b(tokens).logits).abs().max().item()


def main() -> None:
    logging.disable_progress_bar()
    _, report = slcompile.transform(LlamaForCausalLM(CONFIG), CFG)
    print(report)
    tokens = Patterns().tokens[:4]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train(sl_model(), tmp / "plain", per_layer=False)
        trainer = train(sl_model(), tmp / "per_layer", per_layer=True)
        model = trainer.model

        # The SLTrain checkpoint: A, B, values and support per layer; load it into a transformed model.
        trainer.save_model(str(tmp / "sltrain"))
        reloaded = sl_model()
        reloaded.load_state_dict(load_file(tmp / "sltrain" / "model.safetensors"))
        print(f"SLTrain checkpoint reloaded: max |logits diff| = {max_diff(model, reloaded, tokens):.2e}")

        # The merged dense model: a plain LlamaForCausalLM for any tool that reads Hugging Face checkpoints.
        expected = sl_model()
        expected.load_state_dict(model.state_dict())
        slcompile.merge(model).save_pretrained(tmp / "merged")
        dense = LlamaForCausalLM.from_pretrained(tmp / "merged")
        assert not any(isinstance(m, slcompile.SLLinear) for m in dense.modules())
        print(f"merged model reloaded by from_pretrained: max |logits diff| = {max_diff(expected, dense, tokens):.2e}")


if __name__ == "__main__":
    main()
