"""mask.py against brute-force loops that read the verification rules (mask.verify's docstring) literally."""
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mask


def layouts(seed=0):
    """(block, n_known, step) for every block 1..16 and known length 0..block-1,
    each with a step map drawn from 1..m with random ties and a permutation."""
    rng = random.Random(seed)
    for block in range(1, 17):
        for n in range(block):
            m = block - n
            yield block, n, [rng.randint(1, m) for _ in range(m)]
            yield block, n, rng.sample(range(1, m + 1), m)


LAYOUTS = list(layouts())


def tokens(n, step):
    """The verify layout as (kind, position, step) per token, for the loops."""
    return ([("k", i, None) for i in range(n)]
            + [("r", i, t) for i, t in enumerate(step)]
            + [("m", i, t) for i, t in enumerate(step)])


def brute_verify(n, step):
    """The SimSD rules, one (query, key) pair at a time."""
    toks = tokens(n, step)
    out = []
    for qk, _, ti in toks:
        row = []
        for kk, _, tj in toks:
            if qk == "k":
                a = kk == "k"
            elif kk == "k":
                a = True
            elif qk == "r":
                a = tj <= ti if kk == "r" else tj > ti
            else:
                a = tj < ti if kk == "r" else tj >= ti
            row.append(a)
        out.append(row)
    return out


def T(step):
    return torch.tensor(step, dtype=torch.long)


def test_block_causal_matches_loop():
    """Prefill: a token sees exactly the tokens of its own and earlier blocks."""
    rng = random.Random(1)
    for _ in range(200):
        n, block, start = rng.randint(0, 40), rng.randint(1, 16), rng.randint(0, 50)
        want = [[(start + k) // block <= (start + q) // block for k in range(n)] for q in range(n)]
        assert mask.block_causal(n, block, start).tolist() == want


def test_training_matches_loop():
    """Training [x_t ; x_0]: x_t sees its own x_t block and earlier x_0 blocks; x_0 is block-causal."""
    rng = random.Random(2)
    for _ in range(200):
        n, block = rng.randint(0, 40), rng.randint(1, 16)
        want = []
        for q in range(2 * n):
            row = []
            for k in range(2 * n):
                bq, bk = (q % n) // block, (k % n) // block
                if q < n:   # x_t query
                    row.append(bk == bq if k < n else bk < bq)
                else:       # x_0 query
                    row.append(False if k < n else bk <= bq)
            want.append(row)
        assert mask.training(n, block).tolist() == want


def test_training_no_leak():
    """No x_t token sees its own or a later block of x_0, and x_0 never sees x_t."""
    for n, block in [(12, 4), (13, 4), (16, 8), (5, 1)]:
        M = mask.training(n, block)
        for q in range(n):
            for k in range(n):
                if k // block >= q // block:
                    assert not M[q, n + k]
        assert not M[n:, :n].any()


def test_verify_matches_loop():
    """verify equals the rules read literally, on every known length and many step maps with ties."""
    for _, n, step in LAYOUTS:
        assert mask.verify(T(step), n).tolist() == brute_verify(n, step)


def test_verify_one_version_per_position():
    """Every drafted row sees all known tokens and exactly one version (token or mask) of each position."""
    for _, n, step in LAYOUTS:
        M, m = mask.verify(T(step), n), len(step)
        for q in range(n, n + 2 * m):
            assert M[q, :n].all()
            for j in range(m):
                assert int(M[q, n + j]) + int(M[q, n + m + j]) == 1


def test_verify_no_peeking():
    """A mask row never sees the reference of its own position or of any position revealed at its step or later."""
    for _, n, step in LAYOUTS:
        M, m = mask.verify(T(step), n), len(step)
        for i in range(m):
            assert M[n + i, n + i]                        # a reference sees itself
            assert not M[n + m + i, n + i]                # mask i never sees reference i
            for j in range(m):
                if step[j] >= step[i]:
                    assert not M[n + m + i, n + j]


def test_verify_known_rows_see_known_only():
    """Known tokens see each other and nothing drafted."""
    for _, n, step in LAYOUTS:
        M = mask.verify(T(step), n)
        assert M[:n, :n].all() and not M[:n, n:].any()


def test_verify_left_to_right_is_causal():
    """One position per step, left to right: references are causal (an AR model) and mask i sees references < i, masks >= i."""
    for m in range(1, 17):
        for n in (0, 1, 3):
            M = mask.verify(torch.arange(1, m + 1), n)
            ref = M[n:n + m, n:n + m]
            assert torch.equal(ref, torch.ones(m, m, dtype=torch.bool).tril())
            for i in range(m):
                assert M[n + m + i, n:n + m].tolist() == [j < i for j in range(m)]
                assert M[n + m + i, n + m:].tolist() == [j >= i for j in range(m)]


def test_verify_exact_matches_loop():
    """Exact mode: full inside each copy, blind across copies, rows = position i in the copy of step t_i."""
    for _, n, step in LAYOUTS:
        M, rows = mask.verify_exact(T(step), n)
        distinct, size = sorted(set(step)), n + len(step)
        total = len(distinct) * size
        assert M.shape == (total, total)
        assert M.tolist() == [[q // size == k // size for k in range(total)] for q in range(total)]
        want = [distinct.index(t) * size + n + i for i, t in enumerate(step)]
        assert rows.tolist() == want
        for i, r in enumerate(rows.tolist()):
            assert r // size == distinct.index(step[i]) and r % size == n + i


def test_with_store_matches_loop():
    """Folded store: stored tokens see only themselves, every later token sees them, the rest is unchanged."""
    rng = random.Random(3)
    for _ in range(100):
        n, block, start = rng.randint(0, 12), rng.randint(1, 8), rng.randint(0, 8)
        inner, s = mask.block_causal(n, block, start), rng.randint(0, 8)
        M = mask.with_store(inner, s).tolist()
        for q in range(s + n):
            for k in range(s + n):
                if q < s:
                    want = k < s
                elif k < s:
                    want = True
                else:
                    want = bool(inner[q - s, k - s])
                assert M[q][k] == want
    for _, n, step in LAYOUTS[::7]:
        inner, s = mask.verify(T(step), n), 4
        M = mask.with_store(inner, s)
        assert M[:s, :s].all() and not M[:s, s:].any() and M[s:, :s].all()
        assert torch.equal(M[s:, s:], inner)


def test_positions():
    """RoPE copy: reference i and mask i share drafted position i's position; known tokens keep
    their own, wherever they sit in the block (a random subset of the block is known)."""
    rng = random.Random(0)
    for block, n, step in LAYOUTS:
        m, start = len(step), 37
        where = sorted(rng.sample(range(block), n))  # known slots anywhere in the block
        kpos = [start + i for i in where]
        dpos = [start + i for i in range(block) if i not in where]
        pos = mask.verify_positions(T(kpos), T(dpos)).tolist()
        assert pos[:n] == kpos
        for i in range(m):
            assert pos[n + i] == pos[n + m + i] == dpos[i]
        ex = mask.verify_exact_positions(T(step), T(kpos), T(dpos)).tolist()
        assert ex == (kpos + dpos) * len(set(step))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype(device):
    """Masks are bool and live on the device of their inputs."""
    step = torch.tensor([2, 1, 3, 1], device=device)
    dev = torch.device(device)
    masks = [mask.block_causal(5, 4, 2, device=dev), mask.training(6, 2, device=dev),
             mask.verify(step, 2), mask.verify_exact(step, 2)[0], mask.with_store(mask.verify(step, 2), 4)]
    for M in masks:
        assert M.dtype == torch.bool and M.device.type == dev.type
    kpos, dpos = torch.tensor([8, 10], device=device), torch.tensor([9, 11, 12, 13], device=device)
    for x in [mask.verify_exact(step, 2)[1], mask.verify_positions(kpos, dpos),
              mask.verify_exact_positions(step, kpos, dpos)]:
        assert x.dtype == torch.long and x.device.type == dev.type


def test_main_prints_example():
    """`python mask.py` runs and draws the verification example."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "mask.py"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    for label in ["k0", "r1@2", "r2@1", "r3@3", "m1@2", "m2@1", "m3@3"]:
        assert label in out
    assert "m2@1 # | . . . | # # #" in out      # step 1's mask row sees no references
