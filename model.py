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

def norm(x, eps):
    """x over its root mean square (last dimension), computed in float32 as the reference does."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], eps=eps)
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * norm(x, self.eps)


def rope_table(n, head_dim, theta, dtype, device):
    """cos, sin (n, head_dim) for positions 0..n-1: computed in float32, then cast; rotate-half
    layout (the two halves share a frequency), not interleaved; sin's first half negated
    (apply_rope)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    freqs = torch.arange(n, device=device).float()[:, None] * inv_freq  # (n, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)


def apply_rope(x, cos, sin):
    """x rotated: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), its halves swapped by a roll
    (sin's first half holds -sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on queries and keys (Qwen3's), its three
    projections applied as one matrix (`fused`)."""

    def __init__(self, c: Config):
        super().__init__()
        self.head_dim, self.heads = c.head_dim, (c.num_attention_heads, c.num_key_value_heads)
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.packed = None  # fuse()'s

    def fused(self):
        """The q, k, v projections as one matrix ((H + 2 Hkv) D, E) and the q and k norms' weights
        per head (H + Hkv, D): made once by fuse() for inference, concatenated at each call when
        training (so that gradients reach the checkpoint's tensors)."""
        if self.packed is not None and not self.training:
            return self.packed
        H, Hkv = self.heads
        return (torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]),
                torch.cat([self.q_norm.weight.expand(H, -1), self.k_norm.weight.expand(Hkv, -1)]))

    def forward(self, x, cos, sin, mask, cache, layer):
        (B, T, _), (H, Hkv) = x.shape, self.heads
        qkv, norm_weight = self.fused()
        qk, v = F.linear(x, qkv).view(B, T, H + 2 * Hkv, self.head_dim).split([H + Hkv, Hkv], 2)
        qk = apply_rope((norm_weight * norm(qk, self.q_norm.eps)).transpose(1, 2), cos, sin)
        q, k = qk.split([H, Hkv], 1)  # (B, H, T, D), (B, Hkv, T, D)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, Hkv, len + T, D): committed slots + the new ones
        q = q.reshape(B, Hkv, H // Hkv * T, self.head_dim)  # a kv head's queries folded in a row
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask: folded(...)
        return self.o_proj(y.view(B, H, T, -1).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU, its gate and up projections applied as one matrix (`fused`)."""

    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.packed = None  # fuse()'s

    def fused(self):
        if self.packed is not None and not self.training:
            return self.packed
        return torch.cat([self.gate_proj.weight, self.up_proj.weight])

    def forward(self, x):
        gate, up = F.linear(x, self.fused()).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


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
    """Preallocated keys and values for a batch of rows, each with its own length, kept on the
    device: lens (R,) counts each row's committed slots. A forward writes row r's T new tokens at
    slots [lens[r], lens[r] + T); they attend over the row's committed slots and, by the forward's
    mask, each other; commit(n) keeps n of them, per row. The host never reads lens: it keeps
    `bound`, at least the longest row (a forward reads slots [0, bound + T) and a validity mask
    hides each row's rest), which a decode tightens from the readback it makes anyway. So a
    decode's loop needs no host sync for its cache.

    Memory: layers x rows x kv_heads x max_len x head_dim x 2 (keys, values), sized by the longest
    row's prompt and budget."""

    def __init__(self, c: Config, max_len, batch_size, device, dtype):
        shape = (c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len, self.bound, self.written = max_len, 0, 0
        self.even = True  # every row is known to be `bound` long: plain slices, no validity mask
        self.whole = False  # read every preallocated slot (static shapes for a compiled forward)

    def start(self, batch_size, T):
        if batch_size != len(self.lens):
            raise ValueError(f"a batch of {batch_size} was given to a KV cache built for "
                             f"{len(self.lens)}; "
                             "make one with model.new_cache(max_len, batch_size).")
        if self.bound + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.bound} committed + {T} new tokens > "
                             f"max_len {self.max_len}; make a larger cache with "
                             "model.new_cache(max_len).")
        self.written = T
        self.slots = self.lens[:, None] + torch.arange(T, device=self.lens.device)  # (R, T)

    def span(self, T):
        """The slots a forward of T new tokens reads: [0, bound + T), or every one (whole)."""
        return self.max_len if self.whole else self.bound + T

    def visible(self, mask, T):
        """(R or 1, 1, T, span) bool, or None when every token sees everything: what each new
        token attends to: its row's committed slots and, by mask ((T, T) or (R, T, T); None:
        all), the row's new tokens."""
        if self.even and not self.whole:  # every row: [committed | new]
            if mask is None:
                return None
            seen = torch.cat([mask.new_ones(*mask.shape[:-1], self.bound), mask], -1)
            return seen.view(-1, 1, T, self.bound + T)
        R, dev = len(self.lens), self.lens.device
        mask = torch.ones(T, T, dtype=torch.bool, device=dev) if mask is None else mask
        col = torch.arange(self.span(T), device=dev) - self.lens[:, None]  # (R, S): new token col
        new = mask.expand(R, T, T).gather(2, col.clamp(0, T - 1)[:, None, :].expand(-1, T, -1))
        return ((col < 0)[:, None, :] | new & (col < T)[:, None, :])[:, None]

    def write(self, layer, k, v):
        """Store the new keys and values (R, Hkv, T, D); return each row's keys and values over the
        slots a forward reads (span)."""
        end = self.span(k.shape[2])
        if self.even and not self.whole:
            self.k[layer, :, :, self.bound:end] = k
            self.v[layer, :, :, self.bound:end] = v
        else:
            rows = torch.arange(len(self.lens), device=k.device)[:, None]
            self.k[layer][rows, :, self.slots] = k.transpose(1, 2)  # (R, T, Hkv, D) by (row, slot)
            self.v[layer][rows, :, self.slots] = v.transpose(1, 2)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, n, keep=None, most=None):
        """Keep n of the last forward's new tokens in each row (an int: every row; a list or a
        tensor (R,): per row): the first n, or those at offsets keep (R, K) (per row ascending; a
        row's entries past its n are ignored), moved to the front as if the forward had written
        only them. most: what the host knows of n's largest (default: all that was written)."""
        if isinstance(n, int):
            if not 0 <= n <= self.written:
                raise ValueError(f"cannot commit {n} tokens: the last forward wrote "
                                 f"{self.written}.")
        else:
            n = torch.as_tensor(n, device=self.lens.device)
            self.even = False  # the host no longer knows every row's length
        if keep is not None:
            keep = torch.as_tensor(keep, device=self.lens.device)
            rows = torch.arange(len(self.lens), device=keep.device)[:, None]
            src = self.lens[:, None] + keep  # (R, K)
            dst = self.lens[:, None] + torch.arange(keep.shape[1], device=keep.device)
            for kv in (self.k, self.v):
                kv[:, rows, :, dst] = kv[:, rows, :, src]
        self.lens = self.lens + n
        self.bound += n if isinstance(n, int) else self.written if most is None else most
        self.written = 0

    def rewind(self, lengths):
        """Forget the committed slots past lengths (R,) (speculation stores drafts tentatively)."""
        self.lens = torch.as_tensor(lengths, device=self.lens.device)
        self.written, self.even = 0, False

    def tighten(self, longest, even=False):
        """The longest row's length, as the host learned it (a decode's readback); even: every
        row is that long."""
        self.bound, self.even = longest, even

    def keep_rows(self, rows):
        """Keep only these rows (a list or a tensor of their places): one copy of their slots."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.k.device)
        self.k, self.v = self.k[:, index], self.v[:, index]
        self.lens, self.written = self.lens[index], 0

    def reset(self):
        self.lens, self.bound, self.written, self.even = self.lens * 0, 0, 0, True


def folded(mask, groups):
    """The attention mask (b, 1, T, S) for queries folded by kv head: a kv head's `groups` query
    heads side by side, (b, 1, groups T, S), the same mask each. Folded, grouped-query attention
    is plain attention (no kv head repeated), which fused kernels take with any mask; None (all
    attend) stays None, and so lets the flash kernel run."""
    if mask is None or groups == 1:
        return mask
    b, _, T, S = mask.shape
    return mask[:, :, None].expand(b, 1, groups, T, S).reshape(b, 1, groups * T, S)


def bucket(T):
    """The query width a compiled forward pads T new tokens to: a power of two up to 1024, then
    a multiple of 1024 (a few graphs for every width a decode meets)."""
    return 1 << (T - 1).bit_length() if T <= 1024 else -(-T // 1024) * 1024


def padded(idx, pos, mask, width):
    """A forward's inputs padded to `width` tokens: padding (id 0 at position 0) after the real
    tokens, seeing only itself and seen by none (it is never committed)."""
    B, T = idx.shape
    if width == T:
        return idx, pos, mask
    idx = F.pad(idx, (0, width - T))
    pos = F.pad(pos, (0, width - T))
    real = torch.ones(T, T, dtype=torch.bool, device=idx.device) if mask is None else mask
    out = torch.eye(width, dtype=torch.bool, device=idx.device).repeat(*real.shape[:-2], 1, 1)
    out[..., :T, :T] = real
    return idx, pos, out


def share(packed, *linears):
    """The linears' weights become views of packed, their rows in order."""
    for linear, view in zip(linears, packed.split([lin.weight.shape[0] for lin in linears])):
        linear.weight = nn.Parameter(view)


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
        cache = KVCache(self.config, max_len, batch_size, w.device, w.dtype)
        cache.whole = self.static  # compiled: one key length for every forward
        return cache

    static = False  # compiled (sdar.compiled): query widths in buckets, caches read whole

    def fuse(self):
        """Pack each layer's projections once for inference, after its weights are in place
        (Attention.fused, MLP.fused): the checkpoint's tensors become views of the packed ones,
        so memory is not doubled."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.packed = tuple(t.detach() for t in attn.fused())
            mlp.packed = mlp.fused().detach()
            share(attn.packed[0], attn.q_proj, attn.k_proj, attn.v_proj)
            share(mlp.packed, mlp.gate_proj, mlp.up_proj)
        return self

    def rope(self, pos, dtype):
        """cos, sin at positions pos ((T,) or (B, T)), as (1 or B, 1, T, head_dim), from a table
        made once per device and dtype for max_position_embeddings positions."""
        c = self.config
        if getattr(self, "table", None) is None or self.table[0].dtype != dtype or \
                self.table[0].device != pos.device:
            self.table = rope_table(c.max_position_embeddings, c.head_dim, c.rope_theta, dtype,
                                    pos.device)
        cos, sin = (t[pos] for t in self.table)
        if pos.dim() == 1:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]

    def forward(self, idx, pos, mask=None, cache=None):
        """idx (B, T) ids; pos (T,) or (B, T) RoPE positions (may repeat); mask (T, T) or
        (B, T, T) bool, True = may attend, None = all attend; with a cache each row also sees its
        committed slots. Returns logits (B, T, vocab), no shift: the logits at i predict the token
        at i. (hidden() and lm_head apart: the logits only where they are read.)"""
        return self.lm_head(self.hidden(idx, pos, mask, cache))

    def hidden(self, idx, pos, mask=None, cache=None):
        """The final hidden states (B, T, hidden_size), normed (what the head reads): forward's
        arguments, and no logits (a prefill reads none)."""
        T = idx.shape[1]
        if self.static:  # compiled: a few query widths, so a few graphs (within the cache)
            room = T if cache is None else cache.max_len - cache.bound
            idx, pos, mask = padded(idx, pos, mask, max(T, min(bucket(T), room)))
        B, width = idx.shape
        x = self.model.embed_tokens(idx)
        cos, sin = self.rope(pos, x.dtype)
        if cache is not None:
            cache.start(B, width)
            mask = cache.visible(mask, width)  # (B or 1, 1, width, cache.span(width))
        elif mask is not None:
            mask = mask.view(-1, 1, width, width)  # (B or 1, 1, T, T): one mask for every head
        mask = folded(mask, self.config.num_attention_heads // self.config.num_key_value_heads)
        return self.body(x, cos, sin, mask, cache)[:, :T]

    def body(self, x, cos, sin, mask, cache):
        """Every layer, then the final norm: what sdar.compiled compiles."""
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.model.norm(x)


def read_json(path):
    """The JSON object in `path`, or an error that names the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download or write it again.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds JSON that is not an object; download or write it again.")
    return obj

