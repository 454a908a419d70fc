"""SDAR in plain PyTorch: a Qwen3 transformer with explicit positions, mask and KV cache,
a tiny safetensors reader/writer, checkpoint load/save, and the tiktoken tokenizer.

SDAR is Qwen3 with block-diffusion attention, so the module tree mirrors the checkpoint
names (model.layers.N.self_attn.q_proj, ...) and loading is a plain load_state_dict. The
model knows nothing about blocks: callers pass the attention mask and the RoPE positions.
"""
import json
import mmap
import os
import sys
import tempfile
import unicodedata
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import tiktoken
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
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, src):
        """Read a config.json path or dict, ignoring the keys we do not use."""
        where = "the config" if isinstance(src, dict) else str(src)
        d = dict(src) if isinstance(src, dict) else _read_json(src)
        if "rope_theta" not in d and "rope_theta" in (d.get("rope_parameters") or {}):
            d["rope_theta"] = d["rope_parameters"]["rope_theta"]  # newer writers nest it
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if missing:
            raise ValueError(f"{where} lacks {missing}, which every Qwen3 or SDAR config.json has.")
        if d.get("model_type") not in ARCHITECTURES:
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


# ----------------------------------------------------------------------------- safetensors

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
assert sys.byteorder == "little", "safetensors data is little-endian, and so must this host be"


def read_safetensors(path, device="cpu", dtype=None):
    """{name: tensor} from a .safetensors file, each tensor copied once onto `device`."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise ValueError(f"{path} is truncated (its header does not fit in {size} bytes); "
                             "download or write it again.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the header is not JSON ({e}); point at a .safetensors "
                             "file.") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    header.pop("__metadata__", None)
    out, data = {}, size - 8 - n
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which this loader "
                             "does "
                             f"not support ({', '.join(DTYPES)}); convert the checkpoint to bf16.")
        t_dtype, (b, e) = DTYPES[info["dtype"]], info["data_offsets"]
        numel = torch.Size(info["shape"]).numel()
        if not 0 <= b <= e <= data or e - b != numel * t_dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} claims bytes [{b}, {e}) of {data} data bytes "
                             f"for shape {info['shape']}; the offsets fall outside the file "
                             "(truncated or corrupt).")
        t = torch.frombuffer(buf, dtype=t_dtype, count=numel, offset=8 + n + b) if numel else \
            torch.empty(0, dtype=t_dtype)
        out[name] = t.reshape(info["shape"]).to(device=device, dtype=dtype or t_dtype, copy=True)
    return out


def write_safetensors(tensors, path):
    """Write {name: tensor} in the standard format, atomically (temporary file, then rename)."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    names = {v: k for k, v in DTYPES.items()}
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned
    _atomic_write(path, [len(head).to_bytes(8, "little"), head, *blobs])


def _atomic_write(path, chunks):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; a checkpoint is an ordinary readable file
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_json(path):
    """The JSON object in `path`, or an error that names the file."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download or write it again.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds JSON that is not an object; download or write it again.")
    return obj


# ----------------------------------------------------------------------------- load / save

def load_config(path) -> Config:
    """The Config of a checkpoint folder, from its config.json."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: point at an SDAR or Qwen3 checkpoint "
                                "folder (config.json + model.safetensors or "
                                "model.safetensors.index.json).")
    return Config.from_json(path / "config.json")


def weight_files(path):
    """The safetensors files of a checkpoint folder, each checked to be there."""
    path = Path(path)
    if (path / "model.safetensors.index.json").is_file():
        weight_map = _read_json(path / "model.safetensors.index.json")["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has config.json but no model.safetensors or "
                                "model.safetensors.index.json; the weights are missing.")
    for f in files:
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} is listed in model.safetensors.index.json but "
                                    "missing.")
    return files


def load(path, device="cpu", dtype=None) -> Transformer:
    """Load an SDAR/Qwen3 checkpoint folder (config.json + model.safetensors or a sharded
    model.safetensors.index.json) straight onto `device`, in eval mode."""
    path = Path(path)
    config, files = load_config(path), weight_files(path)
    with torch.device("meta"):
        model = Transformer(config)  # no memory: the checkpoint's tensors are assigned below
    state = {}
    for f in files:
        state.update(read_safetensors(path / f, device, dtype))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding serves as the head
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shared = set(state) & set(expected)
    bad = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in shared
                 if state[k].shape != expected[k])
    if missing or unexpected or bad:
        raise ValueError(f"checkpoint {path} does not match its config.json: missing {missing}, "
                         f"unexpected {unexpected}, mis-shaped {bad}.")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def save(model: Transformer, path):
    """Write config.json + model.safetensors (tied head left out, as the standard tools do)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = {"architectures": [ARCHITECTURES[model.config.model_type]], "torch_dtype": dtype,
              **{k: v for k, v in asdict(model.config).items() if v is not None}}
    write_safetensors(state, path / "model.safetensors")
    _write_json(path / "config.json", config)


def check_pair(target, draft, target_tok, draft_tok):
    """Raise ValueError unless a draft checkpoint can propose to a target checkpoint (speculative
    decoding): an SDAR model with a mask token, giving every token of the target the same id,
    trained with a diffusion target's block length and mask token."""
    if draft.config.model_type != "sdar" or draft_tok.mask_id is None:
        raise ValueError("the draft is not an SDAR model with a mask token; this project drafts "
                         "with diffusion models")
    if not draft_tok.covers(target_tok) or draft.config.vocab_size != target.config.vocab_size:
        raise ValueError("the draft does not give every token of the target the same id; "
                         "speculation needs one vocabulary")
    if target.config.model_type != "sdar":
        return
    if draft.config.block_size != target.config.block_size:
        raise ValueError(f"the draft was trained with {describe(draft.config.block_size)} and the "
                         f"target with {describe(target.config.block_size)}; they must match")
    if draft.config.mask_token_id != target.config.mask_token_id:
        raise ValueError("the draft and the target use different mask token ids")


def describe(block_size):
    return "no block_size in its config.json" if block_size is None else f"block {block_size}"


# ----------------------------------------------------------------------------- tokenizer

# Qwen2's pre-tokenizer split (also used by Qwen3/SDAR); note \p{N} takes one digit at a time.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def bytes_to_unicode():
    """GPT-2's byte -> printable character table that vocab.json is written in:
    printable bytes stand for themselves, the other 68 become chr(256 + k) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(others)}}


class Tokenizer:
    """A tiktoken Encoding and the SDAR facts around it: the mask id (None for Qwen3's), stop ids,
    the chat prompt."""

    def __init__(self, enc, specials, mask_id, stop_ids, ranks):
        self.enc = enc
        self.specials = dict(specials)  # name -> id for every added token
        self.mask_id = mask_id
        self.stop_ids = tuple(stop_ids)
        self.ranks = ranks  # byte string -> id of the base vocabulary, the Encoding's own dict

    @property
    def vocab_size(self):
        return self.enc.n_vocab  # ids the tokenizer knows; a model's embedding may be larger

    def id_of(self, name):
        return self.specials[name]

    def encode(self, text):
        # NFC first, as Qwen2Tokenizer does; then added tokens in the text become
        # single ids (HF splits them out of user text too) and the rest is BPE.
        return self.enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def decode(self, ids):
        # A token may hold half a UTF-8 character; a lone half decodes to U+FFFD.
        return self.enc.decode(list(ids), errors="replace")

    def chat(self, user, system=None, enable_thinking=True):
        """The Qwen3/SDAR chat template, add_generation_prompt=True (no BOS); thinking off adds the
        empty think block."""
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        text += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        return self.encode(text if enable_thinking else text + "<think>\n\n</think>\n\n")

    def covers(self, other):
        """True when each token of `other` has the same id here; extra specials here (SDAR's
        <|MASK|>) are fine."""
        same_specials = all(self.specials.get(name) == i for name, i in other.specials.items())
        return self.ranks == other.ranks and same_specials


def load_tokenizer(path):
    """Build a Tokenizer from an HF folder (vocab.json + tokenizer_config.json).
    Ranks are ids: Qwen's merge i creates id 256 + i, so merges.txt need not be read."""
    path = Path(path)
    if not (path / "vocab.json").is_file():
        raise FileNotFoundError(f"{path / 'vocab.json'} not found; pass a model folder holding "
                                "the HF tokenizer files (vocab.json, tokenizer_config.json).")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = _read_json(path / "vocab.json")
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in vocab.items()}

    # added_tokens_decoder is the authoritative list; added_tokens.json is the older spelling.
    config = {}
    if (path / "tokenizer_config.json").is_file():
        config = _read_json(path / "tokenizer_config.json")
    specials = {t["content"]: int(i) for i, t in (config.get("added_tokens_decoder") or {}).items()}
    if not specials and (path / "added_tokens.json").is_file():
        specials = _read_json(path / "added_tokens.json")
    # spelled <|MASK|> in tokenizer_config.json, <MASK> in added_tokens.json; Qwen3's has none
    mask = next((specials[n] for n in ("<|MASK|>", "<MASK>") if n in specials), None)

    gen = path / "generation_config.json"
    eos = _read_json(gen).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = [specials[n] for n in ("<|im_end|>", "<|endoftext|>") if n in specials]
    stop_ids = [eos] if isinstance(eos, int) else eos
    if not stop_ids:
        raise ValueError(f"{path} defines no stop token; set eos_token_id in its "
                         "generation_config.json.")
    enc = tiktoken.Encoding(path.name or "tokenizer", pat_str=QWEN2_PATTERN,
                            mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, specials, mask, stop_ids, ranks)


def _write_json(path, obj):
    _atomic_write(path, [json.dumps(obj, ensure_ascii=False, indent=1).encode()])


def write_byte_tokenizer(path, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"),
                         stop=("<|im_end|>", "<|endoftext|>")):
    """Write a byte-level tokenizer folder (id = byte value, no merges, specials from 256)
    in the HF layout, so toy models load through load_tokenizer like SDAR does."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids = {name: 256 + i for i, name in enumerate(specials)}
    _write_json(path / "vocab.json", {c: b for b, c in bytes_to_unicode().items()})
    _atomic_write(path / "merges.txt", [b"#version: 0.2\n"])
    decoder = {str(i): {"content": name, "special": True} for name, i in ids.items()}
    _write_json(path / "tokenizer_config.json", {"added_tokens_decoder": decoder})
    _write_json(path / "generation_config.json", {"eos_token_id": [ids[name] for name in stop]})
    return path
