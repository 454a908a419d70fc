"""model.py: checkpoints round-trip, the cache equals no-cache forwards, RoPE is what the maths says."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import model
from model import Config, Transformer



def tiny(tie=False, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"num_hidden_layers": 3, **kw}
    c = Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rope_theta=1e4, tie_word_embeddings=tie, **kw)
    m = Transformer(c).eval()
    with torch.no_grad():  # norms away from 1 so that a missing norm would show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return m


def logits(m, idx):
    with torch.no_grad():
        T = idx.shape[1]
        return m(idx, torch.arange(T), torch.ones(T, T, dtype=torch.bool).tril())


def block_mask(pos, block):
    """Reference block-causal mask, read off the definition: key block <= query block."""
    return torch.tensor([[k // block <= q // block for k in pos] for q in pos])


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kind,arch", [("sdar", "SDARForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_save_load_round_trip(tmp_path, tie, kind, arch):
    """save -> load gives the same config, kind, parameters and logits, tied or not."""
    m = tiny(tie, model_type=kind)
    checkpoint.save(m, tmp_path)
    header = json.loads((tmp_path / "config.json").read_text())
    assert header["tie_word_embeddings"] is tie and header["hidden_size"] == 48
    assert header["model_type"] == kind and header["architectures"] == [arch]
    m2 = checkpoint.load(tmp_path)
    assert m2.config == m.config and m2.config.model_type == kind
    idx = torch.randint(0, 97, (2, 11))
    assert torch.equal(logits(m, idx), logits(m2, idx))
    assert (m2.lm_head.weight is m2.model.embed_tokens.weight) is tie
    assert not m2.training


def test_sharded_checkpoint_loads_the_same(tmp_path):
    """A checkpoint split by hand into two shards with an index loads as the single file does."""
    m = tiny()
    state = m.state_dict()
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, keys in shards.items():
        checkpoint.write_safetensors({k: state[k] for k in keys}, tmp_path / f)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    checkpoint.save(m, tmp_path / "single")
    (tmp_path / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    idx = torch.randint(0, 97, (1, 9))
    assert torch.equal(logits(checkpoint.load(tmp_path), idx), logits(m, idx))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_round_trip_and_cast(tmp_path, dtype):
    """bf16/f16 tensors survive the writer and reader bit for bit; `dtype=` casts on load."""
    m = tiny().to(dtype)
    checkpoint.save(m, tmp_path)
    m2 = checkpoint.load(tmp_path)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert b.dtype == dtype and torch.equal(a, b), k
    assert checkpoint.load(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("block,prefix", [(4, 8), (4, 0), (8, 16), (3, 9)])
def test_cache_equals_one_no_cache_forward(block, prefix):
    """Prefill + commit, then a block with the cache, equals one no-cache forward with the block mask."""
    m = tiny()
    T = prefix + block
    idx = torch.randint(0, 97, (1, T))
    pos = torch.arange(T)
    with torch.no_grad():
        full = m(idx, pos, block_mask(pos.tolist(), block))
        cache = m.new_cache(64)
        if prefix:
            m(idx[:, :prefix], pos[:prefix], block_mask(pos[:prefix].tolist(), block), cache)
            cache.commit(prefix)
        part = m(idx[:, prefix:], pos[prefix:], torch.ones(block, block, dtype=torch.bool), cache)
    torch.testing.assert_close(part, full[:, prefix:], rtol=1e-5, atol=1e-5)


def test_scratch_tokens_are_invisible():
    """Uncommitted tokens of one forward do not leak into the next one."""
    m = tiny()
    idx = torch.randint(0, 97, (1, 12))
    ones = torch.ones(4, 4, dtype=torch.bool)
    with torch.no_grad():
        cache = m.new_cache(32)
        m(idx[:, :8], torch.arange(8), block_mask(range(8), 4), cache)
        cache.commit(8)
        m(torch.randint(0, 97, (1, 4)), torch.arange(8, 12), ones, cache)  # scratch, never committed
        m(torch.randint(0, 97, (1, 6)), torch.arange(8, 14), None, cache)
        after = m(idx[:, 8:], torch.arange(8, 12), ones, cache)
        clean = m(idx, torch.arange(12), block_mask(range(12), 4))[:, 8:]
    torch.testing.assert_close(after, clean, rtol=1e-5, atol=1e-5)
    assert cache.lens.tolist() == [8]


def test_cache_errors(refuses):
    """Overflow, over-commit and a wrong batch size raise with a sentence that says what to do."""
    m = tiny()
    cache = m.new_cache(8)
    with torch.no_grad():
        m(torch.zeros(1, 6, dtype=torch.long), torch.arange(6), None, cache)
        with refuses(ValueError, match="cannot commit 7"):
            cache.commit(7)
        cache.commit(6)
        with refuses(ValueError, match="overflow.*new_cache"):
            m(torch.zeros(1, 3, dtype=torch.long), torch.arange(3), None, cache)
        with refuses(ValueError, match="batch of 2"):
            m(torch.zeros(2, 1, dtype=torch.long), torch.arange(1), None, cache)
    cache.reset()
    assert cache.lens.tolist() == [0]


def test_rows_of_different_lengths_equal_each_row_alone():
    """A batched cache whose rows hold 4, 12 and 8 committed tokens: one forward of 4 new tokens per
    row (each row its own positions and mask) gives each row the logits of a no-cache forward on
    that row alone. Then a per-row commit (row 1 keeping offsets 2 and 3, moved into place), a row
    leaving (keep_rows), and the next forward still matches; scratch slots are never seen."""
    m, block = tiny(), 4
    seqs = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 20, 16)]
    lens = [4, 12, 8]
    cache = m.new_cache(32, 3)
    with torch.no_grad():
        for n in (5, 3):  # scratch written past every row, never committed
            m(torch.randint(0, 97, (3, n)), torch.arange(n), None, cache)
        cache.commit(0)
        m(torch.stack([s[:8] for s in seqs]), torch.arange(8), block_mask(range(8), block), cache)
        cache.commit([4, 8, 8])  # rows now hold 4, 8 and 8
        m(torch.stack([s[lengths:lengths + 4] for s, lengths in zip(seqs, [4, 8, 8])]),
          torch.tensor([[4, 5, 6, 7], [8, 9, 10, 11], [8, 9, 10, 11]]),
          block_mask(range(4), block), cache)
        cache.commit([0, 4, 0])
        assert cache.lens.tolist() == lens
        new = torch.stack([s[n:n + 4] for s, n in zip(seqs, lens)])
        pos = torch.stack([torch.arange(n, n + 4) for n in lens])
        attend = torch.stack([torch.ones(4, 4, dtype=torch.bool), block_mask(range(4), 2),
                              torch.ones(4, 4, dtype=torch.bool).tril()])
        got = m(new, pos, attend, cache)
        for r, (s, n) in enumerate(zip(seqs, lens)):
            full = block_mask(range(n + 4), block)
            full[n:, n:] = attend[r]
            want = m(s[None, :n + 4], torch.arange(n + 4), full)[0, n:]
            torch.testing.assert_close(got[r], want, rtol=1e-5, atol=1e-5)
        cache.commit([4, 2, 0], [[0, 1, 2, 3], [2, 3, 0, 0], [0, 0, 0, 0]])  # row 1: 2 and 3
        assert cache.lens.tolist() == [8, 14, 8]
        cache.keep_rows([1, 2])
        assert cache.lens.tolist() == [14, 8]
        nxt = torch.stack([seqs[1][16:18], seqs[2][8:10]])
        got = m(nxt, torch.tensor([[16, 17], [8, 9]]), torch.ones(2, 2, dtype=torch.bool), cache)
        # row 1 alone: tokens 12, 13 were computed, and 14, 15 saw them, but only 14, 15 were kept
        see = torch.zeros(18, 18, dtype=torch.bool)
        see[:12, :12] = block_mask(range(12), block)
        see[12:16, :12], see[12:16, 12:16] = True, block_mask(range(4), 2)
        see[16:, :12], see[16:, 14:] = True, True
        want = m(seqs[1][None, :18], torch.arange(18), see)[0, 16:]
        torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
        see = block_mask(range(10), block)
        see[8:, 8:] = True
        want = m(seqs[2][None, :10], torch.arange(10), see)[0, 8:]
        torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-5)


def test_visible_matches_a_loop():
    """The mask a forward attends with over a cache whose rows differ in length, read off the rule:
    row r's new token i sees its committed slots (< lens[r]) and new token j where the mask says."""
    m, T = tiny(), 3
    cache = m.new_cache(16, 3)
    cache.rewind(torch.tensor([2, 5, 0]))
    cache.tighten(5)
    cache.start(3, T)
    mask = torch.rand(3, T, T) < 0.5
    got = cache.visible(mask, T)[:, 0].tolist()
    for r, n in enumerate(cache.lens.tolist()):
        for i in range(T):
            want = [c < n or (n <= c < n + T and bool(mask[r, i, c - n])) for c in range(5 + T)]
            assert got[r][i] == want


def rotate_by_hand(x, pos, theta):
    """Direct rotary maths: pair (x_j, x_{j+D/2}) turns by angle pos * theta^(-2j/D)."""
    D = x.shape[-1]
    out = x.clone()
    for t, p in enumerate(pos):
        for j in range(D // 2):
            a = p * theta ** (-2 * j / D)
            c, s = torch.cos(torch.tensor(a, dtype=torch.float64)), torch.sin(torch.tensor(a, dtype=torch.float64))
            x1, x2 = x[t, j].double(), x[t, j + D // 2].double()
            out[t, j], out[t, j + D // 2] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


def test_rope_matches_direct_rotation_with_repeats_and_shifts():
    """Repeated and shifted positions rotate exactly as the rotary formula says."""
    x = torch.randn(6, 16)
    for pos in ([0, 1, 2, 3, 4, 5], [5, 6, 6, 7, 7, 5], [1000, 1001, 1001, 1002, 1003, 1003]):
        cos, sin = (t[torch.tensor(pos)] for t in model.rope_table(1004, 16, 1e4, torch.float32,
                                                                     "cpu"))
        got = model.apply_rope(x, cos, sin)
        torch.testing.assert_close(got, rotate_by_hand(x, pos, 1e4), rtol=1e-4, atol=1e-4)


def test_positions_drive_attention():
    """Equal (token, position) pairs give equal logits; a common shift keeps scores (relative RoPE)."""
    m = tiny()
    idx = torch.tensor([[5, 7, 5, 9]])
    with torch.no_grad():
        out = m(idx, torch.tensor([3, 4, 3, 5]))
        torch.testing.assert_close(out[0, 0], out[0, 2])
        shifted = m(idx, torch.tensor([103, 104, 103, 105]))
        batched = m(idx.repeat(2, 1), torch.tensor([[3, 4, 3, 5], [103, 104, 103, 105]]))
    torch.testing.assert_close(out, shifted, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[1], shifted[0])
    assert not torch.allclose(out[0, 0], m(idx, torch.tensor([3, 4, 9, 5]))[0, 0])


def test_config_reads_real_and_nested_keys(refuses):
    """from_json ignores unknown keys, fills head_dim, reads rope_theta nested or not."""
    d = {"vocab_size": 10, "hidden_size": 32, "intermediate_size": 8, "num_hidden_layers": 1, "model_type": "sdar",
         "num_attention_heads": 4, "num_key_value_heads": 2, "rope_parameters": {"rope_theta": 5e5}, "foo": 1}
    c = Config.from_json(d)
    assert c.head_dim == 8 and c.rope_theta == 5e5
    message = r"^the config lacks \['hidden_size'\], which every Qwen3 or SDAR config.json has\.$"
    with refuses(ValueError, match=message):
        Config.from_json({k: v for k, v in d.items() if k != "hidden_size"})


# The released SDAR-Chat configs, written out by hand: hidden, intermediate, layers, heads, kv heads.
RELEASED = {"sdar-8b": (4096, 12288, 36, 32, 8), "sdar-4b": (2560, 9728, 36, 32, 8),
            "sdar-1.7b": (2048, 6144, 28, 16, 8)}


def test_presets_hold_the_released_shapes():
    """Each preset has its release's shape, block 4, the mask id and an lm_head of its own."""
    assert set(model.PRESETS) == set(RELEASED)
    for name, c in model.PRESETS.items():
        shape = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                 c.num_key_value_heads)
        assert shape == RELEASED[name], name
        assert (c.model_type, c.mask_token_id, c.block_size, c.tie_word_embeddings) == ("sdar", 151669, 4, False)
        assert (c.vocab_size, c.head_dim, c.rope_theta) == (151936, 128, 1e6)


def test_real_8b_config_on_meta_device(sdar_files):
    """The 8B model built from the real config has the checkpoint's 399 tensors and 8,190,735,360 parameters."""
    c = Config.from_json(sdar_files / "config.json")
    assert c == model.SDAR_8B
    with torch.device("meta"):
        m = Transformer(c)
    state = m.state_dict()
    assert len(state) == 399
    assert sum(t.numel() for t in state.values()) == 8_190_735_360
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.35.self_attn.k_norm.weight", "model.layers.0.mlp.down_proj.weight"} <= set(state)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (1024, 4096)


# ----------------------------------------------------------------------------- Qwen3 (autoregressive) checkpoints

# Every key transformers writes into a Qwen3ForCausalLM config.json, at toy sizes (vocab: 256 bytes + 3 specials).
QWEN3_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 256,
    "eos_token_id": 258, "head_dim": 16, "hidden_act": "silu", "hidden_size": 48, "initializer_range": 0.02,
    "intermediate_size": 80, "max_position_embeddings": 512, "max_window_layers": 3, "model_type": "qwen3",
    "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
    "rope_scaling": None, "rope_theta": 5e5, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "float32", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 259,
}


def qwen3_tensors(c, seed=0):
    """Random weights under the Hugging Face Qwen3 names and shapes; a tied head is left out, as HF does."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    E, I, D, V = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["vocab_size"]
    H, Hkv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    t = {"model.embed_tokens.weight": r(V, E), "model.norm.weight": 1 + r(E)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + r(E), p + "post_attention_layernorm.weight": 1 + r(E),
                  p + "self_attn.q_proj.weight": r(H, E), p + "self_attn.k_proj.weight": r(Hkv, E),
                  p + "self_attn.v_proj.weight": r(Hkv, E), p + "self_attn.o_proj.weight": r(E, H),
                  p + "self_attn.q_norm.weight": 1 + r(D), p + "self_attn.k_norm.weight": 1 + r(D),
                  p + "mlp.gate_proj.weight": r(I, E), p + "mlp.up_proj.weight": r(I, E),
                  p + "mlp.down_proj.weight": r(E, I)})
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = r(V, E)
    return t


def qwen3_causal_logits(t, c, idx):
    """Qwen3's causal forward written out from its definition, in float64, for one sequence."""
    w = {k: v.double() for k, v in t.items()}
    norm = lambda x, g: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * g
    T, D = len(idx), c["head_dim"]
    angle = torch.arange(T).double()[:, None] * c["rope_theta"] ** (-torch.arange(0, D, 2).double() / D)
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)  # (T, D): pairs (j, j + D/2)
    rotate = lambda x: x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    x = w["model.embed_tokens.weight"][idx]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q, k, v = ((h @ w[p + f"self_attn.{n}_proj.weight"].T).view(T, -1, D).transpose(0, 1) for n in "qkv")
        q, k = rotate(norm(q, w[p + "self_attn.q_norm.weight"])), rotate(norm(k, w[p + "self_attn.k_norm.weight"]))
        group = q.shape[0] // k.shape[0]  # query heads per key/value head
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        att = (q @ k.transpose(1, 2) / D ** 0.5).masked_fill(future, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(0, 1).reshape(T, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) \
            @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["model.norm.weight"]) @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


@pytest.mark.parametrize("tie", [False, True])
def test_qwen3_folder_loads_as_autoregressive(tmp_path, tie):
    """A Qwen3 folder as the HF tools lay it out loads as AR, its tokenizer without a mask,
    and its causal logits are Qwen3's forward written out by hand."""
    c = {**QWEN3_CONFIG, "tie_word_embeddings": tie}
    (tmp_path / "config.json").write_text(json.dumps(c, indent=2))
    t = qwen3_tensors(c)
    checkpoint.write_safetensors(t, tmp_path / "model.safetensors")
    checkpoint.write_byte_tokenizer(tmp_path, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    m = checkpoint.load(tmp_path)
    assert m.config == Config(vocab_size=259, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5e5,
                              rms_norm_eps=1e-5, tie_word_embeddings=tie, max_position_embeddings=512,
                              mask_token_id=None, block_size=None, model_type="qwen3")
    assert (m.lm_head.weight is m.model.embed_tokens.weight) is tie
    tok = checkpoint.load_tokenizer(tmp_path)
    assert tok.mask_id is None and tok.stop_ids == (258, 256)
    idx = torch.tensor(tok.chat("hi"))
    reference = qwen3_causal_logits(t, c, idx)
    torch.testing.assert_close(logits(m, idx[None])[0].double(), reference, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- loader errors

@pytest.fixture
def ckpt(tmp_path):
    checkpoint.save(tiny(), tmp_path)
    return tmp_path


def test_folder_without_config(tmp_path, refuses):
    """A folder without config.json names the folder and says what it needs."""
    with refuses(FileNotFoundError, match="no config.json.*checkpoint folder"):
        checkpoint.load(tmp_path)


def test_folder_without_weights(ckpt, refuses):
    """config.json without weights says the weights are missing."""
    (ckpt / "model.safetensors").unlink()
    with refuses(FileNotFoundError, match="weights are missing"):
        checkpoint.load(ckpt)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update({"model.norm.weight": torch.zeros(48, dtype=torch.int32)}),
     r"not floating point \['model.norm.weight torch.int32'\]"),
    (lambda s: s.pop("model.norm.weight"), r"missing \['model.norm.weight'\]"),
    (lambda s: s.update(extra=torch.zeros(2)), r"unexpected \['extra'\]"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(5)}),
     r"mis-shaped \['model.norm.weight \(5,\) != \(48,\)'\]"),
])
def test_wrong_tensors_are_listed(ckpt, edit, message, refuses):
    """Missing, unexpected and mis-shaped tensors are named in the error."""
    state = checkpoint.read_safetensors(ckpt / "model.safetensors")
    edit(state)
    checkpoint.write_safetensors(state, ckpt / "model.safetensors")
    with refuses(ValueError, match=message):
        checkpoint.load(ckpt)


def raw_file(path, header, data=b""):
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + data)


def test_unsupported_dtype(tmp_path, refuses):
    """An unsupported dtype is named, with what to do."""
    raw_file(tmp_path / "x.safetensors", {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"ab")
    with refuses(ValueError, match="F8_E4M3.*not support"):
        checkpoint.read_safetensors(tmp_path / "x.safetensors")


def test_truncated_file(ckpt, refuses):
    """A file cut short (data or header) is reported as truncated."""
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with refuses(ValueError, match="outside the file.*truncated"):
        checkpoint.load(ckpt)
    f.write_bytes(data[:20])
    with refuses(ValueError, match="is truncated"):
        checkpoint.load(ckpt)


def test_header_not_json(tmp_path, refuses):
    """A header that is not JSON says so."""
    (tmp_path / "x.safetensors").write_bytes((5).to_bytes(8, "little") + b"{nope" + b"\0" * 8)
    with refuses(ValueError, match="header is not JSON"):
        checkpoint.read_safetensors(tmp_path / "x.safetensors")


def test_offsets_outside_the_file(tmp_path, refuses):
    """Offsets past the end of the data are refused."""
    raw_file(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with refuses(ValueError, match=r"bytes \[0, 16\) of 8.*outside the file"):
        checkpoint.read_safetensors(tmp_path / "x.safetensors")


def test_missing_shard(ckpt, refuses):
    """An index naming an absent shard says which file is missing."""
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with refuses(FileNotFoundError, match="model-1.safetensors.*missing"):
        checkpoint.load(ckpt)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("model_type"), "has no model_type; only 'sdar' .* and 'qwen3' .* are accepted"),
    (lambda d: d.update(model_type="llama"), "has model_type 'llama'; only 'sdar' .* and 'qwen3' .* are accepted"),
])
def test_config_without_a_known_model_type_is_refused(ckpt, edit, message, refuses):
    """Nothing guesses the kind: a config.json without model_type, or with another one, is refused by name."""
    d = json.loads((ckpt / "config.json").read_text())
    edit(d)
    (ckpt / "config.json").write_text(json.dumps(d))
    with refuses(ValueError, match=re.escape(str(ckpt / "config.json")) + " " + message):
        checkpoint.load(ckpt)
    with refuses(ValueError, match="^the config " + message):
        Config.from_json(d)


@pytest.mark.parametrize("name,raw", [("config.json", b"{nope"), ("config.json", b"\xff{"), ("config.json", b"[1, 2]"),
                                      ("model.safetensors.index.json", b'{"weight_map": ')])
def test_json_that_is_not_an_object_names_the_file(ckpt, name, raw, refuses):
    """A config.json or index that is not a JSON object (bad syntax, not UTF-8, a list) is named in a ValueError."""
    (ckpt / name).write_bytes(raw)
    what = "holds JSON that is not an object" if raw == b"[1, 2]" else "is not valid JSON"
    with refuses(ValueError, match=re.escape(str(ckpt / name)) + " " + what):
        checkpoint.load(ckpt)


@pytest.mark.parametrize("key,value,message", [
    ("num_hidden_layers", -1, "num_hidden_layers must be a positive integer; got -1."),
    ("hidden_size", 0, "hidden_size must be a positive integer; got 0."),
    ("vocab_size", 1.5, "vocab_size must be a positive integer; got 1.5."),
    ("block_size", 0, "block_size must be a positive integer; got 0."),
    ("num_key_value_heads", 3, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)."),
    ("rope_theta", "1e6", r"rope_theta must be a finite number above 0; got '1e6'\."),
    ("rope_theta", float("nan"), r"rope_theta must be a finite number above 0; got nan\."),
    ("rope_theta", True, r"rope_theta must be a finite number above 0; got True\."),
    ("rms_norm_eps", -1e-6, r"rms_norm_eps must be a finite number above 0; got -1e-06\."),
    ("tie_word_embeddings", 1, r"tie_word_embeddings must be true or false; got 1\."),
    ("mask_token_id", 97, r"mask_token_id must be a token id, an integer from 0 to vocab_size - 1 \(96\); got 97\."),
    ("mask_token_id", -1, r"mask_token_id must be a token id, .*; got -1\."),
    ("mask_token_id", "96", r"mask_token_id must be a token id, .*; got '96'\."),
    ("head_dim", 7, r"head_dim must be even and at least 2, as RoPE turns pairs of dimensions; got 7\."),
    ("rope_parameters", 5, r"rope_parameters must be an object; got 5\.")])
def test_config_values_are_checked(ckpt, key, value, message, refuses):
    """A size that cannot build a model is one sentence naming the file, not a list of tensors."""
    d = json.loads((ckpt / "config.json").read_text())
    d[key] = value
    (ckpt / "config.json").write_text(json.dumps(d))
    with refuses(ValueError, match=re.escape(str(ckpt / "config.json")) + ": " + message):
        checkpoint.load(ckpt)


@pytest.mark.parametrize("edit,message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "asks for RoPE scaling 'yarn', which this model does not"),
    ({"rope_scaling": {"type": "linear"}}, "asks for RoPE scaling 'linear'"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "llama3"}}, "asks for RoPE scaling 'llama3'"),
    ({"model_type": ["sdar"]}, r"has model_type \['sdar'\]; only 'sdar'")])
def test_config_features_this_model_lacks_are_refused(ckpt, edit, message, refuses):
    """A config.json asking for what the model does not compute (a scaled RoPE) is refused by name
    rather than decoded differently; a plain one with rope_type default loads."""
    d = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**d, **edit}))
    with refuses(ValueError, match=re.escape(str(ckpt / "config.json")) + " " + message):
        checkpoint.load(ckpt)
    plain = {**d, "rope_scaling": None, "rope_parameters": {"rope_theta": 5.0, "rope_type": "default"}}
    assert Config.from_json(plain) == Config.from_json(d)  # rope_theta itself wins over the nested one


def test_a_head_dim_derived_odd_says_where_it_comes_from(refuses):
    with refuses(ValueError, match=r"head_dim must be even .*; got 9 \(hidden_size // num_attention_heads: no "
                                   r"head_dim given\)\."):
        Config(vocab_size=10, hidden_size=36, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2)


def test_a_long_list_of_wrong_tensors_is_cut_short(ckpt, refuses):
    """A config.json of another width mis-shapes most tensors: the sentence gives their count (the
    tensors whose shapes the two configs' models disagree on) and the first three."""
    d = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**d, "hidden_size": 64}))
    with torch.device("meta"):
        old, new = (Transformer(Config.from_json(c)).state_dict() for c in (d, {**d, "hidden_size": 64}))
    n = sum(old[k].shape != new[k].shape for k in old)
    with refuses(ValueError, match=rf"mis-shaped {n} tensors, first \['lm_head.weight \(97, 48\) != \(97, 64\)', "
                                   rf"'[^']*', '[^']*'\]; its weights and config.json must come from one model\.$"):
        checkpoint.load(ckpt)


def test_the_tensors_are_checked_before_any_weight_is_read(ckpt, monkeypatch, refuses):
    """load() refuses a mis-shaped checkpoint from its headers alone: no tensor data is read."""
    state = checkpoint.read_safetensors(ckpt / "model.safetensors")
    state["model.norm.weight"] = torch.zeros(5)
    checkpoint.write_safetensors(state, ckpt / "model.safetensors")
    monkeypatch.setattr(checkpoint, "read_safetensors", lambda *a, **k: pytest.fail("weights read"))
    with refuses(ValueError, match="mis-shaped"):
        checkpoint.load(ckpt)


@pytest.mark.parametrize("header,message", [
    ({"w": {"shape": [2], "data_offsets": [0, 8]}}, "the header gives tensor w no dtype; the file is corrupt"),
    ({"w": {"dtype": 5, "shape": [2], "data_offsets": [0, 8]}}, "the header gives tensor w a dtype that is not a name"),
    ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, "the header gives tensor w no shape"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "gives tensor w a shape that is not a list"),
    ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "gives tensor w a shape that is not a list"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "the header gives tensor w no data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, "gives tensor w a data_offsets that is not two"),
    ({"w": {"dtype": "F32", "shape": [2 ** 62, 2 ** 62], "data_offsets": [0, 8]}}, "tensor w claims bytes .* outside"),
    ({"w": [1, 2]}, "the header's entry of tensor w is not an object"),
    ([1, 2], "the header is not a JSON object")])
def test_each_header_entry_is_checked(tmp_path, header, message, refuses):
    """Every field of a safetensors header entry is checked before it is used: one sentence naming
    the file and the tensor, not a KeyError or a TypeError."""
    raw_file(tmp_path / "x.safetensors", header, b"\0" * 8)
    with refuses(ValueError, match=re.escape(str(tmp_path / "x.safetensors")) + ": (the header )?" + message):
        checkpoint.read_safetensors(tmp_path / "x.safetensors")


def test_a_header_longer_than_the_format_allows(ckpt, monkeypatch, refuses):
    monkeypatch.setattr(checkpoint, "MAX_HEADER", 16)
    with refuses(ValueError, match=r"claims a header of \d+ bytes, more than the 16 the safetensors format allows"):
        checkpoint.read_header(ckpt / "model.safetensors")


@pytest.mark.parametrize("index,message", [
    ({"metadata": {}}, "has no weight_map; it must map each tensor name to its .safetensors file"),
    ({"weight_map": {}}, "has a weight_map that lists no tensor"),
    ({"weight_map": []}, "has a weight_map that lists no tensor"),
    ({"weight_map": {"a": 1}}, r": each weight_map value must be the name of a .safetensors file in the same folder\."),
    ({"weight_map": {"a": "../model.safetensors"}}, ": each weight_map value must be the name")])
def test_the_index_is_checked(ckpt, index, message, refuses):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with refuses(ValueError, match=re.escape(str(ckpt / "model.safetensors.index.json")) + " ?" + message):
        checkpoint.load(ckpt)


@pytest.mark.parametrize("rows", [1, 3])
def test_folded_attention_is_grouped_query_attention(rows):
    """Queries folded by kv head, with the mask folded alike (model.folded), give grouped-query
    attention exactly: per row masks and one shared mask, some rows seeing everything."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, S, D = 3, 8, 2, 5, 9, 4
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, T), (Hkv, S), (Hkv, S)))
    mask = torch.rand(rows, 1, T, S, generator=g) < 0.5
    mask[..., -1] = True  # every query sees something
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv * T, D), k, v,
                                         attn_mask=model.folded(mask, H // Hkv))
    torch.testing.assert_close(got.view(B, H, T, D), want, rtol=0, atol=1e-6)
    assert model.folded(None, 4) is None  # full attention: no mask at all


VIEWS = {"view", "_unsafe_view", "t", "unsqueeze", "select", "slice", "transpose", "split",
         "split_with_sizes", "expand", "detach", "alias", "permute", "as_strided", "squeeze"}


def kernels_per_layer(fuse, training=False):
    """The aten operations that compute (views left out) in one layer of a decode-time forward (a
    block of 4 after 40 cached tokens): counted by a dispatch mode, two layers minus one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket.__name__ not in VIEWS
            return func(*args, **(kwargs or {}))
    counts = []
    for layers in (1, 2):
        torch.manual_seed(0)
        m = tiny(num_hidden_layers=layers)
        m = m.fuse() if fuse else m
        m.train(training)
        cache = m.new_cache(64)
        with torch.no_grad():
            m(torch.randint(0, 50, (1, 40)), torch.arange(40), None, cache)
            cache.commit(40)
            counter = Count()
            counter.n = 0
            with counter:
                m(torch.randint(0, 50, (1, 4)), torch.arange(40, 44), None, cache)
        counts.append(counter.n)
    return counts[1] - counts[0]


def test_a_layer_launches_few_kernels():
    """Packed projections (q/k/v as one matrix, gate/up as one), one norm call for queries and
    keys, RoPE from a table: 35 computing operations a layer (48 before the packing), and the
    unpacked training path, which concatenates the weights at each call, more."""
    packed = kernels_per_layer(fuse=True)
    assert packed <= 35
    assert kernels_per_layer(fuse=False, training=True) > packed


def test_packing_changes_nothing_but_the_layout(micro_checkpoint, tmp_path):
    """fuse() packs the projections for inference: the same logits as the checkpoint's separate
    tensors, whose weights become views of the packed ones (no second copy), and a checkpoint
    loads packed."""
    m = tiny()
    idx, pos = torch.randint(0, 97, (2, 9)), torch.arange(9)
    with torch.no_grad():
        want = m(idx, pos)
        got = m.fuse()(idx, pos)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    attn = m.model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == \
        attn.packed[0].untyped_storage().data_ptr()
    loaded = checkpoint.load(micro_checkpoint(tmp_path / "m"))
    assert all(layer.self_attn.packed is not None and layer.mlp.packed is not None
               for layer in loaded.model.layers)
