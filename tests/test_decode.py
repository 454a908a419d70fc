"""decode.py: the cached decoder equals the no-cache oracle; schedule, stops, forwards, the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import decode
import model

ROOT = Path(__file__).resolve().parents[1]
VOCAB, MASK = 61, 60


def random_model(seed=0, layers=2):
    torch.manual_seed(seed)
    c = model.Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK)
    m = model.Transformer(c).eval()
    with torch.no_grad():  # sharper logits, so that confidences differ and dynamic decoding has work to do
        m.lm_head.weight.mul_(8)
    return m


def prompt(n, seed=0):
    return torch.randint(0, MASK, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("strategy", ["static", "dynamic"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_equals_oracle(block, strategy, temperature):
    """Cached generate == no-cache generate_naive token for token, every prompt alignment, steps <= block."""
    m = random_model()
    for P in (1, block - 1, block, 2 * block + 1):
        for steps in (block, block // 2):
            kw = dict(block=block, steps=steps, strategy=strategy, threshold=0.3, temperature=temperature,
                      top_k=20 if temperature else 0, top_p=0.9 if temperature else 1.0)
            a, _ = decode.generate(m, prompt(P, P), 3 * block + 1, generator=torch.Generator().manual_seed(P), **kw)
            b, _ = decode.generate_naive(m, prompt(P, P), 3 * block + 1, generator=torch.Generator().manual_seed(P),
                                         **kw)
            assert a == b, (P, steps)
            assert len(a) == 3 * block + 1


@pytest.mark.parametrize("m,steps", [(m, s) for m in range(1, 17) for s in range(1, 17)])
def test_schedule_spreads_evenly(m, steps):
    """m masks over the steps: sums to m, differs by at most one, remainder early, no empty step."""
    k = decode.schedule(m, steps)
    assert sum(k) == m and len(k) == min(m, steps) and min(k) >= 1
    assert max(k) - min(k) <= 1 and k == sorted(k, reverse=True)


def test_step_map_follows_the_schedule():
    """Static decoding reveals schedule[s-1] positions at step s, each position exactly once; known stay 0."""
    m = random_model()
    for known in range(4):
        for steps in (1, 2, 3, 4):
            block = torch.tensor(prompt(known) + [MASK] * (4 - known))
            with torch.no_grad():
                tokens, step, probs, forwards = decode.denoise(m, block, 0, steps, mask_id=MASK)
            assert (tokens != MASK).all() and step[:known].eq(0).all()
            counts = [int((step == s).sum()) for s in range(1, forwards + 1)]
            assert counts == decode.schedule(4 - known, steps)
            assert probs[:known].eq(0).all() and torch.allclose(probs[known:].sum(-1), torch.ones(4 - known))


def test_static_reveals_the_most_confident():
    """At each step the revealed positions are the top-k confidences of that forward (checked by hand)."""
    m = random_model(3)
    block = torch.tensor([MASK] * 4)
    with torch.no_grad():
        tokens, step, _, _ = decode.denoise(m, block, 0, 4, mask_id=MASK)
        logits = m(block[None], torch.arange(4), torch.ones(4, 4, dtype=torch.bool))[0].softmax(-1)
    first = int(step.tolist().index(1))
    assert first == int(logits.max(-1).values.argmax()) and tokens[first] == logits[first].argmax()


def test_forwards_count_folded_store():
    """A full block costs `steps` forwards (the store is folded in), plus one prefill."""
    m = random_model()
    for block, steps in ((4, 4), (4, 2), (8, 8), (8, 3)):
        _, stats = decode.generate(m, prompt(2 * block), 5 * block, block=block, steps=steps)
        assert stats["forwards"] == 1 + 5 * steps
        _, stats = decode.generate(m, prompt(block + 1), 5 * block - 1, block=block, steps=steps)
        assert stats["forwards"] == 1 + min(block - 1, steps) + 4 * steps  # one known token: fewer masks


def test_stop_tokens_and_max_new_tokens():
    """Output is trimmed before the first stop token; without one, exactly max_new_tokens come back."""
    m = random_model()
    p = prompt(5)
    free, _ = decode.generate(m, p, 23)
    assert len(free) == 23
    stop = free[9]
    cut, _ = decode.generate(m, p, 23, stop_ids=(stop, 999))
    assert cut == free[: free.index(stop)]
    for n in (1, 4, 7):
        assert decode.generate(m, p, n)[0] == free[:n]


def test_seeded_sampling_is_reproducible():
    """Same seed -> same tokens; argmax decoding is deterministic; another seed differs."""
    m = random_model()
    runs = [decode.generate(m, prompt(6), 16, temperature=1.0, generator=torch.Generator().manual_seed(s))[0]
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
    assert decode.generate(m, prompt(6), 16)[0] == decode.generate(m, prompt(6), 16)[0]


def test_distribution_filters():
    """top-k keeps the k largest, top-p the smallest prefix reaching p, temperature sharpens."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert decode.distribution(logits, 1.0, top_k=2).tolist() == pytest.approx([0.625, 0.375, 0, 0])
    assert decode.distribution(logits, 1.0, top_p=0.8).tolist() == pytest.approx([0.625, 0.375, 0, 0])
    assert decode.distribution(logits, 1.0, top_p=0.81).tolist() == pytest.approx([0.5 / .95, 0.3 / .95, .15 / .95, 0])
    assert decode.distribution(logits, 0.5)[0] > 0.5


def test_missing_mask_id_is_an_error():
    """Without mask_id and without config.mask_token_id, generate refuses."""
    m = random_model()
    m.config.mask_token_id = None
    with pytest.raises(ValueError, match="no mask token"):
        decode.generate(m, [1, 2], 4)


# ----------------------------------------------------------------------------- the command

def run_cli(*args):
    return subprocess.run([sys.executable, "decode.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy")
    c = model.Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, mask_token_id=259, block_size=4, max_position_embeddings=64)
    model.save(model.Transformer(c), path)
    model.write_byte_tokenizer(path)
    return path


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/folder"], "huggingface-cli download JetLM/SDAR-8B-Chat"),
    (["--device", "cuda"], "no CUDA GPU") if not torch.cuda.is_available() else (["--prompt", ""], "empty"),
    (["--prompt", "  "], "prompt is empty"),
    (["--strategy", "sometimes"], "invalid choice: 'sometimes'"),
])
def test_cli_errors(args, message):
    """Bad input: one sentence on stderr, non-zero exit, no traceback."""
    r = run_cli(*args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_cli_incomplete_folder_and_limits(toy_checkpoint, tmp_path):
    """Weights missing, a block the checkpoint was not trained with, and a too-long request are refused."""
    (tmp_path / "config.json").write_text((toy_checkpoint / "config.json").read_text())
    cases = [(["--model", str(tmp_path)], "weights are missing"),
             (["--model", str(toy_checkpoint), "--block", "8"], "trained with block 4"),
             (["--model", str(toy_checkpoint), "--max-new-tokens", "60"], "max_position_embeddings 64")]
    for args, message in cases:
        r = run_cli(*args, "--device", "cpu")
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_runs_a_checkpoint(toy_checkpoint):
    """A real-format folder decodes and ends with the stats line."""
    r = run_cli("--model", str(toy_checkpoint), "--prompt", "hi", "--max-new-tokens", "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stdout and "forwards per token" in r.stdout


def test_cli_speculative_show_and_mismatch(toy_checkpoint, tmp_path):
    """--draft decodes speculatively and --show draws iterations; a draft with another block is refused."""
    r = run_cli("--model", str(toy_checkpoint), "--draft", str(toy_checkpoint), "--prompt", "hi",
                "--max-new-tokens", "8", "--device", "cpu", "--show", "--verify", "exact")
    assert r.returncode == 0, r.stderr
    assert "tokens per target forward" in r.stdout and "accepted)" in r.stdout
    config = (toy_checkpoint / "config.json").read_text().replace('"block_size": 4', '"block_size": 8')
    model.save(model.load(toy_checkpoint), tmp_path)
    model.write_byte_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(config)
    r = run_cli("--model", str(toy_checkpoint), "--draft", str(tmp_path), "--device", "cpu")
    assert r.returncode != 0 and "block 8" in r.stderr and "must match" in r.stderr
