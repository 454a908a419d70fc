"""mask.py against brute-force loops that read each layout's rules (the docstrings) literally."""
import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mask

ROOT = Path(__file__).resolve().parents[1]


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


def step_maps(seed=0):
    """(block, step) for blocks 1..12: known positions (step 0) anywhere, drafted steps from 1..m
    with random ties and as a permutation."""
    rng = random.Random(seed)
    for block in range(1, 13):
        for _ in range(6):
            known = [rng.random() < 0.3 for _ in range(block)]
            m = block - sum(known)
            if rng.random() < 0.5:
                steps = rng.sample(range(1, m + 1), m)  # a permutation
            else:
                steps = [rng.randint(1, max(m, 1)) for _ in range(m)]  # ties
            it = iter(steps)
            yield block, [0 if k else next(it) for k in known]


STEP_MAPS = list(step_maps())


def brute_verify(step):
    """The SimSD rules read literally over [block | masks], one (query, key) pair at a time: known
    tokens see the known tokens only; reference i sees reference j iff t_j <= t_i and mask j iff
    t_j > t_i; mask i sees reference j iff t_j < t_i and mask j iff t_j >= t_i. Rows of the mask
    tokens at known positions are unused: None."""
    B = len(step)
    rows = []
    for qi in range(2 * B):
        ti, is_mask = step[qi % B], qi >= B
        if is_mask and ti == 0:
            rows.append(None)
            continue
        row = []
        for kj in range(2 * B):
            tj, key_mask = step[kj % B], kj >= B
            if ti == 0:  # a known token
                row.append(not key_mask and tj == 0)
            elif not is_mask:
                row.append(tj > ti if key_mask else tj <= ti)
            else:
                row.append(tj >= ti if key_mask else tj < ti)
        rows.append(row)
    return rows


def test_verify_matches_the_rules():
    """verify equals the rules read literally, for known positions anywhere and step maps with ties."""
    for _, step in STEP_MAPS:
        got = mask.verify(T(step)).tolist()
        for row, want in zip(got, brute_verify(step)):
            assert want is None or row == want, step


def test_verify_one_version_per_position_and_the_unused_masks():
    """Every drafted row sees all known tokens and exactly one version (token or mask) of each drafted
    position; the mask tokens at known positions are seen by nobody."""
    for block, step in STEP_MAPS:
        M = mask.verify(T(step))
        drafted = [i for i in range(block) if step[i] > 0]
        for q in [i for i in drafted] + [block + i for i in drafted]:
            assert all(M[q, j] for j in range(block) if step[j] == 0)
            for j in drafted:
                assert int(M[q, j]) + int(M[q, block + j]) == 1
        for j in range(block):
            if step[j] == 0:
                assert not M[:block, block + j].any() and not M[[block + i for i in drafted], block + j].any()


def test_verify_no_peeking():
    """A mask row never sees the reference of its own position, nor any revealed at its step or later."""
    for block, step in STEP_MAPS:
        M = mask.verify(T(step))
        for i in range(block):
            if step[i] > 0:
                assert not M[block + i, i]
                assert not any(M[block + i, j] for j in range(block) if step[j] >= step[i])


def test_verify_left_to_right_is_causal():
    """One position per step, left to right: references are causal, as an AR model's tokens, and
    mask i sees references < i and masks >= i."""
    for m in range(1, 13):
        M = mask.verify(torch.arange(1, m + 1))
        assert torch.equal(M[:m, :m], torch.ones(m, m, dtype=torch.bool).tril())
        for i in range(m):
            assert M[m + i, :m].tolist() == [j < i for j in range(m)]
            assert M[m + i, m:].tolist() == [j >= i for j in range(m)]


def test_copies_matches_loop():
    """Exact verification: each copy of the block sees itself, whole, and no other copy."""
    for n, block in itertools.product(range(1, 5), range(1, 6)):
        want = [[q // block == k // block for k in range(n * block)] for q in range(n * block)]
        assert mask.copies(n, block).tolist() == want


def test_tree_matches_loop():
    """[pending | clean copies | parts] for random trees: pending is block-causal and seen by all; the
    clean copy of node c sees pending and the clean copies of c and its ancestors; the part of node n
    sees pending, the clean copies of n and its ancestors, and itself by its own mask."""
    rng = random.Random(4)
    for _ in range(80):
        block, N, n_pending = rng.randint(1, 4), rng.randint(1, 6), rng.choice([0, 1, 2])
        parent = [-1] + [rng.randrange(n) for n in range(1, N)]
        blocks = [0]
        for n in range(1, N):
            blocks.append(blocks[parent[n]] + (rng.random() < 0.4))
        cleans = [n for n in range(1, N) if blocks[n] > blocks[parent[n]]]

        def up(n):  # n and its ancestors
            return {n} | (up(parent[n]) if parent[n] >= 0 else set())
        ancestors = T([[m in up(n) for m in range(N)] for n in range(N)])
        parts = [mask.copies(1, block) if rng.random() < 0.5
                 else mask.verify(T([rng.randint(0, 3) for _ in range(block)])) for _ in range(N)]
        M = mask.tree(parts, n_pending * block, block, ancestors, cleans).tolist()
        kinds = [("p", i // block) for i in range(n_pending * block)]
        kinds += [("c", c) for c in cleans for _ in range(block)]
        kinds += [("v", n, r) for n, part in enumerate(parts) for r in range(len(part))]
        for q, kq in enumerate(kinds):
            for k, kk in enumerate(kinds):
                if kq[0] == "p":
                    want = kk[0] == "p" and kk[1] <= kq[1]
                elif kk[0] == "p":
                    want = True
                elif kk[0] == "c":
                    want = kk[1] in up(kq[1])
                else:
                    want = kq[0] == "v" and kk[1] == kq[1] and bool(parts[kq[1]][kq[2], kk[2]])
                assert M[q][k] == want, (q, k, kinds[q], kinds[k])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype(device):
    """Masks are bool and live on the device of their inputs."""
    dev = torch.device(device)
    step = torch.tensor([0, 2, 1, 3], device=device)
    made = [mask.block_causal(5, 4, 2, device=dev), mask.training(6, 2, device=dev), mask.verify(step),
            mask.copies(3, 4, dev), mask.tree([mask.verify(step), mask.copies(2, 4, dev)], 4, 4,
                                           torch.ones(2, 2, dtype=torch.bool, device=dev).tril(), [1])]
    for M in made:
        assert M.dtype == torch.bool and M.device.type == dev.type


def test_main_draws_the_layouts_takes_help_and_ends_quietly_in_a_pipe(run_scripts):
    """`python mask.py` draws the examples; --help works; a closed pipe ends it without a traceback."""
    pipe = subprocess.Popen([sys.executable, "mask.py"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    drawn, helped = run_scripts("mask.py", [[], ["--help"]])
    for label in ["k0", "r1@2", "r2@1", "r3@3", "m1@2", "m2@1", "m3@3", "A trie of proposals"]:
        assert label in drawn.stdout
    assert "m2@1 # | . . . | # # #" in drawn.stdout  # step 1's mask row sees no reference
    assert "b0 # # | . . | . . | . . | # #" in drawn.stdout  # the next block sees the clean copy
    assert helped.returncode == 0 and "usage: mask.py" in helped.stdout
    pipe.stdout.read(10)
    pipe.stdout.close()  # what `| head -c 10` does
    err = pipe.stderr.read().decode()
    pipe.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
