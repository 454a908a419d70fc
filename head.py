"""A proposer that reads the target's hidden states. A reader of the paper's method can skip this file.

The target's own chain (lossless.self_chain) is free but stale: after the target's step it replays
the distributions of the state before it, which no longer describe what the target will do once
those tokens are revealed. A draft refreshes, at the price of its own forward over the whole
context. A head sits between them: it reads what the target already computed at the state it last
stepped from, its final hidden states h (B, d), and the block's current tokens x (B,), and returns
the target's distribution at x:

    z = proj(h) + embed(x) + pos;  z = layer(layer(z));  logits = out(norm(z))

two small bidirectional attention layers over the block's B positions: no context and no cache
(the hidden states carry the context). It proposes the rest of the block by SDAR's rule, a head
pass per step (lossless.head_chain), and lossless verification makes the output the target's own
whatever it proposes. A head is trained on its target's own decoding (train_tiny.py) and tied to
it: its folder names the target's hidden size, vocabulary and a fingerprint of its weights, and is
refused beside any other target.
"""
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import read_safetensors, write_safetensors
from model import RMSNorm, read_json

MODEL_TYPE = "simsd-head"


@dataclass
class HeadConfig:
    """A head's shape, and its target's: hidden_size, vocab_size and mask_token_id are the
    target's; target: the fingerprint of its weights; block_size: the block it proposes."""
    hidden_size: int
    vocab_size: int
    mask_token_id: int
    block_size: int
    target: str
    width: int = 64
    layers: int = 2
    heads: int = 4
    model_type: str = MODEL_TYPE


class HeadLayer(nn.Module):
    """Pre-norm attention, every position seeing every other, then a SiLU MLP."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(width, 1e-6), RMSNorm(width, 1e-6)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.up = nn.Linear(width, 4 * width, bias=False)
        self.down = nn.Linear(4 * width, width, bias=False)

    def forward(self, z):  # (N, B, W)
        N, B, W = z.shape
        qkv = self.qkv(self.norm1(z)).view(N, B, 3, self.heads, W // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (N, heads, B, W / heads) each
        y = F.scaled_dot_product_attention(q, k, v)
        z = z + self.out(y.transpose(1, 2).reshape(N, B, W))
        return z + self.down(F.silu(self.up(self.norm2(z))))


class Head(nn.Module):
    def __init__(self, c: HeadConfig):
        super().__init__()
        self.config = c
        self.proj = nn.Linear(c.hidden_size, c.width, bias=False)
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.pos = nn.Parameter(torch.zeros(c.block_size, c.width))
        self.layers = nn.ModuleList(HeadLayer(c.width, c.heads) for _ in range(c.layers))
        self.norm = RMSNorm(c.width, 1e-6)
        self.out = nn.Linear(c.width, c.vocab_size, bias=False)

    def forward(self, hidden, x):
        """Logits (N, B, V): the target's distribution at block state x (N, B) as the head
        predicts it, from the target's final hidden states (N, B, d) at an earlier state of the
        block."""
        z = self.proj(hidden.to(self.pos.dtype)) + self.embed(x) + self.pos
        for layer in self.layers:
            z = layer(z)
        return self.out(self.norm(z))


class Bound:
    """A head bound to the hidden states it reads: a model as sdar.denoise calls one (ids ->
    logits), without a cache or positions (a head needs neither)."""

    def __init__(self, head, hidden):
        self.head, self.hidden, self.config = head, hidden, head.config

    def __call__(self, ids, pos, mask=None, cache=None):
        return self.head(self.hidden, ids)


def fingerprint(target):
    """A short hash of a target's weights (its embedding, head and final norm, as bfloat16: the
    same whichever dtype it was loaded in)."""
    m = target.model
    parts = (m.embed_tokens.weight, target.lm_head.weight, m.norm.weight)
    digest = hashlib.sha256()
    for p in parts:
        digest.update(p.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def new(target, block_size, **shape):
    """A fresh head for `target` (shape: width, layers, heads)."""
    c = target.config
    return Head(HeadConfig(c.hidden_size, c.vocab_size, c.mask_token_id, block_size,
                           fingerprint(target), **shape))


def save(head, path):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(head.state_dict(), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(asdict(head.config), indent=1) + "\n")


def is_head(path):
    """Whether a folder holds a head (its config.json says so)."""
    config = Path(path) / "config.json"
    return config.is_file() and read_json(config).get("model_type") == MODEL_TYPE


def load(path, target, device="cpu"):
    """The head in folder `path`, for `target`; a ValueError in one sentence beside any other."""
    d = read_json(Path(path) / "config.json")
    try:
        c = HeadConfig(**d)
    except TypeError as e:
        raise ValueError(f"{path}/config.json is not a head's config ({e}).") from None
    t = target.config
    if (c.hidden_size, c.vocab_size, c.target) != (t.hidden_size, t.vocab_size,
                                                   fingerprint(target)):
        raise ValueError(f"the head in {path} was trained for another target (hidden size "
                         f"{c.hidden_size}, vocabulary {c.vocab_size}, weights {c.target}; this "
                         f"one: {t.hidden_size}, {t.vocab_size}, {fingerprint(target)}); train "
                         "one for it (python train_tiny.py for the toys).")
    head = Head(c)
    head.load_state_dict(read_safetensors(Path(path) / "model.safetensors", device))
    return head.to(device).eval()
