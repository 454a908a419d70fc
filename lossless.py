"""Lossless verification: the target's own decoding, whatever was proposed, and the proposers only
it can use: the target's own chain, and a trie that holds two chains.

A target decodes a block as a chain of states x0 -> x1 -> ...: at each it forwards, picks a token
at every masked position, and SDAR's rule reveals some. A proposer proposes such a chain. One
target forward computes the target's distributions at every proposed state (one copy of the block
per state, mask.copies), and from each the target takes its own step: its picks (argmax, or
rejection sampling against the proposer's draw there, so that each pick is a draw from the
target) and SDAR's rule on them. The chain is followed while the target's step from a state
reaches the next proposed one, and the target's step from the deepest state reached is committed
too. So a forward commits at least one of the target's steps, and the output is the target's own:
greedy, token for token; sampled, in distribution.

Proposers: the draft (a forward per step, or one per block), and the target itself: its
distributions at the state its last step was taken from, replayed by SDAR's rule (no forward at
all). Two chains share their prefix of identical states in a trie (one copy per distinct state).
After a proposed block ends, a clean copy of it and the next block's all-masked state give that
block's first step in the same forward (lookahead).
"""
import torch

from head import Bound
from sdar import denoise, draw, quota, reveal
from simsd import judge
from verifier import (ACCEPTED, DRAFT, DROPPED, KNOWN, SELF, TARGET, Chain, Tree, Verdict,
                      chain_nodes, chain_tree, gather_rows, lay_out_tree)


def self_chain(run):
    """The target's own chain for the rest of every row's block: SDAR's rule applied step after
    step to its distributions at the state its last step was taken from (hint; rows without one
    propose nothing), fresh picks at every state when sampling. No forward."""
    rows, dev = run.rows, run.rows.x.device
    d = denoise(run.target, rows.x, rows.start, rows.done, run.settings, known=rows.known,
                generator=run.generator, drafting="block",
                probs=rows.hint.to(run.generator.device if run.generator else dev))
    return hinted_chain(d, rows)


def head_chain(run):
    """A head's chain for the rest of every row's block (head.py): SDAR's rule on the head's
    distributions, a head pass per step, from the target's final hidden states at the state its
    last step was taken from (rows without them propose nothing). No target or draft forward."""
    rows = run.rows
    d = denoise(Bound(run.draft, rows.hidden), rows.x, rows.start, rows.done, run.settings,
                known=rows.known, generator=run.generator, drafting="step")
    return hinted_chain(d, rows)


def hinted_chain(d, rows):
    """The Chain of one block denoised from what the target's last forward computed (its
    distributions or hidden states, where has_hint), and past it the next block's all-masked
    state (tail), which the target decides alone."""
    dev = rows.x.device
    states = d.states.transpose(0, 1)[:, None].to(dev)  # (R, 1, S, B)
    real = d.masked.transpose(0, 1)[:, None].to(dev).any(-1) & (rows.has_hint & ~rows.dead)[
        :, None, None]
    probs = None if d.probs is None else d.probs.transpose(0, 1)[:, None].to(dev)
    return Chain(d.tokens[:, None].to(dev), d.step[:, None].to(dev), states,
                 d.picks.transpose(0, 1)[:, None].to(dev), probs, real,
                 rows.has_hint & ~rows.dead & (rows.reach > 1))


class Lossless:
    """The target's own step from every proposed state (the module's docstring)."""

    tails = True  # a chain's last block reached through its all-masked state, undrafted

    def __init__(self, s):
        self.s = s

    def drafted(self, reach):
        """The last block a forward reaches is reached by its all-masked state: not drafted."""
        return reach - (reach > 1) * 1

    def trie(self, run, chains):
        """The trie (unpacked) of the chains: node 0 the current state, then the target's own
        chain's states, then the draft's; the draft's states that repeat the target's prefix are
        left out, and the first after it hangs from the target's."""
        rows = run.rows
        if len(chains) == 1:  # one chain: its nodes, each hanging from its predecessor
            (flag, chain), = chains.items()
            return chain_tree(chain, flag, rows.done, self.s.mask_id)
        parts = {flag: chain_nodes(chain, flag, rows.done, self.s.mask_id)
                 for flag, chain in chains.items()}
        root = parts[DRAFT if DRAFT in parts else SELF].cut(0, 1)  # the current state
        if SELF in parts and DRAFT in parts:  # the target's own draws where it has a hint
            own, hinted = parts[SELF].cut(0, 1), rows.has_hint[:, None]
            drawn, by = root.column("drawn").clone(), root.by | torch.where(hinted, SELF, 0)
            root.table = torch.where(hinted[..., None], own.table, root.table)
            if root.probs is not None:
                root.probs = torch.where(hinted[..., None, None], own.probs, root.probs)
            root.column("drawn")[:], root.column("by")[:] = drawn, by
        root.column("drawn")[:] &= rows.has_hint[:, None] | (DRAFT in parts)
        root.column("parent")[:], root.column("alive")[:] = 0, 1
        nodes, offset = [root], 1
        for flag in (SELF, DRAFT):
            if flag not in parts:
                continue
            part = parts[flag].cut(1)  # without the current state
            parent = part.parent
            parent[:] = torch.where(parent > 0, parent - 1 + offset, 0)
            if flag == DRAFT and SELF in parts:
                merge(nodes[1], part, offset)
            nodes.append(part)
            offset += part.table.shape[1]
        return Tree.cat(nodes)

    def tree(self, run, chains):
        return self.trie(run, chains)

    def layout(self, run, chains):
        """[pending | clean copies | one copy of the block per state] (mask.tree)."""
        return lay_out_tree(run.trie, run.keys, run.rows)

    def accept(self, run, laid, q):
        """From every state the target's step: picks at the masked positions (argmax, or
        rejection sampling against the proposer's picks, a plain draw where it has none) and
        SDAR's rule on them. The chain enters a state when the target's step from its parent
        reaches it (its arrival); the deepest state entered, f, and the target's step from it are
        committed. q (R, N B, V): the target at every state."""
        s, tree = self.s, laid.nodes
        (R, N, B), dev = tree.states.shape, tree.states.device
        q = q.view(R, N, B, -1)
        if s.sampling.greedy:
            y = q.argmax(-1)
        else:  # rejection sampling where a proposer drew, a plain draw where none did
            y = draw(q, run.generator)
            if tree.probs is not None:
                judged, _ = judge(tree.picks, tree.probs, q, s.sampling, run.generator)
                y = torch.where(tree.drawn[..., None], judged, y)
        k = quota(tree.done, B, s.steps)[..., None]
        revealed = reveal(q, y, tree.states == s.mask_id, k, s.strategy, s.threshold)
        after = torch.where(revealed, y, tree.states)  # (R, N, B): after the target's step
        enters = tree.alive & (gather_rows(after, tree.parent) == tree.arrival).all(-1)
        enters[:, 0] = True  # the current state
        anc = laid.shape.ancestors  # (R, N, N)
        reached = ~(anc & ~enters[:, None, :]).any(-1)  # every state on its path entered
        f = (reached.long() * torch.arange(N, device=dev)).argmax(1)  # the deepest: one path
        return self.commits(run, laid, q, after, revealed, anc[torch.arange(R, device=dev), f], f)

    def commits(self, run, laid, q, after, revealed, path, f):
        """The Verdict: the blocks passed on the path to f (their clean copies' keys kept) and
        the state after the target's step from f."""
        s, tree, rows = self.s, laid.nodes, run.rows
        (R, _, B), dev = tree.states.shape, tree.states.device
        J, at = s.lookahead + 1, torch.arange(R, device=dev)
        jf, after_f = tree.block[at, f], after[at, f]
        complete = (after_f != s.mask_id).all(-1)
        clean = laid.shape.clean & path
        blocks = torch.arange(1, J + 1, device=dev)  # block j was passed into block j + 1
        passed = clean[:, None, :] & (tree.block[:, None, :] == blocks[None, :, None])  # (R, J, N)
        c = passed.long().argmax(2)  # (R, J): the clean node that starts block j + 1
        j = torch.arange(J, device=dev)
        passed_j, at_f = (j < jf[:, None])[..., None], (j == jf[:, None])[..., None]
        tokens = torch.where(passed_j, gather_rows(tree.arrival, c),
                             torch.where(at_f, after_f[:, None], s.mask_id))  # (R, J, B)
        n_pending, P = rows.pending.n, rows.pending.tokens.shape[1]
        e = torch.arange(P + J * B, device=dev)
        copies = gather_rows(laid.shape.copy, c)[..., None] + torch.arange(B, device=dev)
        copies = copies.flatten(1)  # (R, J B): the clean copies' tokens in the forward
        keep = torch.where(e < n_pending[:, None], e,
                           gather_rows(copies, (e - n_pending[:, None]).clamp(0, J * B - 1)))
        by_draft = (tree.by & DRAFT) > 0
        stored = torch.zeros_like(jf) if DRAFT not in run.chains else (
            run.chains[DRAFT].real.any(-1).sum(1) - 1)  # blocks the draft stored, tentatively
        kept = ((j < jf[:, None]) & (j < stored[:, None]) & gather_rows(by_draft, c))
        kept = kept.long().cumprod(1).sum(1)
        same = tree.drawn[at, f] & (after_f == tree.nxt[at, f]).all(-1)
        reveals = ((tree.states != tree.nxt) & tree.drawn[..., None]).sum(-1)  # (R, N)
        steps = path.sum(1)
        stats = dict(steps=steps, matched=steps - 1 + same,
                     by_draft=(path[:, 1:] & by_draft[:, 1:]).sum(1) + (same & by_draft[at, f]),
                     proposed=(reveals * path).sum(1),
                     accepted=(reveals * path).sum(1) - reveals[at, f] * ~same)
        trace = {} if not run.tracing else self.trace(run, tree, tokens, path, f,
                                                      revealed[at, f] & ~same[:, None])
        hint, has_hint = self.hint(laid, jf, after_f, complete, f)
        hidden = run.hidden.view(R, -1, B, run.hidden.shape[-1])[at, hint]  # (R, B, d)
        return Verdict(tokens, tokens != s.mask_id, torch.where(complete, 0, tree.done[at, f] + 1),
                       keep, n_pending + jf * B, after_f, B * complete.long(), kept, q[at, hint],
                       has_hint, stats, trace, hidden)

    @staticmethod
    def hint(laid, jf, after_f, complete, f):
        """The node whose distributions and hidden states the proposers start from (R,), and
        whether there is one: f, when its block goes on; when the target's step from f completed
        the block, the next block's all-masked state, where the forward laid one out (after
        exactly the committed block if any: the target's own state; else after another proposal
        of it, a guess that only proposes)."""
        tree = laid.nodes
        starts = tree.alive & laid.shape.clean & (tree.block == jf[:, None] + 1)  # (R, N)
        exact = starts & (tree.arrival == after_f[:, None]).all(-1)
        nxt = torch.where(exact.any(1), exact.long().argmax(1), starts.long().argmax(1))
        return torch.where(complete, nxt, f), ~complete | starts.any(1)


    def trace(self, run, tree, tokens, path, f, own):
        """What --show reads: the chain shown (the draft's if it proposed f, else the target's
        own), its proposed tokens and step maps, and per position its fate: known before;
        committed as proposed; committed with the target's own token (own: revealed by the
        target's step from f where it differed from the proposal); proposed and not committed."""
        s, rows = self.s, run.rows
        (R, J, B), dev = tokens.shape, tokens.device
        at = torch.arange(R, device=dev)
        shown = {flag: pad_blocks(chain, J) for flag, chain in run.chains.items()}
        by_draft = (tree.by[at, f] & DRAFT > 0) if DRAFT in shown else torch.zeros_like(f).bool()
        if len(shown) == 2:
            proposed, steps = (torch.where(by_draft[:, None, None], shown[DRAFT][i], shown[SELF][i])
                               for i in (0, 1))
        else:
            proposed, steps = next(iter(shown.values()))
        known = torch.zeros(R, J, B, dtype=torch.bool, device=dev)
        known[:, 0] = rows.x != s.mask_id
        committed = (tokens != s.mask_id) & ~known
        target = torch.zeros_like(known)
        target[at, tree.block[at, f]] = own
        fate = torch.where(committed, torch.where(target, TARGET, ACCEPTED),
                           torch.where((steps > 0) & ~known, DROPPED, KNOWN))
        taken = (path[:, None, :] & (tree.block[:, None, :] == torch.arange(J, device=dev)[
            None, :, None])).sum(2)
        return dict(fate=fate, proposed=proposed, steps=steps, taken=taken,
                    stored=tree.block[at, f], by=by_draft)


def pad_blocks(chain, J):
    """A chain's tokens and step maps (R, D, B), as J blocks (the rest: nothing proposed)."""
    R, D, B = chain.tokens.shape
    extra = torch.zeros(R, J - D, B, dtype=torch.long, device=chain.tokens.device)
    reached = chain.real.any(-1)[..., None]  # blocks the row reaches
    return (torch.cat([chain.tokens, extra], 1), torch.cat([chain.step * reached, extra], 1))


def merge(a, b, offset):
    """The draft's nodes b (after the target's own a, whose first is node 1): those that repeat
    a's prefix of identical states (the same state, arrival and block, or neither a state) are
    left out, and a node whose chain predecessor was left out hangs from a's copy of it (offset:
    b's first node's index). a's shared nodes become the draft's too."""
    n, B = a.table.shape[1], a.B
    same = (a.table[..., :2 * B] == b.table[:, :n, :2 * B]).all(-1) & (a.block == b.block[:, :n])
    equal = torch.where(a.alive, b.alive[:, :n] & same, ~b.alive[:, :n])
    k = equal.long().cumprod(1).sum(1, keepdim=True)  # (R, 1): the shared prefix, in nodes
    pred = b.parent - offset  # b's chain predecessor, as a place among b's nodes (< 0: node 0)
    b.parent[:] = torch.where((pred >= 0) & (pred < k), pred + 1, b.parent)  # a's copy of it
    b.column("alive")[:] &= torch.arange(b.table.shape[1], device=k.device) >= k
    a.column("by")[:] |= torch.where(torch.arange(n, device=k.device) < k, DRAFT, 0)
