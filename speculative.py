"""Speculative decoding with block-diffusion proposals: SimSD for SDAR targets, SpecDiff for AR ones.

One iteration (`speculate`) reads propose -> layout -> target forward -> accept -> commit (the
layouts and the acceptance rules are verifier.py's):
  1. propose - chains of states for the current block and the blocks after it, each made by
               SDAR's rule: by the draft (a forward per step, or one per block whose
               confidences the rule is applied to step after step), by the target itself (its
               logits from the forward that just ran, applied the same way: no forward at all),
               or by both, merged into a trie of distinct states;
  2. layout  - every proposed state laid out for one target forward (mask.tree);
  3. forward - the target's one forward;
  4. accept  - the target's verdict, in time order;
  5. commit  - committed tokens join their blocks, and each cache keeps what was committed.

A diffusion target verifies in one of three ways (`verify`):
  lossless - the target's own decoding. From each proposed state (one copy of the block per
             state) the target takes its own step: its pick at every masked position (argmax, or
             rejection sampling against a proposer's pick, a draw from the target either way)
             and SDAR's rule on them. The chain follows the child state equal to the target's
             step and stops where none is; the target's step from there is committed too. The
             output is decode.generate's (greedy: token for token; sampled: in distribution), and
             a target forward commits at least one step. After a proposed block ends, a clean copy
             of it and the next block's all-masked state give that block's first step, and the
             target's logits there propose the rest of it to the next forward.
  exact    - the paper's acceptance on the draft's copies: each drafted token is judged (argmax, or
             rejection sampling) in draft-step order. The draft chose which positions to reveal and
             when, so the output is not the target's own, and when sampling it is biased.
  simsd    - the paper's layout, one copy [block | masks] (mask.verify), and the same acceptance;
             deeper than one layer, a mask token also sees later reveals through other masks.
With exact and simsd, accept="position" (the paper's rule: the longest agreeing prefix in position
order) can commit tokens that were judged with a later-rejected token in place.

An autoregressive (Qwen3) target verifies causally (SpecDiff): one forward on [its newest committed
token | the drafted tokens, in position order] judges each drafted token by the logits before it;
the token at the first rejection, or after the last drafted one (a bonus), is the target's. The
output is the target's own, greedy and sampled (sampling drafts leftmost positions first).

Host syncs per iteration: one, the verdict's readback; one more when two proposers' chains are
merged (how long is their shared prefix?); one more per draft step when the draft refreshes
dynamically; and on CUDA two `synchronize` calls that time drafting for the stats.
"""
from dataclasses import dataclass

import torch

import decode
import mask as masks
from decode import GREEDY, Stats
from verifier import (DRAFT, SELF, Proposal, accept_causal, accept_lossless, accept_paper,
                      causal_layout, grow, layout)

LOOKAHEAD = 2  # blocks one target forward reaches by default (the README says why)
# Who proposes to a lossless target with a draft, by strategy (the README says why): the target's
# own chain helps static decoding; dynamic decoding has revealed every confident position already.
PROPOSER = {"static": "hybrid", "dynamic": "draft"}
DRAFTING = "block"  # the draft's forwards: one per block, or one per step ("step")


@dataclass
class Block:
    """The block being decoded at positions start..: its tokens (the mask id where unknown) and
    which are known; how many are unknown, the target steps taken on it, the tokens returned."""
    start: int
    tokens: torch.Tensor
    known: torch.Tensor
    masks: int
    done: int = 0
    returned: int = 0


@dataclass(frozen=True)
class Options:
    """One decode's settings, as options() checked them."""
    block: int
    steps: int
    strategy: str
    threshold: float
    sampling: decode.Sampling
    verify: str | None  # None: an AR target
    accept: str
    lookahead: int
    eos_min_prob: float
    stop_ids: tuple
    mask_id: int
    end: int  # the position after the last token max_new_tokens allows
    proposer: str  # "draft", "self" or "hybrid"
    drafting: str  # "step" or "block"


@dataclass
class Run:
    """One decode's state. tpending / dpending: completed blocks the target / the draft has not
    stored yet, fed in front of its next forward; target_pending: the AR target's newest token,
    which its cache lacks; hint: the target's distributions at the state its last committed step
    was taken from (B, V), which propose the rest of the block. The generator lives on the
    draft's device."""
    target: torch.nn.Module
    draft: torch.nn.Module | None
    tcache: object
    dcache: object
    block: Block
    tpending: torch.Tensor
    dpending: torch.Tensor
    target_pending: torch.Tensor
    hint: torch.Tensor | None
    generator: torch.Generator | None
    stats: Stats


# ----------------------------------------------------------------------------- one iteration

def speculate(run, opt):
    """One iteration: propose -> layout -> target forward -> accept -> commit. Returns the tokens
    it makes returnable (untrimmed) and what happened (on_iteration's info)."""
    B, dev = opt.block, run.block.tokens.device
    t0 = decode.sync(dev)
    # 1. propose: chains for the current block and, up to max_new_tokens, the blocks after it
    n_blocks = min(opt.lookahead, -(-(opt.end - run.block.start) // B))
    draft_len = run.dcache.len if run.dcache is not None else 0
    chains = propose(run, n_blocks, opt)
    t1 = decode.sync(dev)
    if opt.verify is None:  # an AR target
        # 2. layout, 3. the target's forward: its logits before each drafted token, and after
        ids, pos = causal_layout(chains[DRAFT], run.target_pending, run.block.masks)
        attend = masks.block_causal(len(ids), 1, device=dev)
        logits = run.target(ids[None], pos, attend, run.tcache)[0, len(run.target_pending) - 1:]
        # 4. accept, in position order
        q = opt.sampling.distribution(logits)
        verdict = accept_causal(chains[DRAFT], q, run.generator, run.block.masks, opt)
    else:
        # 2. layout, 3. the target's forward: its distributions at every verifying row
        tree = grow(chains, n_blocks, run.block, opt)
        ids, pos, attend, rows = layout(tree, run.tpending, run.block.start, opt)
        logits = run.target(ids[None], pos, attend, run.tcache)[0, rows]
        q = opt.sampling.distribution(logits.view(-1, B, logits.shape[-1]), suppress=opt.mask_id)
        # 4. accept: the target's own steps, or the paper's judgement of each drafted token
        if opt.verify == "lossless":
            verdict = accept_lossless(tree, q, run.generator, len(run.tpending), opt)
        else:
            verdict = accept_paper(tree, q, run.generator, opt)
    # 5. commit: each cache keeps what was committed; the rest becomes pending
    start = run.block.start
    new = commit(run, verdict, draft_len, opt)
    count(run.stats, verdict, len(ids), t1 - t0)
    info = dict(starts=[start + j * B for j in range(len(verdict.tokens))], tokens=verdict.tokens,
                fate=verdict.fate, drafted=verdict.proposed, steps=verdict.steps,
                taken=verdict.taken, by=verdict.by, stored=verdict.slots)
    return new, info


# ----------------------------------------------------------------------------- 1. propose

def propose(run, n_blocks, opt):
    """{proposer flag: [Proposal per block from the current one]}: the target's own chain (from
    the logits of the state its last step was taken from: the rest of the current block) and the
    draft's. A lossless target reaches the last of n_blocks by its first state alone (grow)."""
    chains = {}
    if opt.proposer != "draft" and run.hint is not None:
        chains[SELF] = [self_proposal(run, opt)]
    if opt.proposer != "self":
        chains[DRAFT] = draft_proposals(run, n_blocks - (opt.verify == "lossless" and n_blocks > 1),
                                        opt)
    return chains


def self_proposal(run, opt):
    """The target's own chain for the rest of the current block: SDAR's rule applied step after
    step to its distributions at the state it last stepped from (run.hint), fresh picks at every
    state when sampling. No forward."""
    blk = run.block
    dev = run.generator.device if run.generator is not None else blk.tokens.device
    quotas = decode.schedule(blk.masks, opt.block, opt.steps, blk.done)
    d = decode.denoise(run.target, blk.tokens.to(dev), blk.known.to(dev), blk.start, quotas,
                       strategy=opt.strategy, threshold=opt.threshold, sampling=opt.sampling,
                       generator=run.generator, record=True, probs=run.hint.to(dev), refresh=False)
    back = blk.tokens.device
    probs = None if d.probs is None else d.probs.to(back)
    return Proposal(blk.start, blk.known, d.tokens.to(back), d.step.to(back), blk.done,
                    d.picks.to(back), probs)


def draft_proposals(run, n_blocks, opt):
    """Draft n_blocks: the rest of the current block by the target's rule, then whole blocks, each
    after storing the one before in the draft's cache (tentatively: commit() rewinds what the
    target does not commit). drafting "step": a forward per step; "block": one per block."""
    B, blk, ddev, dev = opt.block, run.block, decode.device_of(run.draft), run.block.tokens.device
    x, known, pending = blk.tokens.to(ddev), blk.known.to(ddev), run.dpending.to(ddev)
    masks_left, done = blk.masks, blk.done
    strategy = "left" if opt.verify is None and not opt.sampling.greedy else opt.strategy
    proposals = []
    for j in range(n_blocks):
        start = blk.start + j * B
        quotas = decode.schedule(masks_left, B, opt.steps, done)
        d = decode.denoise(run.draft, x, known, start, quotas, cache=run.dcache, pending=pending,
                           strategy=strategy, threshold=opt.threshold, sampling=opt.sampling,
                           generator=run.generator, record=True, refresh=opt.drafting == "step")
        run.stats.draft_forwards += d.forwards
        probs = None if d.probs is None else d.probs.to(dev)
        proposals.append(Proposal(start, known.to(dev), d.tokens.to(dev), d.step.to(dev), done,
                                  d.picks.to(dev), probs))
        pending, masks_left, done = d.tokens, B, 0
        x, known = torch.full_like(x, opt.mask_id), torch.zeros_like(known)
    return proposals


# ----------------------------------------------------------------------------- 5. commit

def count(stats, v, width, draft_seconds):
    """Add one iteration to the stats; matched: proposed steps the target committed as proposed."""
    stats.forwards += 1
    stats.steps += sum(v.taken)
    stats.width += width
    stats.draft_seconds += draft_seconds
    stats.matched += v.matched[0]
    stats.draft_matched += v.matched[1]
    for fate, steps in zip(v.fate, v.steps):
        stats.drafted += sum(s > 0 for s in steps)
        stats.accepted += fate.count(1)


def commit(run, v, draft_len, opt):
    """Each cache keeps what was committed of what it stored in this iteration: a diffusion
    target its pending blocks and the clean copies of the committed blocks (v.slots; moved to
    the front when others lie between them), an AR target its pending token and the accepted
    ones, the draft the leading blocks committed exactly as drafted. The other complete blocks
    become pending; the first incomplete block is the current one (a fresh one after them when
    none is). Returns the tokens now returnable."""
    B, dev = opt.block, run.block.tokens.device
    complete = 0
    while complete < len(v.tokens) and all(v.known[complete]):
        complete += 1
    tokens = torch.tensor(v.tokens, device=dev)  # (rows, B)
    if opt.verify is None:  # an AR target: the token after the accepted ones is pending next
        accepted = sum(row.count(1) for row in v.fate)
        run.tcache.commit(len(run.target_pending) + accepted)
        bonus = B - run.block.masks + accepted
        run.target_pending = tokens.flatten()[bonus:bonus + 1]
    else:
        P, n = len(run.tpending), len(v.slots)
        keep = None if v.slots == list(range(n)) else [*range(P), *(
            P + c * B + i for c in v.slots for i in range(B))]
        run.tcache.commit(P + n * B, keep)
        run.tpending = tokens[n:complete].flatten()
    if run.dcache is not None:
        run.dcache.rewind(draft_len + len(run.dpending) + v.kept * B)
        run.dpending = tokens[v.kept:complete].flatten()
    new = returnable(v.tokens, v.known, run.block.returned)
    start, run.hint = run.block.start + complete * B, v.hint
    if complete == len(v.tokens):  # every row complete: a fresh block after them
        fresh = torch.full((B,), opt.mask_id, device=dev)
        run.block = Block(start, fresh, torch.zeros_like(fresh, dtype=torch.bool), B)
        return new
    known = v.known[complete]
    returned = known.index(False) if False in known else B  # its known prefix was returned
    run.block = Block(start, tokens[complete], torch.tensor(known, dtype=torch.bool, device=dev),
                      known.count(False), v.done[complete], returned)
    return new


def returnable(tokens, known, returned):
    """The known tokens after the first `returned`, up to the first unknown position (rows of B)."""
    flat = [t if k else None for t, k in zip(sum(tokens, []), sum(known, []))][returned:]
    return flat[:flat.index(None)] if None in flat else flat


# ----------------------------------------------------------------------------- the loop

def options(target, draft, max_new_tokens, prompt_len, *, block, steps, strategy, threshold,
            sampling, verify, accept, lookahead, eos_min_prob, stop_ids, proposer, drafting):
    """Check every option against the target's kind and the proposers; the Options of the
    decode."""
    ar = target.config.model_type == "qwen3"
    decode.check(max_new_tokens=max_new_tokens, block=block, strategy=strategy, threshold=threshold,
                 lookahead=lookahead, eos_min_prob=eos_min_prob)
    steps = block if steps is None else steps
    decode.check_steps(steps, block)
    if ar and (verify is not None or accept is not None):
        raise ValueError("verify and accept apply to a diffusion target only; an autoregressive "
                         "target verifies causally, in position order")
    verify = None if ar else verify or "lossless"
    if proposer is None:
        proposer = "self" if draft is None else "draft" if verify != "lossless" else PROPOSER.get(
            strategy, "draft")
    refused = [  # (when, why)
        (draft is None and ar, "an autoregressive target needs a draft to propose to it"),
        (proposer not in ("draft", "self", "hybrid"),
         f"proposer must be 'draft', 'self' or 'hybrid'; got {proposer!r}"),
        (draft is None and proposer != "self",
         f"proposer={proposer!r} needs a draft model; without one the target proposes for itself"),
        (draft is not None and proposer == "self",
         "proposer='self' proposes with the target alone; pass draft=None"),
        (proposer != "draft" and verify != "lossless",
         "the target's own proposals are verified losslessly only; use verify='lossless'"),
        (proposer == "self" and lookahead > 2,
         "the target proposes the rest of its block and the next block's first step: "
         "lookahead 1 or 2"),
        (draft is None and drafting is not None, "drafting applies to a draft model"),
        (drafting not in (None, "step", "block"),
         f"drafting must be 'step' or 'block'; got {drafting!r}"),
        (ar and strategy == "dynamic" and not sampling.greedy,
         "strategy='dynamic' reveals drafted tokens by their sampled confidence, which biases an "
         "autoregressive target's rejection sampling; use 'static'"),
        (verify not in (None, "lossless", "exact", "simsd"),
         f"verify must be 'lossless', 'exact' or 'simsd'; got {verify!r}"),
        (accept not in (None, "step", "position"),
         f"accept must be 'step' or 'position'; got {accept!r}"),
        (accept is not None and verify == "lossless",
         "accept applies to verify='exact' or 'simsd'; lossless follows the target's own order"),
        (eos_min_prob > 0 and verify in (None, "lossless"),
         "eos_min_prob changes the target's output; it applies to verify='exact' or 'simsd' only")]
    for when, why in refused:
        if when:
            raise ValueError(why)
    mask_id = decode.diffusion_mask_id(target if draft is None else draft)
    if drafting is None:  # the paper's drafts and SpecDiff's decode step by step
        drafting = DRAFTING if verify == "lossless" else "step"
    return Options(block, steps, strategy, threshold, sampling, verify, accept or "step", lookahead,
                   eos_min_prob, tuple(stop_ids), mask_id, prompt_len + max_new_tokens, proposer,
                   drafting)


def start(target, draft, prompt, generator, opt):
    """The Run after the prefill: the draft and a diffusion target cache the prompt's whole blocks
    (its tail is the current block's known part); an AR target all but its newest token."""
    B, ar = opt.block, opt.verify is None
    aligned = len(prompt) - len(prompt) % B
    room = opt.end + 3 * B + (opt.lookahead + 1) * B * (B + 1)
    tcache = target.new_cache(room)
    decode.prefill(target, prompt[:-1] if ar else prompt[:aligned], tcache, 1 if ar else B)
    dcache = None
    if draft is not None:
        dcache = draft.new_cache(room)
        decode.prefill(draft, prompt[:aligned].to(decode.device_of(draft)), dcache, B)
    tail = prompt[aligned:]
    tokens = torch.cat([tail, tail.new_full((B - len(tail),), opt.mask_id)])
    known = torch.arange(B, device=prompt.device) < len(tail)
    block = Block(aligned, tokens, known, B - len(tail), returned=len(tail))
    return Run(target, draft, tcache, dcache, block, prompt[:0], prompt[:0], prompt[-1:], None,
               generator, Stats())


@torch.inference_mode()
def generate(target, draft, prompt_ids, max_new_tokens, *, block=4, steps=None, strategy="static",
             threshold=0.9, sampling=GREEDY, verify=None, accept=None, lookahead=LOOKAHEAD,
             eos_min_prob=0.0, stop_ids=(), generator=None, on_iteration=None, proposer=None,
             drafting=None):
    """Speculative decoding: SimSD for a diffusion (SDAR) target, SpecDiff for an AR (qwen3) one.
    Returns (new tokens, Stats) as decode.generate does. block, steps, strategy, threshold and
    sampling: the target's decoding, which the proposers follow. verify (a diffusion target):
    "lossless" (default: decode.generate's output), or the paper's "exact" or "simsd"; accept:
    "step" (default) or "position", for exact and simsd. draft None: the target proposes for
    itself (lossless). proposer, with a draft: "draft", or "hybrid" (the draft and the target
    both; lossless only; default PROPOSER by strategy). drafting: "step" (a draft forward per
    step) or "block" (one per block; lossless's default DRAFTING, the others' "step").
    lookahead: the blocks one target forward reaches. eos_min_prob: exact and simsd's gate on stop tokens. generator: sampling's random
    state, on the draft's device (the target's without a draft). on_iteration(info) sees each
    iteration: every block's start, committed tokens and fates, the proposed tokens and step
    map of the chain shown and who proposed it (by), the steps taken; the new tokens."""
    prompt = decode.as_prompt(prompt_ids, decode.device_of(target))
    opt = options(target, draft, max_new_tokens, len(prompt), block=block, steps=steps,
                  strategy=strategy, threshold=threshold, sampling=sampling, verify=verify,
                  accept=accept, lookahead=lookahead, eos_min_prob=eos_min_prob, stop_ids=stop_ids,
                  proposer=proposer, drafting=drafting)
    t0 = decode.sync(prompt.device)
    run = start(target, draft, prompt, generator, opt)
    t1 = decode.sync(prompt.device)
    out, done = [], False
    while not done:
        new, info = speculate(run, opt)
        new, done = decode.trim(new, opt.stop_ids, max_new_tokens - len(out))
        out += new
        if on_iteration:
            on_iteration({**info, "new": new})
    run.stats.tokens = len(out)
    run.stats.seconds, run.stats.prefill_seconds = decode.sync(prompt.device) - t1, t1 - t0
    return out, run.stats
