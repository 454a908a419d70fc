"""Shared test plumbing: model and checkpoint factories (as fixtures, so no test file imports
another), one thread per test run, and `report(line)`: measurements a test prints for a reader
(not assertions), shown once at the end of the run instead of among pytest's progress dots."""
import json
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import checkpoint
import model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "sdar-8b-chat"
VOCAB, MASK = 61, 60  # the random models' ids; the mask token is the last
LINES = []


@pytest.fixture
def report():
    return LINES.append


def pytest_terminal_summary(terminalreporter):
    if LINES:
        terminalreporter.section("measurements")
        for line in LINES:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Micro models are dispatch-bound: one thread is as fast, and immune to the stalls a two-thread
    pool suffers when another process shares a two-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_random_model(seed=0, layers=2, model_type="sdar", vocab=VOCAB, sharpen=8.0):
    """A random micro model on ids 0..vocab-1 (the last is the mask of an SDAR model), its head scaled
    up so that confidences differ and dynamic decoding has work to do."""
    torch.manual_seed(seed)
    c = model.Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, model_type=model_type,
                     mask_token_id=vocab - 1 if model_type == "sdar" else None)
    m = model.Transformer(c).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(sharpen)
    return m


@pytest.fixture(scope="session")
def random_model():
    """random_model(seed=0, layers=2, model_type="sdar", vocab=61, sharpen=8.0): a fresh micro model."""
    return make_random_model


@pytest.fixture(scope="session")
def prompt():
    """prompt(n, seed=0): n random ids below the mask id."""
    def make(n, seed=0, vocab=VOCAB):
        return torch.randint(0, vocab - 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return make


@pytest.fixture
def favour():
    """favour(m, amount, token=7) adds `amount` to one token's logit with a forward hook, removed
    when the test ends: two random models that both lean to one token agree now and then."""
    handles = []

    def add(m, amount, token=7):
        bias = torch.zeros(m.config.vocab_size)
        bias[token] = amount
        handles.append(m.lm_head.register_forward_hook(lambda module, inputs, out: out + bias))
        return m
    yield add
    for handle in handles:
        handle.remove()


def write_micro_checkpoint(path, seed=0, block_size=4, model_type="sdar", layers=1, positions=64):
    """A micro SDAR (or Qwen3, without a mask in its tokenizer) folder on the byte-level toy ids."""
    torch.manual_seed(seed)
    sdar = model_type == "sdar"
    c = model.Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                     mask_token_id=259 if sdar else None, block_size=block_size if sdar else None,
                     model_type=model_type)
    checkpoint.save(model.Transformer(c), path)
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + (("<|MASK|>",) if sdar else ())
    checkpoint.write_byte_tokenizer(path, specials=specials)
    return str(path)


@pytest.fixture(scope="session")
def micro_checkpoint():
    """micro_checkpoint(path, seed=0, block_size=4, model_type="sdar", layers=1, positions=64)."""
    return write_micro_checkpoint


def rewrite_header(path, edit):
    """Rewrite a .safetensors file's JSON header after edit(header) changed it; the data stays."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    head = json.dumps(header).encode()
    Path(path).write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n:])


@pytest.fixture(scope="session")
def edit_header():
    """edit_header(path, edit): a .safetensors file with its header edited in place by edit(header)."""
    return rewrite_header


@pytest.fixture(scope="session")
def run_scripts():
    """run_scripts(script, argvs, timeout=120): the finished processes of `python script *argv`,
    four at a time (each pays for importing torch; a few side by side keep two cores busy)."""
    def run(script, argvs, timeout=120):
        def one(argv):
            return subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True,
                                  text=True, timeout=timeout)
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, argvs))
    return run


def as_in_a_terminal():  # a job started in the background inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def interrupt_early():
    """interrupt_early(script, argv): (exit status, stderr) of `python script *argv` sent SIGINT
    (Ctrl-C) while torch's libraries load (seen in /proc/PID/maps; without /proc after 0.3 s)."""
    def run(script, argv):
        proc = subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=as_in_a_terminal)
        maps, t0 = Path(f"/proc/{proc.pid}/maps"), time.monotonic()
        while time.monotonic() - t0 < (10 if maps.parent.exists() else 0.3):
            if maps.parent.exists() and "libtorch" in maps.read_text():
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
        return proc.returncode, err
    return run


@pytest.fixture(scope="session")
def sdar_files():
    """The real, weight-free SDAR-8B-Chat files (config, tokenizer), which sit beside the repository
    in ../shared and are not part of it; the tests that need them skip, saying why, without them."""
    if not (SHARED / "vocab.json").is_file():
        pytest.skip("needs ../shared/sdar-8b-chat, the real SDAR-8B-Chat config and tokenizer files "
                    "kept beside the repository (not part of it)")
    return SHARED


@pytest.fixture(scope="session")
def refuses():
    """refuses(exc, match): pytest.raises that also holds the message to its form: whole sentences
    on one line, ending with a period, as a command line prints it after a prefix."""
    @contextmanager
    def check(exc, match):
        with pytest.raises(exc, match=match) as e:
            yield
        msg = str(e.value)
        assert msg.endswith(".") and msg == msg.strip() and "\n" not in msg, msg
        assert "  " not in msg and not re.search(r"[.,;:!?]{2}", msg), msg
    return check


@pytest.fixture(scope="session")
def varied_stop():
    """varied_stop(outputs, n): a token that several outputs say first at different places (n:
    never), so that a batch stopping at it stops its rows at different times."""
    def pick(outputs, n):
        def where(t):
            return {out.index(t) if t in out else n for out in outputs}
        return max(set(sum(outputs, [])), key=lambda t: (len(where(t)), -min(where(t))))
    return pick
