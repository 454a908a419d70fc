"""Host round trips: everything in a decode's loop that would make a GPU wait for the host, counted
on the CPU from outside the loop's own code (a TorchFunctionMode sees every torch call), so that a
round trip added anywhere, in any file, is caught. Speculation makes one readback per iteration,
the target alone one per step at most."""
import pytest
import torch

import sdar
import speculative
from gpu import counted

SAMPLED = sdar.Sampling(temperature=1.0, top_k=20)
MODES = [  # (draft: None, "draft" or "ar"; generate's settings)
    ("draft", dict(proposer="draft")), ("draft", dict(proposer="hybrid")), (None, {}),
    ("draft", dict(verify="exact", drafting="block")),
    ("draft", dict(verify="simsd", drafting="block")), ("ar", {})]


@pytest.mark.parametrize("strategy", ["static", "dynamic"])
@pytest.mark.parametrize("sampling", [sdar.GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_speculation_reads_back_once_an_iteration(strategy, sampling, random_model, prompt):
    """16 rows of different lengths, every proposer and verification, block drafting: at most one
    round trip per iteration (the readback), whatever the rows do."""
    target, draft, ar = random_model(0, 2), random_model(1, 1), random_model(2, 1, "qwen3")
    prompts = [prompt(3 + n % 7, n) for n in range(16)]
    for kind, kw in MODES:
        if kind == "ar" and (strategy == "dynamic" and sampling is not sdar.GREEDY):
            continue  # refused: SpecDiff's sampled dynamic drafting
        big, small = (ar, target) if kind == "ar" else (target, draft if kind else None)

        def decode():
            return speculative.generate(big, small, prompts, 12, strategy=strategy,
                                        sampling=sampling, lookahead=2,
                                        generator=torch.Generator().manual_seed(0), **kw)
        syncs, iterations, where, (_, stats) = counted(decode, speculative, "speculate")
        assert iterations > 3
        assert syncs <= iterations, (kind, kw, syncs, iterations, where[:5])
        assert syncs == max(s.readbacks for s in stats)  # as the stats count them


def test_step_drafting_reads_once_more_a_draft_step(random_model, prompt):
    """Drafting a forward per step reads, after each, whether any block is still masked: at most
    one round trip per iteration and one per draft forward."""
    target, draft = random_model(0, 2), random_model(1, 1)
    prompts = [prompt(3 + n % 7, n) for n in range(16)]
    for strategy in ("static", "dynamic"):
        def decode():
            return speculative.generate(target, draft, prompts, 12, strategy=strategy,
                                        drafting="step", lookahead=2)
        syncs, iterations, where, (_, stats) = counted(decode, speculative, "speculate")
        draft_forwards = max(s.draft_forwards for s in stats)
        assert iterations < syncs <= iterations + draft_forwards, where[:5]
        from_the_first_proposal, _, _, _ = counted(decode, speculative, "propose")
        assert from_the_first_proposal == max(s.readbacks for s in stats) + 1  # + the first


@pytest.mark.parametrize("strategy", ["static", "dynamic"])
def test_the_target_alone_reads_back_at_most_once_a_step(strategy, random_model, prompt):
    """Block diffusion: at most one round trip per step (static: only where a block may fill);
    AR decoding: one per token."""
    m, ar = random_model(0, 2), random_model(2, 1, "qwen3")
    prompts = [prompt(3 + n % 7, n) for n in range(16)]
    syncs, steps, where, _ = counted(lambda: sdar.generate(m, prompts, 12, strategy=strategy),
                                     sdar.Blocks, "forward")
    assert steps > 3 and syncs <= steps, where[:5]
    if strategy == "static":  # one prompt: the host knows which steps cannot fill its block
        syncs, steps, _, _ = counted(lambda: sdar.generate(m, prompts[0], 12), sdar.Blocks,
                                     "forward")
        assert syncs * 2 <= steps
    syncs, tokens, where, _ = counted(lambda: sdar.generate_ar(ar, prompts, 12),
                                      ar, "forward")
    assert tokens >= 12 and syncs <= tokens, where[:5]


def test_the_counter_catches_an_added_read(random_model, prompt, monkeypatch):
    """The counter is not blind: one .item() added to the commit shows as a round trip more per
    iteration, and the assertion above would fail."""
    target, draft = random_model(0, 2), random_model(1, 1)
    prompts = [prompt(3 + n % 7, n) for n in range(16)]
    original = speculative.reach

    def reach_and_read(rows, s):
        rows.start[0].item()  # a stray read, deep in the commit
        return original(rows, s)
    monkeypatch.setattr(speculative, "reach", reach_and_read)
    syncs, iterations, where, _ = counted(
        lambda: speculative.generate(target, draft, prompts, 12, lookahead=2),
        speculative, "speculate")
    assert syncs >= 2 * iterations
    assert any(frame.name == "reach_and_read" for frame in where)
