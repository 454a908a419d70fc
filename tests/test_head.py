"""The hidden-state head (head.py): lossless as every proposer, its proposals SDAR's rule on its
outputs, tied to its target."""
import math
from types import SimpleNamespace

import pytest
import torch

import head
import sdar
import speculative
from lossless import head_chain
from test_speculative import SETUPS, enumerate_decoding, p_value


def random_head(target, block, seed=0, scale=0.5):
    """A head of random weights for `target` (its outputs far from flat, so that it proposes
    with conviction, and mostly wrongly)."""
    torch.manual_seed(seed)
    h = head.new(target, block, width=16, layers=1, heads=2)
    with torch.no_grad():
        for p in h.parameters():
            p.normal_(0.0, scale)
    return h.eval()


@pytest.mark.parametrize("block", [2, 4, 8])
def test_a_head_proposing_returns_the_target_alone(block, random_model, prompt):
    """Greedy, token for token: sdar.generate's output, for a head alone and with the target's
    own chain, static and dynamic, lookahead 1 to 3, one prompt at a time and in a batch."""
    target = random_model(0, 2)
    h = random_head(target, block)
    prompts = [prompt(n, n) for n in (3, 5, 9)]
    for strategy in ("static", "dynamic"):
        want = [sdar.generate(target, p, 2 * block + 3, block=block, strategy=strategy)[0]
                for p in prompts]
        for lookahead in (1, 2, 3):
            for proposer in ("draft", "hybrid"):
                kw = dict(block=block, strategy=strategy, lookahead=lookahead, proposer=proposer)
                alone = [speculative.generate(target, h, p, 2 * block + 3, **kw)[0]
                         for p in prompts]
                batched = speculative.generate(target, h, prompts, 2 * block + 3, **kw)[0]
                assert alone == want and batched == want, (strategy, lookahead, proposer)


@pytest.mark.parametrize("strategy,lookahead,proposer,block", [("static", 1, "draft", 3),
                                                               ("dynamic", 2, "hybrid", 2)])
def test_sampling_with_a_head_follows_the_targets_distribution(strategy, lookahead, proposer,
                                                               block, random_model):
    """600 sampled decodes with a head proposing (fresh draws at every state), against the exact
    distribution of the target's own sampled decoding, enumerated (the chi-square test of
    test_speculative, shown there to fail on biased rules)."""
    target = random_model(2, 1, vocab=4, sharpen=0.5)
    h = random_head(target, block, seed=1, scale=0.3)
    prompt_ids, n = SETUPS[block]
    sampling = sdar.Sampling(1.0)
    exact = enumerate_decoding(target, prompt_ids, n, block, strategy, 0.4, sampling)
    g = torch.Generator().manual_seed(0)
    samples = [tuple(speculative.generate(target, h, prompt_ids, n, block=block,
                                          strategy=strategy, threshold=0.4, sampling=sampling,
                                          lookahead=lookahead, proposer=proposer,
                                          generator=g)[0]) for _ in range(600)]
    assert p_value(exact, samples) > 1e-5


@pytest.mark.parametrize("strategy", ["static", "dynamic"])
def test_the_heads_chain_is_sdars_rule_on_its_outputs(strategy, random_model):
    """head_chain against a hand-built loop: at each step the head's distribution at the current
    state (from the hidden states it was given), the argmax at every masked position, the
    quota's most confident revealed (ties: the lower position), and with dynamic every one above
    the threshold; rows with known positions and steps already taken."""
    target = random_model(0, 2)
    B, R, mask = 4, 6, target.config.mask_token_id
    h = random_head(target, B, scale=1.0)  # confident: some picks above the threshold
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(R, B, target.config.hidden_size, generator=g)
    known = torch.rand(R, B, generator=g) < 0.3
    x = torch.where(known, torch.randint(0, mask, (R, B), generator=g), mask)
    done = torch.where(known.any(1), 1, 0)
    rule = sdar.Settings(strategy=strategy, threshold=0.3).resolve("lossless")
    rows = SimpleNamespace(x=x, known=known, start=torch.zeros(R, dtype=torch.long), done=done,
                           hidden=hidden, has_hint=torch.ones(R, dtype=torch.bool),
                           dead=torch.zeros(R, dtype=torch.bool), reach=torch.full((R,), 2))
    chain = head_chain(SimpleNamespace(rows=rows, draft=h, settings=rule, generator=None))
    beyond = 0  # steps where the threshold revealed more than the quota
    for r in range(R):
        state = x[r].tolist()
        for s in range(B):
            assert chain.states[r, 0, s].tolist() == state
            with torch.no_grad():
                logits = h(hidden[r:r + 1], torch.tensor([state]))[0].tolist()
            probs = [[math.exp(v - max(row[:mask])) for v in row[:mask]] for row in logits]
            probs = [[p / sum(row) for p in row] for row in probs]
            pick = [row.index(max(row)) for row in probs]
            todo = [i for i in range(B) if state[i] == mask]
            order = sorted(todo, key=lambda i: (-probs[i][pick[i]], i))
            k = sdar.quota(int(done[r]) + s, B, B)
            chosen = set(order[:k]) | {i for i in todo if strategy == "dynamic"
                                       and probs[i][pick[i]] > 0.3}
            beyond += len(chosen) > min(k, len(todo))
            state = [pick[i] if i in chosen else t for i, t in enumerate(state)]
        assert chain.tokens[r, 0].tolist() == state
    assert chain.real.any() and (beyond > 0) == (strategy == "dynamic")


def test_a_head_is_refused_beside_another_target(random_model, tmp_path):
    """Saved and loaded beside its own target it is the same head; beside any other (another
    seed, the same shape) it is refused in one sentence that says why."""
    target, other = random_model(0, 2), random_model(1, 2)
    h = random_head(target, 4)
    head.save(h, tmp_path / "head")
    assert head.is_head(tmp_path / "head")
    loaded = head.load(tmp_path / "head", target)
    x = torch.randint(0, 60, (2, 4))
    hidden = torch.randn(2, 4, target.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(hidden, x), h(hidden, x))
    with pytest.raises(ValueError, match="trained for another target"):
        head.load(tmp_path / "head", other)
    with pytest.raises(ValueError, match="lossless verification only"):
        speculative.generate(target, h, [1, 2, 3], 4, verify="exact")
    for drafting in ("step", "block"):  # a head's passes are its own: not a draft's forwards
        with pytest.raises(ValueError, match="a head proposes with one pass per step; drafting"):
            speculative.generate(target, h, [1, 2, 3], 4, drafting=drafting)
