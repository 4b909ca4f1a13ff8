"""Quickstart: turn a small transformer into an SLTrain model, train it, merge it back.

Every eligible ``nn.Linear`` becomes ``W = (alpha / r) * B @ A + S`` (low rank plus a fixed random
sparse support); embeddings and the output head stay dense. The task is synthetic but needs
attention: each sequence is a random 2-token pattern repeated, so from the third token on every
next token can be copied from 2 positions back (the loss floor is ``ln(64) / 31 ~ 0.13``: only the
second token is unpredictable).

    python examples/quickstart.py        # ~10 s on a laptop CPU
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import slcompile

VOCAB, DIM, HEADS, LAYERS, PERIOD, SEQ, BATCH, STEPS = 64, 128, 4, 2, 2, 32, 32, 50


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    """Token + learned position embeddings, ``LAYERS`` blocks, a final norm and an untied head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(0.02 * torch.randn(SEQ, DIM))
        self.blocks = nn.Sequential(*(Block(DIM, HEADS) for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)  # kept dense: "lm_head" is in SLConfig.head_names

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.blocks(self.tok(tokens) + self.pos[: tokens.shape[1]])))


def batch(generator: torch.Generator) -> torch.Tensor:
    """``(BATCH, SEQ)`` int64: a random ``PERIOD``-token pattern per row, repeated."""
    pattern = torch.randint(VOCAB, (BATCH, PERIOD), generator=generator)
    return pattern.repeat(1, SEQ // PERIOD)


def main() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    dense_params = sum(p.numel() for p in model.parameters())

    # rank 32 of 128 with alpha / r = 0.25 (the paper's ratio at 60M), 3% of entries in S.
    cfg = slcompile.SLConfig(rank=32, alpha=8.0, density=0.03)
    model, report = slcompile.transform(model, cfg)
    print(report)
    sl_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {dense_params:,} dense -> {sl_params:,} SLTrain "
          f"({1 - sl_params / dense_params:.1%} fewer; replaced linears {report.linear_params_before:,} -> "
          f"{report.linear_params_after:,})")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    floor = (PERIOD - 1) * math.log(VOCAB) / (SEQ - 1)  # the first PERIOD - 1 targets are random
    print(f"training {STEPS} steps with AdamW (uniform guess {math.log(VOCAB):.2f}, floor ~ {floor:.2f}):")
    for step in range(1, STEPS + 1):
        tokens = batch(data)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    # Merge back to plain nn.Linear layers (for export / inference): same function, no SLLinear left.
    model.eval()
    tokens = batch(data)
    with torch.no_grad():
        before = model(tokens)
        merged = slcompile.merge(model)
        after = merged(tokens)
    assert not any(isinstance(m, slcompile.SLLinear) for m in merged.modules())
    diff = (before - after).abs().max().item()
    print(f"merged to nn.Linear: {sum(p.numel() for p in merged.parameters()):,} params, "
          f"max |logits(SLTrain) - logits(merged)| = {diff:.2e}")
    assert diff < 1e-4, diff


if __name__ == "__main__":
    main()
