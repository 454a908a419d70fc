"""SDAR in plain PyTorch: a Qwen3 transformer with explicit positions, mask and KV cache.

SDAR is Qwen3 with block-diffusion attention, so the module tree mirrors the checkpoint
names (model.layers.N.self_attn.q_proj, ...) and loading is a plain load_state_dict
(checkpoint.py). The model knows nothing about blocks: callers pass the attention mask and
the RoPE positions.
"""
import json
import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# model_type -> the architectures entry of config.json: one tensor layout, two ways to decode
ARCHITECTURES = {"sdar": "SDARForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass
class Config:
    """Model shape, with config.json's field names."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # hidden_size // num_attention_heads when absent
    rope_theta: float = 10000.0  # the Qwen3 default, used only when config.json omits it
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    mask_token_id: int | None = None
    block_size: int | None = None
    model_type: str = "sdar"  # "sdar" (block diffusion) or "qwen3" (autoregressive)

    def __post_init__(self):
        sizes = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings"]
        for name in sizes + ["head_dim", "block_size"]:
            value = getattr(self, name)
            if (value is not None or name in sizes) and not (type(value) is int and value >= 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads}).")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number above 0; got {value!r}.")
        if type(self.tie_word_embeddings) is not bool:
            raise ValueError(f"tie_word_embeddings must be true or false; got "
                             f"{self.tie_word_embeddings!r}.")
        if not (isinstance(self.model_type, str) and self.model_type in ARCHITECTURES):
            raise ValueError(f"model_type must be one of {list(ARCHITECTURES)}; got "
                             f"{self.model_type!r}.")
        mask = self.mask_token_id
        if mask is not None and not (type(mask) is int and 0 <= mask < self.vocab_size):
            raise ValueError(f"mask_token_id must be a token id, an integer from 0 to vocab_size "
                             f"- 1 ({self.vocab_size - 1}); got {mask!r}.")
        given = self.head_dim is not None
        if not given:  # as Qwen3 derives it
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 2 or self.head_dim % 2:
            where = "" if given else " (hidden_size // num_attention_heads: no head_dim given)"
            raise ValueError(f"head_dim must be even and at least 2, as RoPE turns pairs of "
                             f"dimensions; got {self.head_dim}{where}.")

    @classmethod
    def from_json(cls, src):
        """Read a config.json path or dict, ignoring the keys we do not use."""
        where = "the config" if isinstance(src, dict) else str(src)
        d = dict(src) if isinstance(src, dict) else read_json(src)
        rope = d.get("rope_parameters")  # newer writers nest rope_theta here
        if rope is not None and not isinstance(rope, dict):
            raise ValueError(f"{where}: rope_parameters must be an object; got {rope!r}.")
        if "rope_theta" not in d and "rope_theta" in (rope or {}):
            d["rope_theta"] = rope["rope_theta"]
        scaling = d.get("rope_scaling") or rope or {}
        if isinstance(scaling, dict):  # {"rope_type": "yarn", ...} (or "type", the older key)
            scaling = scaling.get("rope_type", scaling.get("type", "default"))
        if scaling != "default":  # the model computes plain RoPE only: a scaled one would differ
            raise ValueError(f"{where} asks for RoPE scaling {scaling!r}, which this model does "
                             "not implement; use a checkpoint with plain RoPE.")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if missing:
            raise ValueError(f"{where} lacks {missing}, which every Qwen3 or SDAR config.json has.")
        if not (isinstance(d.get("model_type"), str) and d["model_type"] in ARCHITECTURES):
            has = f"model_type {d['model_type']!r}" if "model_type" in d else "no model_type"
            raise ValueError(f"{where} has {has}; only 'sdar' (block diffusion) and 'qwen3' "
                             "(autoregressive) "
                             "are accepted, and nothing guesses which kind a model is.")
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


SDAR_8B = Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                 mask_token_id=151669, block_size=4)
SDAR_4B = Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                 mask_token_id=151669, block_size=4)  # untied: SDAR-4B-Chat stores lm_head
SDAR_1_7B = Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                   num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                   head_dim=128, rope_theta=1e6, mask_token_id=151669, block_size=4)
PRESETS = {"sdar-8b": SDAR_8B, "sdar-4b": SDAR_4B, "sdar-1.7b": SDAR_1_7B}


# ----------------------------------------------------------------------------- transformer

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float()  # the variance in float32, as the reference does
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope(pos, head_dim, theta, dtype):
    """cos, sin for explicit positions (T,) or (B, T); computed in float32, then cast."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    freqs = pos.float()[..., None] * inv_freq  # (..., T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout, not interleaved
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if pos.dim() == 1:
        return cos[None, None], sin[None, None]  # (1, 1, T, D)
    return cos[:, None], sin[:, None]  # (B, 1, T, D)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # (B,H,T,D)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # (B,Hkv,T,D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, Hkv, len + T, D): committed slots + the new ones
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache, layer):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class KVCache:
    """Preallocated keys/values for a batch of rows, each with its own length. Row r's first
    lens[r] slots are committed; a forward writes its T new tokens of row r at [lens[r],
    lens[r] + T), and they attend over the row's committed slots and, by the forward's mask, each
    other. commit(n) keeps n of them (per row, or the same n for every row).

    Per-row offsets, not padding, because rows grow by different amounts at every step (ragged
    acceptance): a row's slots stay contiguous from 0, and a validity mask (visible) hides the
    rest. Memory: layers x rows x kv_heads x max_len x head_dim x 2 (keys, values), sized by the
    longest row's prompt and budget; finished rows leave with keep_rows."""

    def __init__(self, c: Config, max_len, batch_size, device, dtype):
        shape = (c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.lens, self.written = max_len, [0] * batch_size, 0

    def start(self, batch_size, T):
        if batch_size != len(self.lens):
            raise ValueError(f"a batch of {batch_size} was given to a KV cache built for "
                             f"{len(self.lens)}; "
                             "make one with model.new_cache(max_len, batch_size).")
        if max(self.lens) + T > self.max_len:
            raise ValueError(f"KV cache overflow: {max(self.lens)} committed + {T} new tokens > "
                             f"max_len {self.max_len}; make a larger cache with "
                             "model.new_cache(max_len).")
        self.written = T
        self.slots = None  # the new tokens' slots, (R, T), when rows differ in length
        if len(set(self.lens)) > 1:
            lens = torch.tensor(self.lens, device=self.k.device)
            self.slots = lens[:, None] + torch.arange(T, device=self.k.device)

    def visible(self, mask, T):
        """(R or 1, 1, T, S) bool: what each new token attends to over [0, S), S the longest row's
        committed slots + T: its row's committed slots and, by mask ((T, T) or (R, T, T); None:
        all), the row's new tokens."""
        dev, L = self.k.device, max(self.lens)
        if mask is None and self.slots is None:
            return None  # every token sees everything
        mask = torch.ones(T, T, dtype=torch.bool, device=dev) if mask is None else mask
        if self.slots is None:  # every row as long: [committed | new]
            return torch.cat([mask.new_ones(*mask.shape[:-1], L), mask], dim=-1)[..., None, :, :]
        col = torch.arange(L + T, device=dev) - torch.tensor(self.lens, device=dev)[:, None]
        new = mask.expand(len(self.lens), T, T).gather(  # (R, T, S): column c is new token c - len
            2, col.clamp(0, T - 1)[:, None, :].expand(-1, T, -1))
        return ((col < 0)[:, None, :] | new & (col < T)[:, None, :])[:, None]

    def write(self, layer, k, v):
        """Store the new keys and values (R, Hkv, T, D); return each row's keys and values over the
        longest row's committed slots and the new ones."""
        end = max(self.lens) + k.shape[2]
        if self.slots is None:
            self.k[layer, :, :, self.lens[0]:end] = k
            self.v[layer, :, :, self.lens[0]:end] = v
        else:
            rows = torch.arange(len(self.lens), device=k.device)[:, None]
            self.k[layer][rows, :, self.slots] = k.transpose(1, 2)  # (R, T, Hkv, D) by (row, slot)
            self.v[layer][rows, :, self.slots] = v.transpose(1, 2)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, n, keep=None):
        """Keep n of the last forward's new slots of each row (an int: every row; a list: per row):
        the first n, or those at offsets keep[r] (n[r] ascending ints; None: the first), moved to
        the front as if the forward had written only them."""
        n = [n] * len(self.lens) if isinstance(n, int) else list(n)
        if not all(0 <= m <= self.written for m in n):
            raise ValueError(f"cannot commit {max(n)} tokens: the last forward wrote "
                             f"{self.written}.")
        for r, offsets in enumerate(keep or ()):
            if offsets is not None:
                src = torch.as_tensor(offsets, device=self.k.device) + self.lens[r]
                for kv in (self.k, self.v):
                    kv[:, r, :, self.lens[r]:self.lens[r] + n[r]] = kv[:, r, :, src]
        self.lens = [length + m for length, m in zip(self.lens, n)]
        self.written = 0

    def rewind(self, lengths):
        """Forget the committed slots past lengths (an int: every row; a list: per row):
        speculation stores drafts tentatively."""
        lengths = [lengths] * len(self.lens) if isinstance(lengths, int) else list(lengths)
        if not all(0 <= m <= length for m, length in zip(lengths, self.lens)):
            raise ValueError(f"cannot rewind to {lengths}: {self.lens} slots are committed.")
        self.lens, self.written = lengths, 0

    def keep_rows(self, rows):
        """Keep only these rows (finished rows leave the batch): one copy of their slots."""
        index = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        self.k, self.v = self.k[:, index], self.v[:, index]
        self.lens, self.written = [self.lens[r] for r in rows], 0

    def reset(self):
        self.lens, self.written = [0] * len(self.lens), 0


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = c = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, max_len, batch_size=1):
        w = self.model.embed_tokens.weight
        return KVCache(self.config, max_len, batch_size, w.device, w.dtype)

    def forward(self, idx, pos, mask=None, cache=None):
        """idx (B, T) ids; pos (T,) or (B, T) RoPE positions (may repeat); mask (T, T) or
        (B, T, T) bool, True = may attend, None = all attend; with a cache each row also sees its
        committed slots. Returns logits (B, T, vocab), no shift: the logits at i predict the token
        at i."""
        B, T = idx.shape
        x = self.model.embed_tokens(idx)
        cos, sin = rope(pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        if cache is not None:
            cache.start(B, T)
            mask = cache.visible(mask, T)  # (B or 1, 1, T, committed + T)
        elif mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, T, T): one mask for every head
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.lm_head(self.model.norm(x))


def read_json(path):
    """The JSON object in `path`, or an error that names the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download or write it again.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds JSON that is not an object; download or write it again.")
    return obj

