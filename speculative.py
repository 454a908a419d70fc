"""Speculative decoding with a block-diffusion draft: SimSD for SDAR targets, SpecDiff for AR ones.

One iteration (`speculate`) reads draft -> layout -> target forward -> accept -> commit:
  1. draft   - the small SDAR model denoises the rest of the current block by the target's rule,
               then `lookahead - 1` whole blocks, recording every step's picks and distributions;
  2. layout  - every proposed block laid out for one target forward (mask.lookahead);
  3. forward - the target's one forward;
  4. accept  - the target's verdict, in time order;
  5. commit  - committed tokens join their blocks, and each cache keeps what was committed.

A diffusion target verifies in one of three ways (`verify`):
  lossless - the target's own decoding. From each state the draft proposed (one copy of the block
             per state) the target takes its own step: its pick at every masked position (argmax,
             or rejection sampling against the draft's pick, a draw from the target either way)
             and SDAR's rule on them. The step is committed; the chain goes on only if it equals
             the draft's. The output is decode.generate's (greedy: token for token; sampled: in
             distribution), and a target forward commits at least one step.
  exact    - the paper's acceptance on the same copies: each drafted token is judged (argmax, or
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

Host syncs per iteration: one, the verdict's readback; one more per draft step when drafting is
dynamic; and on CUDA two `synchronize` calls that time drafting for the stats.
"""
from collections import namedtuple
from dataclasses import dataclass

import torch

import decode
import mask as masks
from decode import GREEDY, Stats

LOOKAHEAD = 2  # blocks proposed to one target forward by default (the README says why)


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


@dataclass
class Proposal:
    """A block as the draft proposed it: known (B,) before drafting, the drafted tokens (B,), the
    step map (B,) (0 = known), the target steps taken on the block before (`done`), and at the
    state before each of its steps the draft's pick at every position (S, B) and its distribution
    (S, B, V; None when greedy). All on the target's device."""
    start: int
    known: torch.Tensor
    tokens: torch.Tensor
    step: torch.Tensor
    done: int
    picks: torch.Tensor
    probs: torch.Tensor | None

    @property
    def steps(self):  # S: the draft's steps on this block
        return len(self.picks)

    def masked(self):
        """(S, B): the masked positions of the state before each step (revealed at it or later)."""
        return self.step >= torch.arange(1, self.steps + 1, device=self.step.device)[:, None]

    def revealed(self):
        """(S, B): the positions each step revealed."""
        return self.step == torch.arange(1, self.steps + 1, device=self.step.device)[:, None]

    def positions(self):
        return torch.arange(self.start, self.start + len(self.tokens), device=self.tokens.device)

    def at_own_step(self, x):
        """x (S, B, ...) -> (B, ...): each drafted position's row at the step that revealed it."""
        cols = torch.arange(len(self.step), device=x.device)
        return x[(self.step - 1).clamp(min=0), cols]


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


# What acceptance committed, as L + 1 rows of B (the proposed blocks and the next): the tokens (the
# mask id where unknown), which are known after the commit, and each position's fate: 0 known before
# or never drafted, 1 committed as drafted, 2 the target's own token, 3 drafted but not committed.
Verdict = namedtuple("Verdict", "tokens known fate")


@dataclass
class Run:
    """One decode's state. pending: completed blocks the draft (and a diffusion target) has not
    stored yet, fed in front of its next forward; target_pending: the AR target's newest token,
    which its cache lacks. The generator lives on the draft's device."""
    target: torch.nn.Module
    draft: torch.nn.Module
    tcache: object
    dcache: object
    block: Block
    pending: torch.Tensor
    target_pending: torch.Tensor
    generator: torch.Generator | None
    stats: Stats


# ----------------------------------------------------------------------------- one iteration

def speculate(run, opt):
    """One iteration: draft -> layout -> target forward -> accept -> commit. Returns the tokens it
    makes returnable (untrimmed) and what happened (on_iteration's info)."""
    B, dev = opt.block, run.block.tokens.device
    t0 = decode.sync(dev)
    # 1. draft: the rest of the current block, then whole blocks, as many as max_new_tokens needs
    n_blocks = min(opt.lookahead, -(-(opt.end - run.block.start) // B))
    draft_len = run.dcache.len
    proposals = propose(run, n_blocks, opt)
    t1 = decode.sync(dev)
    if opt.verify is None:  # an AR target
        # 2. layout, 3. the target's forward: its logits before each drafted token, and after
        ids, pos = causal_layout(proposals, run.target_pending, run.block.masks)
        attend = masks.block_causal(len(ids), 1, device=dev)
        logits = run.target(ids[None], pos, attend, run.tcache)[0, len(run.target_pending) - 1:]
        # 4. accept, in position order
        verdict = accept_causal(proposals, opt.sampling.distribution(logits), run, opt)
    else:
        # 2. layout, 3. the target's forward: its logits at every verifying row
        ids, pos, attend, n_context = layout(proposals, run.pending, opt)
        logits = run.target(ids[None], pos, attend, run.tcache)[0, n_context:]
        if opt.verify == "simsd":  # the mask tokens: the second half of each block's part
            logits = logits.view(n_blocks, 2, B, -1)[:, 1]
        q = opt.sampling.distribution(logits.view(-1, B, logits.shape[-1]), suppress=opt.mask_id)
        # 4. accept: the target's own steps, or the paper's judgement of each drafted token
        accept = accept_lossless if opt.verify == "lossless" else accept_paper
        verdict = accept(proposals, q, run, opt)
    # 5. commit: read the verdict back (the iteration's one host sync), keep what was committed
    seen = readback(verdict, proposals)
    lossless = opt.verify == "lossless"
    taken = [steps_taken(f, s, lossless) for f, s in zip(seen["fate"], seen["steps"])]
    new = commit(run, seen, taken, verdict, proposals, draft_len, opt)
    count(run.stats, seen, taken, t1 - t0)
    info = dict(starts=[p.start for p in proposals] + [proposals[-1].start + B], taken=taken,
                **{name: seen[name] for name in ("tokens", "fate", "drafted", "steps")})
    return new, info


# ----------------------------------------------------------------------------- 1. draft

def propose(run, n_blocks, opt):
    """Draft n_blocks: the rest of the current block by the target's rule, then whole blocks, each
    after storing the one before in the draft's cache (tentatively: commit() rewinds what the
    target does not commit). Returns one Proposal per block."""
    B, blk, ddev, dev = opt.block, run.block, decode.device_of(run.draft), run.block.tokens.device
    x, known, pending = blk.tokens.to(ddev), blk.known.to(ddev), run.pending.to(ddev)
    masks_left, done = blk.masks, blk.done
    strategy = "left" if opt.verify is None and not opt.sampling.greedy else opt.strategy
    proposals = []
    for j in range(n_blocks):
        start = blk.start + j * B
        quotas = decode.schedule(masks_left, B, opt.steps, done)
        d = decode.denoise(run.draft, x, known, start, quotas, cache=run.dcache, pending=pending,
                           strategy=strategy, threshold=opt.threshold, sampling=opt.sampling,
                           generator=run.generator, record=True)
        probs = None if d.probs is None else d.probs.to(dev)
        proposals.append(Proposal(start, known.to(dev), d.tokens.to(dev), d.step.to(dev), done,
                                  d.picks.to(dev), probs))
        pending, masks_left, done = d.tokens, B, 0
        x, known = torch.full_like(x, opt.mask_id), torch.zeros_like(known)
    return proposals


# ----------------------------------------------------------------------------- 2. layout

def layout(proposals, pending, opt):
    """One diffusion-target forward: [pending | clean copies of blocks 1..L-1 | one part per block].
    A clean copy is a proposed block as drafted: the next block is verified as if it were stored.
    A part is one copy of the block per proposed state (lossless, exact: mask.copies), or the block
    with its reference tokens and one mask token per position (simsd: mask.verify).
    Returns ids, positions, the attention mask and how many tokens come before the parts."""
    B, first = opt.block, proposals[0].start
    ids = [pending] + [p.tokens for p in proposals[:-1]]
    pos = [torch.arange(first - len(pending), first, device=pending.device)]
    pos += [p.positions() for p in proposals[:-1]]
    n_context, parts = len(pending) + (len(proposals) - 1) * B, []
    for p in proposals:
        if opt.verify == "simsd":
            ids += [p.tokens, torch.full_like(p.tokens, opt.mask_id)]
            pos += [p.positions(), p.positions()]
            parts.append(masks.verify(p.step))
        else:
            states = torch.where(p.masked(), opt.mask_id, p.tokens)  # (S, B)
            ids.append(states.flatten())
            pos.append(p.positions().repeat(p.steps))
            parts.append(masks.copies(p.steps, B, pending.device))
    return torch.cat(ids), torch.cat(pos), masks.lookahead(parts, len(pending), B), n_context


def causal_layout(proposals, target_pending, n_masks):
    """An AR target's forward: [its pending token | every drafted token, in position order]. The
    current block's known tokens are a prefix (commits are prefixes), its drafted ones the rest."""
    B = len(proposals[0].tokens)
    drafted = torch.cat([p.tokens for p in proposals])[B - n_masks:]
    first = proposals[0].start + B - n_masks
    pos = torch.arange(first - len(target_pending), first + len(drafted), device=drafted.device)
    return torch.cat([target_pending, drafted]), pos


# ----------------------------------------------------------------------------- 4. accept

def judge(d, p, q, sampling, generator=None, stop_ids=(), eos_min_prob=0.0):
    """(tokens, ok): each row's verdict on a drafted token d (...,), given draft and target
    distributions p and q (..., V). Greedy accepts d when it is argmax q; sampling with probability
    min(1, q(d) / p(d)), else draws from normalize(max(q - p, 0)): a row's token is distributed as
    q whatever the draft did. eos_min_prob: a stop token the target picks needs this probability,
    else it picks again without stop tokens (which changes the target's output)."""
    chosen = q
    if stop_ids and eos_min_prob > 0:  # gate the stop tokens the target does not really want
        stops = torch.tensor(list(stop_ids), device=q.device)
        weak = q.index_select(-1, stops) < eos_min_prob
        chosen = q.index_copy(-1, stops, q.index_select(-1, stops).masked_fill(weak, 0.0))
        chosen = torch.where(chosen.sum(-1, keepdim=True) > 0, chosen, q)
    if sampling.greedy:
        ok = d == q.argmax(-1)
        return torch.where(ok, d, chosen.argmax(-1)), ok
    source = generator.device if generator is not None else d.device  # the generator's own device

    def uniform(shape):
        return torch.rand(shape, generator=generator, device=source).to(d.device)

    q_d, p_d = q.gather(-1, d[..., None])[..., 0], p.gather(-1, d[..., None])[..., 0]
    ok = uniform(d.shape) * p_d < q_d  # modified rejection sampling
    residual = (chosen - p).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, chosen)  # p == q: q
    gumbel = -torch.log(-torch.log(uniform(residual.shape).clamp(min=1e-20)))
    return torch.where(ok, d, (residual.log() + gumbel).argmax(-1)), ok


def in_time_order(ok, order):
    """The rows committed when judged in time order (order: each row's rank): every row up to the
    earliest rejected rank, all rows of that rank included."""
    first = torch.where(ok, order.max() + 1, order).min()
    return order <= first


def accept_lossless(proposals, q, run, opt):
    """Lossless: from every proposed state, in time order, the target's own step: its picks at the
    masked positions (argmax, or rejection sampling against the draft's picks) and SDAR's rule on
    them. Steps are committed up to the first that differs from the draft's: that one is the
    target's own, and the chain stops. q (G, B, V): the target at every copy."""
    masked = torch.cat([p.masked() for p in proposals])  # (G, B)
    proposed = torch.cat([p.revealed() for p in proposals])
    picks = torch.cat([p.picks for p in proposals])
    if opt.sampling.greedy:
        y = opt.sampling.pick(q)
    else:
        y, _ = judge(picks, torch.cat([p.probs for p in proposals]), q, opt.sampling, run.generator)
    steps = torch.cat([torch.arange(p.done, p.done + p.steps, device=q.device) for p in proposals])
    quota = decode.quota(steps, opt.block, opt.steps)[:, None]
    revealed = decode.reveal(q, y, masked, quota, opt.strategy, opt.threshold)
    differs = ((revealed != proposed) | (revealed & (y != picks))).any(-1)  # (G,)
    index = torch.arange(len(differs), device=q.device)
    first = torch.where(differs, index, len(differs)).min()  # the first step that differs
    committed = revealed & (index <= first)[:, None]  # every matched step, then the target's own
    as_drafted = committed & (index < first)[:, None]
    block_of = torch.cat([torch.full((p.steps,), j, device=q.device)  # (G,): each copy's block
                          for j, p in enumerate(proposals)])

    def fold(x):  # (G, B) -> (L, B): each block's steps summed (a position commits at most once)
        rows = torch.zeros(len(proposals), opt.block, dtype=torch.long, device=q.device)
        return rows.index_add(0, block_of, x.long())

    return finish(proposals, fold(committed) > 0, fold(y * committed), fold(as_drafted) > 0, opt)


def accept_paper(proposals, q, run, opt):
    """The paper's acceptance (exact, simsd): each drafted token judged against the target at the
    row that verifies it (simsd: its mask token; exact: its position in the copy before its
    step), in time order: draft steps (accept="step"), or positions ("position"). Every row up to
    the first rejected rank is committed, a rejected one with the target's token."""
    B, L = opt.block, len(proposals)
    d = torch.stack([p.tokens for p in proposals])  # (L, B)
    t = torch.stack([p.step for p in proposals])
    if opt.verify == "exact":  # q holds one copy per state: each position's own step
        offsets = [sum(p.steps for p in proposals[:j]) for j in range(L)]
        q = torch.stack([p.at_own_step(q[off:off + p.steps]) for p, off in zip(proposals, offsets)])
    p = None if opt.sampling.greedy else torch.stack([p.at_own_step(p.probs) for p in proposals])
    y, ok = judge(d, p, q, opt.sampling, run.generator, opt.stop_ids, opt.eos_min_prob)
    drafted = t > 0
    block_rank = torch.arange(L, device=d.device)[:, None]
    if opt.accept == "step":
        order = block_rank * (B + 1) + t
    else:
        order = block_rank * B + torch.arange(B, device=d.device)
    committed = drafted & in_time_order(ok | ~drafted, order)
    return finish(proposals, committed, y, ok, opt)


def accept_causal(proposals, q, run, opt):
    """SpecDiff: the drafted tokens judged in position order against the target's next-token
    distributions q (M + 1, V). Rows up to the first rejection are committed, that one with the
    target's token, or the row after the last drafted token (the bonus) when none is rejected."""
    B, L = opt.block, len(proposals)
    skip = B - run.block.masks  # the current block's known prefix
    d = torch.cat([p.tokens for p in proposals])[skip:]
    p = None
    if not opt.sampling.greedy:
        p = torch.cat([prop.at_own_step(prop.probs) for prop in proposals])[skip:]
        p = torch.cat([p, torch.zeros_like(p[:1])])
    rows = torch.arange(len(d) + 1, device=d.device)
    y, ok = judge(torch.cat([d, d[:1]]), p, q, opt.sampling, run.generator)  # + the bonus row
    ok = ok & (rows < len(d))  # the bonus row drafts nothing: never accepted
    committed = in_time_order(ok, rows)

    def grid(x):  # rows from block 1's first drafted position -> (L + 1, B)
        before = torch.zeros(skip, dtype=x.dtype, device=x.device)
        after = torch.zeros(B - 1, dtype=x.dtype, device=x.device)
        return torch.cat([before, x, after]).view(L + 1, B)

    return finish(proposals, grid(committed), grid(y), grid(ok), opt)


def finish(proposals, committed, tokens, as_drafted, opt):
    """The Verdict: positions committed (L or L + 1 rows of B) take `tokens`; as_drafted marks those
    committed as drafted. A missing last row is the fresh block after the proposals."""
    L, B = len(proposals), opt.block

    def rows(xs, fill):  # (L, B) -> (L + 1, B)
        extra = torch.full((L + 1 - len(xs), B), fill, dtype=xs.dtype, device=xs.device)
        return torch.cat([xs, extra])

    known = rows(torch.stack([p.known for p in proposals]), False)
    drafted = rows(torch.stack([p.step > 0 for p in proposals]), False)
    before = rows(torch.stack([torch.where(p.known, p.tokens, opt.mask_id) for p in proposals]),
                  opt.mask_id)
    committed, tokens, as_drafted = rows(committed, False), rows(tokens, 0), rows(as_drafted, False)
    fate = torch.where(committed, torch.where(as_drafted, 1, 2), torch.where(drafted, 3, 0))
    return Verdict(torch.where(committed, tokens, before), known | committed, fate)


# ----------------------------------------------------------------------------- 5. commit

def readback(verdict, proposals):
    """The verdict, the proposals' tokens and step maps, as lists: one copy to the host."""
    parts = dict(tokens=verdict.tokens, known=verdict.known, fate=verdict.fate,
                 drafted=torch.stack([p.tokens for p in proposals]),
                 steps=torch.stack([p.step for p in proposals]))
    flat = torch.cat([t.flatten().long() for t in parts.values()]).tolist()
    seen, i, B = {}, 0, len(proposals[0].tokens)
    for name, t in parts.items():
        values, i = flat[i:i + t.numel()], i + t.numel()
        seen[name] = [values[r:r + B] for r in range(0, len(values), B)]
    return seen


def steps_taken(fate, steps, lossless):
    """The target steps a block took in this iteration: lossless, its matched steps and the
    target's own; otherwise every draft step whose positions were all committed."""
    if lossless:
        return len({s for f, s in zip(fate, steps) if f == 1}) + (2 in fate)
    dropped = [s for f, s in zip(fate, steps) if f == 3]
    return min(dropped) - 1 if dropped else max(steps, default=0)


def count(stats, seen, taken, draft_seconds):
    """Add one iteration to the stats ; matched: draft steps committed whole as drafted."""
    stats.forwards += 1
    stats.steps += sum(taken)
    stats.draft_seconds += draft_seconds
    for fate, steps in zip(seen["fate"], seen["steps"]):
        stats.drafted += sum(s > 0 for s in steps)
        stats.draft_forwards += max(steps, default=0)
        stats.accepted += fate.count(1)
        for s in set(steps) - {0}:
            stats.matched += all(f == 1 for f, t in zip(fate, steps) if t == s)


def commit(run, seen, taken, verdict, proposals, draft_len, opt):
    """Each cache keeps the leading blocks committed exactly as drafted that it stored in this
    iteration (never the last proposed block); an AR target keeps its pending token and the
    accepted ones. The other completed blocks become pending, the first incomplete block the
    current one. Returns the tokens now returnable."""
    B, L, kept = opt.block, len(proposals), 0
    while kept < L - 1 and all(f in (0, 1) for f in seen["fate"][kept]):
        kept += 1
    if opt.verify is None:  # an AR target: the token after the accepted ones is pending next
        accepted = sum(row.count(1) for row in seen["fate"])
        run.tcache.commit(len(run.target_pending) + accepted)
        bonus = B - run.block.masks + accepted
        run.target_pending = verdict.tokens.flatten()[bonus:bonus + 1]
    else:
        run.tcache.commit(len(run.pending) + kept * B)
    run.dcache.rewind(draft_len + len(run.pending) + kept * B)
    current = kept
    while current <= L and all(seen["known"][current]):
        current += 1
    run.pending = verdict.tokens[kept:current].flatten()
    new = returnable(seen["tokens"], seen["known"], run.block.returned)
    start = proposals[0].start + current * B
    if current > L:  # block 1 and an AR bonus that filled the next block: a fresh one after it
        fresh = torch.full((B,), opt.mask_id, device=verdict.tokens.device)
        run.block = Block(start, fresh, torch.zeros_like(fresh, dtype=torch.bool), B)
        return new
    known = seen["known"][current]
    returned = known.index(False) if False in known else B  # its known prefix was returned
    done = proposals[current].done + taken[current] if current < L else 0
    run.block = Block(start, verdict.tokens[current], verdict.known[current], known.count(False),
                      done, returned)
    return new


def returnable(tokens, known, returned):
    """The known tokens after the first `returned`, up to the first unknown position (rows of B)."""
    flat = [t if k else None for t, k in zip(sum(tokens, []), sum(known, []))][returned:]
    return flat[:flat.index(None)] if None in flat else flat


# ----------------------------------------------------------------------------- the loop

def options(target, draft, max_new_tokens, prompt_len, *, block, steps, strategy, threshold,
            sampling, verify, accept, lookahead, eos_min_prob, stop_ids):
    """Check every option against the target's kind; the Options of the decode."""
    ar = target.config.model_type == "qwen3"
    decode.check(max_new_tokens=max_new_tokens, block=block, strategy=strategy, threshold=threshold,
                 lookahead=lookahead, eos_min_prob=eos_min_prob)
    steps = block if steps is None else steps
    decode.check_steps(steps, block)
    if ar and (verify is not None or accept is not None):
        raise ValueError("verify and accept apply to a diffusion target only; an autoregressive "
                         "target verifies causally, in position order")
    verify = None if ar else verify or "lossless"
    refused = [  # (when, why)
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
    return Options(block, steps, strategy, threshold, sampling, verify, accept or "step", lookahead,
                   eos_min_prob, tuple(stop_ids), decode.diffusion_mask_id(draft),
                   prompt_len + max_new_tokens)


def start(target, draft, prompt, generator, opt):
    """The Run after the prefill: the draft and a diffusion target cache the prompt's whole blocks
    (its tail is the current block's known part); an AR target all but its newest token."""
    B, ar = opt.block, opt.verify is None
    aligned = len(prompt) - len(prompt) % B
    room = opt.end + 3 * B + opt.lookahead * B * (B + 1)
    tcache, dcache = target.new_cache(room), draft.new_cache(room)
    decode.prefill(target, prompt[:-1] if ar else prompt[:aligned], tcache, 1 if ar else B)
    decode.prefill(draft, prompt[:aligned].to(decode.device_of(draft)), dcache, B)
    tail = prompt[aligned:]
    tokens = torch.cat([tail, tail.new_full((B - len(tail),), opt.mask_id)])
    known = torch.arange(B, device=prompt.device) < len(tail)
    block = Block(aligned, tokens, known, B - len(tail), returned=len(tail))
    return Run(target, draft, tcache, dcache, block, prompt[:0], prompt[-1:], generator, Stats())


@torch.inference_mode()
def generate(target, draft, prompt_ids, max_new_tokens, *, block=4, steps=None, strategy="static",
             threshold=0.9, sampling=GREEDY, verify=None, accept=None, lookahead=LOOKAHEAD,
             eos_min_prob=0.0, stop_ids=(), generator=None, on_iteration=None):
    """Speculative decoding: SimSD for a diffusion (SDAR) target, SpecDiff for an AR (qwen3) one.
    Returns (new tokens, Stats) as decode.generate does. block, steps, strategy, threshold and
    sampling: the target's decoding, which the draft follows. verify (a diffusion target):
    "lossless" (default: decode.generate's output), or the paper's "exact" or "simsd"; accept:
    "step" (default) or "position", for exact and simsd. lookahead: the blocks proposed to one
    target forward. eos_min_prob: exact and simsd's gate on stop tokens. generator: sampling's
    random state, on the draft's device. on_iteration(info) sees each iteration: every proposed
    block's start, tokens, fate, drafted tokens, step map and steps taken; the new tokens."""
    prompt = decode.as_prompt(prompt_ids, decode.device_of(target))
    opt = options(target, draft, max_new_tokens, len(prompt), block=block, steps=steps,
                  strategy=strategy, threshold=threshold, sampling=sampling, verify=verify,
                  accept=accept, lookahead=lookahead, eos_min_prob=eos_min_prob, stop_ids=stop_ids)
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
