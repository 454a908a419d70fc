"""What the target checks in its one forward, and what it commits.

The proposers' chains of states become a tree (a trie of distinct states); `layout` lays the tree
out for one target forward (mask.tree), and the acceptance rules read the target's distributions:
  accept_lossless - from every state, the target's own step; the chain follows the child the
                    step reaches: the target's own decoding, whatever was proposed;
  accept_paper    - the paper's judgement of each drafted token (exact copies, or its layout);
  accept_causal   - an AR target's judgement, in position order (SpecDiff).
Each returns a Verdict, read back to the host in one copy. `opt` is speculative.Options.
"""
import functools
from collections import namedtuple
from dataclasses import dataclass

import torch

import decode
import mask as masks

DRAFT, SELF = 1, 2  # proposer flags


@dataclass
class Proposal:
    """A block as a proposer decoded it: known (B,) before, the proposed tokens (B,), the step map
    (B,) (0 = known), the target steps taken on the block before (`done`), and at the state before
    each of its steps the pick at every position (S, B) and its distribution (S, B, V; None when
    greedy). All on the target's device."""
    start: int
    known: torch.Tensor
    tokens: torch.Tensor
    step: torch.Tensor
    done: int
    picks: torch.Tensor
    probs: torch.Tensor | None

    @property
    def steps(self):  # S: the proposer's steps on this block
        return len(self.picks)

    def masked(self):
        """(S, B): the masked positions of the state before each step (revealed at it or later)."""
        return self.step >= torch.arange(1, self.steps + 1, device=self.step.device)[:, None]

    def at_own_step(self, x):
        """x (S, B, ...) -> (B, ...): each proposed position's row at the step that revealed it."""
        cols = torch.arange(len(self.step), device=x.device)
        return x[(self.step - 1).clamp(min=0), cols]


@dataclass
class Tree:
    """Proposed states as a trie, a node per distinct state, a parent before its children. states
    (N, B) (the mask id where masked); arrival (N, B): the state the parent's step must reach for
    the chain to enter the node (the node's own state; for the first state of a later block, the
    block before it complete, laid out as a clean copy); picks (N, B) and probs (N, B, V) the
    proposer's draws at the node (drawn False: none, a leaf the target alone decides); host lists:
    parent (-1: the root), block (0: the current one), done (target steps taken on the block
    before the state), by (proposer flags); chains: {flag: (its proposals, its node indices)}."""
    states: torch.Tensor
    arrival: torch.Tensor
    picks: torch.Tensor
    probs: torch.Tensor | None
    drawn: torch.Tensor
    parent: list
    block: list
    done: list
    by: list
    chains: dict

    def shape(self, n_pending, block):
        """What its layout takes from its shape alone (tree_shape)."""
        return tree_shape(tuple(self.parent), tuple(self.block), n_pending, block,
                          self.states.device)


Shape = namedtuple("Shape", "ancestors cleans attend positions parent")


@functools.lru_cache(maxsize=4096)
def tree_shape(parent, blocks, n_pending, block, device):
    """A tree layout's parts that depend on its shape alone, built once per shape (a decode meets
    a few dozen): ancestors (N, N) bool (node n is node m or descends from it); cleans, the nodes
    that start a later block than their parent's, each laid out after a clean copy of the block
    before it; the attention mask of [pending | clean copies | one copy per state]; the
    positions, relative to the current block's start; each node's parent (the root: itself)."""
    rows = []
    for n, p in enumerate(parent):
        row = list(rows[p]) if p >= 0 else [False] * len(parent)
        row[n] = True
        rows.append(row)
    ancestors = torch.tensor(rows, device=device)
    cleans = [n for n, p in enumerate(parent) if p >= 0 and blocks[n] > blocks[p]]
    whole = torch.ones(block, block, dtype=torch.bool, device=device)  # a copy sees itself whole
    attend = masks.tree([whole] * len(parent), n_pending, block, ancestors, cleans)
    first = block * torch.tensor(blocks, device=device)  # each state's first position
    offsets = torch.arange(block, device=device)
    positions = torch.cat([torch.arange(-n_pending, 0, device=device),
                           ((first[cleans] - block)[:, None] + offsets).flatten(),
                           (first[:, None] + offsets).flatten()])
    parents = torch.tensor([max(p, 0) for p in parent], device=device)
    return Shape(ancestors, cleans, attend, positions, parents)


# What acceptance committed, as rows of B from the current block on: the tokens (the mask id where
# unknown), which are known after the commit, and for the chain shown (on_iteration) each
# position's fate: 0 known before or never proposed, 1 committed as proposed, 2 the target's own
# token, 3 proposed but not committed, with its proposed tokens and step map. Then per row the
# target steps taken and the steps taken on it after the commit (done); slots: the clean copies
# whose keys the target keeps; kept: the leading drafted blocks the draft keeps; matched: (steps
# committed as proposed, of them the draft's); hint: the target's distributions at the state its
# last step was taken from, when the block goes on; by: who proposed the chain shown.
Verdict = namedtuple("Verdict", "tokens known fate proposed steps taken done slots kept matched "
                     "hint by")


# ----------------------------------------------------------------------------- 2. layout

def chain(proposals, tail, flag, opt):
    """One proposer's chain as a Tree: the state before each step of each proposed block, and
    with `tail` the all-masked state of the block after the last, which the target decides alone."""
    B, dev = opt.block, proposals[0].tokens.device
    states, arrival, block, done = [], [], [], []
    for j, p in enumerate(proposals):
        s = torch.where(p.masked(), opt.mask_id, p.tokens)  # (S, B)
        states.append(s)
        arrival.append(s if j == 0 else torch.cat([proposals[j - 1].tokens[None], s[1:]]))
        block += [j] * p.steps
        done += range(p.done, p.done + p.steps)
    picks = [p.picks for p in proposals]
    probs = None if proposals[0].probs is None else [p.probs for p in proposals]
    n = len(block)
    if tail:
        blank = torch.full((1, B), opt.mask_id, device=dev)
        states.append(blank)
        arrival.append(proposals[-1].tokens[None])
        picks.append(torch.zeros_like(blank))
        if probs is not None:
            probs.append(torch.zeros_like(probs[0][:1]))
        block.append(len(proposals))
        done.append(0)
    drawn = torch.arange(len(block), device=dev) < n
    probs = None if probs is None else torch.cat(probs)
    nodes = len(block)
    return Tree(torch.cat(states), torch.cat(arrival), torch.cat(picks), probs, drawn,
                list(range(-1, nodes - 1)), block, done, [flag] * nodes,
                {flag: (proposals, list(range(nodes)))})


def root(blk):
    """The Tree of the current block's state alone: the target takes its own step from it."""
    x = blk.tokens[None]
    return Tree(x, x, torch.zeros_like(x), None, torch.zeros(1, dtype=torch.bool,
                device=x.device), [-1], [0], [blk.done], [0], {})


def grow(chains, n_blocks, blk, opt):
    """The trie of the proposers' chains: they share the current block's state and their prefix
    of identical states (one host sync to find it), and part after it; with a lossless target,
    each chain ends in the all-masked state of the block after its last (tail), up to n_blocks.
    A state shared by both keeps the target's own draws."""
    trees = [chain(proposals, opt.verify == "lossless" and len(proposals) < n_blocks, flag, opt)
             for flag, proposals in chains.items()]
    if not trees:
        return root(blk)
    tree = trees[0]
    for other in trees[1:]:
        tree = merge(tree, other)
    return tree


def merge(a, b):
    """The trie of two chains from one root: b's nodes after their shared prefix hang from it."""
    m = min(len(a.block), len(b.block))
    same = (a.states[:m] == b.states[:m]).all(-1) & (a.arrival[:m] == b.arrival[:m]).all(-1)
    same &= torch.tensor([x == y for x, y in zip(a.block, b.block)], device=same.device)
    k = int(same.long().cumprod(0).sum())  # at least the root
    n, extra, flag = len(a.block), len(b.block) - k, b.by[0]  # extra: b's nodes past the prefix
    probs = None if a.probs is None else torch.cat([a.probs, b.probs[k:]])
    parent = a.parent + ([k - 1, *range(n, n + extra - 1)] if extra else [])
    by = [f | flag if i < k else f for i, f in enumerate(a.by)] + b.by[k:]
    chains = {**a.chains, flag: (b.chains[flag][0], [*range(k), *range(n, n + extra)])}
    return Tree(torch.cat([a.states, b.states[k:]]), torch.cat([a.arrival, b.arrival[k:]]),
                torch.cat([a.picks, b.picks[k:]]), probs, torch.cat([a.drawn, b.drawn[k:]]),
                parent, a.block + b.block[k:], a.done + b.done[k:], by, chains)


def layout(tree, pending, start, opt):
    """One diffusion-target forward: [pending | clean copies | parts] (mask.tree). A clean copy is
    a proposed block, complete, as the chain to the state after it proposed it: that state is
    verified as if the block were stored. A part is one copy of the block per proposed state
    (lossless, exact), or per drafted block its tokens and one mask token per position (simsd:
    mask.verify). Returns ids, positions, the attention mask and the rows that verify."""
    B, P, dev = opt.block, len(pending), pending.device
    offsets = torch.arange(B, device=dev)
    before = torch.arange(start - P, start, device=dev)
    if opt.verify == "simsd":
        proposals = tree.chains[DRAFT][0]
        L = len(proposals)
        tokens = torch.stack([p.tokens for p in proposals])  # (L, B)
        pos = start + B * torch.arange(L, device=dev)[:, None] + offsets  # (L, B)
        parts = torch.stack([tokens, torch.full_like(tokens, opt.mask_id)], 1)  # (L, 2, B)
        ids = torch.cat([pending, tokens[:-1].flatten(), parts.flatten()])
        pos = torch.cat([before, pos[:-1].flatten(), pos.repeat_interleave(2, 0).flatten()])
        attend = masks.tree([masks.verify(p.step) for p in proposals], P, B,
                            torch.ones(L, L, dtype=torch.bool, device=dev).tril(), range(1, L))
        rows = P + (L - 1) * B + (torch.arange(L, device=dev)[:, None] * 2 * B + B + offsets)
        return ids, pos, attend, rows.flatten()
    shape = tree.shape(P, B)
    ids = torch.cat([pending, tree.arrival[shape.cleans].flatten(), tree.states.flatten()])
    return ids, shape.positions + start, shape.attend, slice(P + len(shape.cleans) * B, len(ids))


def causal_layout(proposals, target_pending, n_masks):
    """An AR target's forward: [its pending token | every drafted token, in position order],
    causal. The current block's known tokens are a prefix (commits are prefixes), its drafted ones
    the rest. Returns ids, positions and the mask."""
    B = len(proposals[0].tokens)
    drafted = torch.cat([p.tokens for p in proposals])[B - n_masks:]
    first = proposals[0].start + B - n_masks
    pos = torch.arange(first - len(target_pending), first + len(drafted), device=drafted.device)
    attend = masks.block_causal(len(pos), 1, device=drafted.device)
    return torch.cat([target_pending, drafted]), pos, attend


# ----------------------------------------------------------------------------- 4. accept

def draw(q, generator=None):
    """One draw per row of q (..., V), with uniforms from the generator's own device (Gumbel-max)."""
    source = generator.device if generator is not None else q.device
    u = torch.rand(q.shape, generator=generator, device=source).to(q.device)
    return (q.log() - torch.log(-torch.log(u.clamp(min=1e-20)))).argmax(-1)


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
    u = torch.rand(d.shape, generator=generator, device=source).to(d.device)
    q_d, p_d = q.gather(-1, d[..., None])[..., 0], p.gather(-1, d[..., None])[..., 0]
    ok = u * p_d < q_d  # modified rejection sampling
    residual = (chosen - p).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, chosen)  # p == q: q
    return torch.where(ok, d, draw(residual, generator)), ok


def in_time_order(ok, order):
    """The rows committed when judged in time order (order: each row's rank): every row up to the
    earliest rejected rank, all rows of that rank included."""
    first = torch.where(ok, order.max() + 1, order).min()
    return order <= first


def to_host(**tensors):
    """Tensors as lists (rows of their last dimension), in one copy to the host: a host sync."""
    flat = torch.cat([t.reshape(-1).long() for t in tensors.values()]).tolist()
    out, i = {}, 0
    for name, t in tensors.items():
        values, i = flat[i:i + t.numel()], i + t.numel()
        width = t.shape[-1] if t.dim() > 1 else len(values)
        out[name] = [values[r:r + width] for r in range(0, len(values), width or 1)]
    return out


def accept_lossless(tree, q, generator, n_pending, opt):
    """Lossless: from every proposed state the target's own step: its picks at the masked positions
    (argmax, or rejection sampling against the proposer's picks there, a plain draw where it has
    none) and SDAR's rule on them. The chain enters a state when the target's step from its
    parent reaches it (its arrival); from the deepest state entered, the target's step is
    committed too. q (N, B, V): the target at every state."""
    B, dev = opt.block, q.device
    if opt.sampling.greedy:
        y = opt.sampling.pick(q)
    else:  # rejection sampling where a proposer drew, a plain draw where none did
        y = draw(q, generator)
        if tree.probs is not None:
            judged, _ = judge(tree.picks, tree.probs, q, opt.sampling, generator)
            y = torch.where(tree.drawn[:, None], judged, y)
    quota = torch.tensor([decode.quota(d, B, opt.steps) for d in tree.done], device=dev)
    revealed = decode.reveal(q, y, tree.states == opt.mask_id, quota[:, None], opt.strategy,
                             opt.threshold)
    after = torch.where(revealed, y, tree.states)  # (N, B): the state after the target's step
    shape = tree.shape(n_pending, B)
    enters = (after[shape.parent] == tree.arrival).all(-1)
    enters[0] = True  # the root: the current state
    reached = ~(shape.ancestors & ~enters).any(-1)  # every state on its path entered
    f = reached.cumsum(0).argmax()  # the deepest: reached states form one path
    chains = {flag: torch.stack([torch.cat([p.tokens, p.step]) for p in props])
              for flag, (props, _) in tree.chains.items()}
    seen = to_host(f=f, after=after[f], revealed=revealed[f], cleans=tree.arrival[shape.cleans],
                   **{str(flag): c for flag, c in chains.items()})
    return lossless_verdict(tree, shape.cleans, seen, q[f], opt)


def lossless_verdict(tree, cleans, seen, hint, opt):
    """The Verdict of accept_lossless from what it read back: the blocks committed on the path to
    the deepest state entered, f, and the fates of a chain through f (one whose step from f the
    target took, else the draft's)."""
    B, f = opt.block, seen["f"][0][0]
    path = [f]
    while tree.parent[path[0]] >= 0:
        path.insert(0, tree.parent[path[0]])
    jf, after, revealed = tree.block[f], seen["after"][0], seen["revealed"][0]
    tokens = [row for n, row in zip(cleans, seen["cleans"]) if n in path] + [after]
    known = [[True] * B] * jf + [[t != opt.mask_id for t in after]]
    shown = [(*fates(seen[str(flag)], props, idx.index(f), jf, after, revealed, opt), flag)
             for flag, (props, idx) in tree.chains.items() if f in idx]
    shown.sort(key=lambda c: (not c[-2], c[-1] != DRAFT))
    proposed, steps, fate, same, flag = shown[0] if shown else ([], [], [], False, None)
    rows = max(jf + 1, len(proposed))
    proposed += [[opt.mask_id] * B] * (rows - len(proposed))
    steps += [[0] * B] * (rows - len(steps))
    fate += [[0] * B] * (rows - len(fate))
    fate[jf] = [2 if r and not same else x for r, x in zip(revealed, fate[jf])]
    tokens += [[opt.mask_id] * B] * (rows - jf - 1)
    known += [[False] * B] * (rows - jf - 1)
    taken = [sum(tree.block[n] == j for n in path) for j in range(rows)]
    done = [0] * rows
    done[jf] = tree.done[f] + 1
    slots = [c for c, n in enumerate(cleans) if n in path]
    firsts = [n for n in path[1:] if tree.block[n] > tree.block[tree.parent[n]]]
    kept = 0
    if DRAFT in tree.chains:  # the draft stored its drafted blocks but the last, tentatively
        while kept < min(jf, len(tree.chains[DRAFT][0]) - 1) and tree.by[firsts[kept]] & DRAFT:
            kept += 1
    by_draft = sum(tree.by[n] & DRAFT > 0 for n in path[1:]) + (same and flag == DRAFT)
    matched = (len(path) - 1 + same, by_draft)
    return Verdict(tokens, known, fate, proposed, steps, taken, done, slots, kept, matched,
                   None if all(known[jf]) else hint, {DRAFT: "draft", SELF: "self"}.get(flag))


def fates(rows, proposals, k, jf, after, revealed, opt):
    """A chain's proposed tokens, step maps and fates (rows of B), and whether the target's step
    from its node k (the deepest entered, in block jf) is the chain's own step from it. rows:
    (tokens | step map) per proposed block, as read back."""
    B, firsts = opt.block, [0]
    for p in proposals:
        firsts.append(firsts[-1] + p.steps)  # each block's first node in the chain
    proposed, steps = [row[:B] for row in rows], [row[B:] for row in rows]
    same = False
    if jf < len(proposals):  # k is a proposed state, not the chain's tail
        own = [i for i in range(B) if steps[jf][i] == k - firsts[jf] + 1]
        same = own == [i for i in range(B) if revealed[i]] and all(
            proposed[jf][i] == after[i] for i in own)
    fate = [[0 if t == 0 else 1 if first + t - 1 < k + same else 3 for t in row]
            for first, row in zip(firsts, steps)]
    return proposed, steps, fate, same


def accept_paper(tree, q, generator, opt):
    """The paper's acceptance (exact, simsd): each drafted token judged against the target at the
    row that verifies it (simsd: its mask token; exact: its position in the copy before its
    step), in time order: draft steps (accept="step"), or positions ("position"). Every row up to
    the first rejected rank is committed, a rejected one with the target's token."""
    B, proposals = opt.block, tree.chains[DRAFT][0]
    L = len(proposals)
    d = torch.stack([p.tokens for p in proposals])  # (L, B)
    t = torch.stack([p.step for p in proposals])
    if opt.verify == "exact":  # q holds one copy per state: each position's own step
        offsets = [sum(p.steps for p in proposals[:j]) for j in range(L)]
        q = torch.stack([p.at_own_step(q[off:off + p.steps]) for p, off in zip(proposals, offsets)])
    p = None if opt.sampling.greedy else torch.stack([p.at_own_step(p.probs) for p in proposals])
    y, ok = judge(d, p, q, opt.sampling, generator, opt.stop_ids, opt.eos_min_prob)
    drafted = t > 0
    block_rank = torch.arange(L, device=d.device)[:, None]
    if opt.accept == "step":
        order = block_rank * (B + 1) + t
    else:
        order = block_rank * B + torch.arange(B, device=d.device)
    committed = drafted & in_time_order(ok | ~drafted, order)
    return paper_verdict(proposals, committed, y, ok, opt)


def accept_causal(proposals, q, generator, n_masks, opt):
    """SpecDiff: the drafted tokens judged in position order against the target's next-token
    distributions q (M + 1, V). Rows up to the first rejection are committed, that one with the
    target's token, or the row after the last drafted token (the bonus) when none is rejected."""
    B, L = opt.block, len(proposals)
    skip = B - n_masks  # the current block's known prefix
    d = torch.cat([p.tokens for p in proposals])[skip:]
    p = None
    if not opt.sampling.greedy:
        p = torch.cat([prop.at_own_step(prop.probs) for prop in proposals])[skip:]
        p = torch.cat([p, torch.zeros_like(p[:1])])
    rows = torch.arange(len(d) + 1, device=d.device)
    y, ok = judge(torch.cat([d, d[:1]]), p, q, opt.sampling, generator)  # + the bonus row
    ok = ok & (rows < len(d))  # the bonus row drafts nothing: never accepted
    committed = in_time_order(ok, rows)

    def grid(x):  # rows from block 1's first drafted position -> (L + 1, B)
        before = torch.zeros(skip, dtype=x.dtype, device=x.device)
        after = torch.zeros(B - 1, dtype=x.dtype, device=x.device)
        return torch.cat([before, x, after]).view(L + 1, B)

    return paper_verdict(proposals, grid(committed), grid(y), grid(ok), opt)


def paper_verdict(proposals, committed, tokens, as_drafted, opt):
    """The Verdict of the paper's and the causal acceptance: positions committed (L or L + 1 rows
    of B) take `tokens`; as_drafted marks those committed as drafted. A missing last row is the
    fresh block after the proposals. One readback."""
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
    seen = to_host(tokens=torch.where(committed, tokens, before), known=known | committed,
                   fate=fate, proposed=rows(torch.stack([p.tokens for p in proposals]), 0),
                   steps=rows(torch.stack([p.step for p in proposals]), 0))
    taken = [steps_taken(f, s) for f, s in zip(seen["fate"], seen["steps"])]
    kept = 0
    while kept < L - 1 and all(f in (0, 1) for f in seen["fate"][kept]):
        kept += 1
    matched = sum(all(f == 1 for f, t in zip(fate, steps) if t == s)
                  for fate, steps in zip(seen["fate"], seen["steps"]) for s in set(steps) - {0})
    done = [p.done + n for p, n in zip(proposals, taken)] + [0]
    return Verdict(seen["tokens"], seen["known"], seen["fate"], seen["proposed"], seen["steps"],
                   taken, done, list(range(kept)), kept, (matched, matched), None, "draft")


def steps_taken(fate, steps):
    """The target steps a block took in this iteration: every draft step whose positions were all
    committed."""
    dropped = [s for f, s in zip(fate, steps) if f == 3]
    return min(dropped) - 1 if dropped else max(steps, default=0)
