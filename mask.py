"""Attention masks for every layout, as pure functions.

A mask is a (T, T) torch.bool tensor, row = query, column = key, True = may attend. It governs the
T new tokens of a forward among themselves: every token also sees everything committed in the KV
cache (model.KVCache). Positions are passed to the model separately, so two tokens may share one.

Layouts, for a block of B positions:
  prefill        prompt tokens; block k sees blocks <= k                     block_causal
  training       [x_t ; x_0], both halves at the same positions              training
  SimSD verify   [the block, drafted positions as references | B masks]      verify
  a stored block [pending | the tokens after it]                             with_pending
  exact verify   one copy of the block per proposed state, each blind to the others   copies
  one forward    [pending | clean copies of proposed blocks | one part per state]     tree
A step map `step` is a LongTensor (B,): 0 for a known position, s >= 1 for a position the draft
revealed at its step s. Ties are allowed (a step may reveal several positions).
Run `python mask.py` to see the layouts drawn.
"""
import argparse
import os
import sys

import torch


def block_causal(n, block, start=0, device=None):
    """(n, n) mask for positions start..start+n-1: a token sees every token whose block
    (position // block) is <= its own. With block 1 it is causal."""
    b = torch.arange(start, start + n, device=device) // block
    return b[None, :] <= b[:, None]


def training(n, block, device=None):
    """(2n, 2n) SDAR training mask for [x_t ; x_0] (noisy half, then clean half, both at positions
    0..n-1): x_t block b denoises from x_t block b plus the clean past x_0 blocks < b; x_0 is
    block-causal; x_0 never sees x_t."""
    b = torch.arange(n, device=device) // block
    q, k = b[:, None], b[None, :]
    noisy_rows = torch.cat([q == k, k < q], dim=1)  # (n, 2n)
    blind = torch.zeros(n, n, dtype=torch.bool, device=device)
    clean_rows = torch.cat([blind, k <= q], dim=1)  # (n, 2n)
    return torch.cat([noisy_rows, clean_rows], dim=0)


def verify(step):
    """(2B, 2B) SimSD verification mask for [block | B mask tokens], both halves in position order
    (step maps (..., B): masks (..., 2B, 2B)).

    The first half holds each known token and each drafted position's reference token (the draft's
    token); the second half one mask token per position, which inherits its position's step.
    With t = step (0 = known):
      reference i sees reference j iff t_j <= t_i, and mask j iff t_j > t_i;
      mask i      sees reference j iff t_j <  t_i, and mask j iff t_j >= t_i;
    so mask token i sees the block exactly as the draft saw it just before step t_i, and every
    drafted row sees one version (token or mask) of each position. A known token is a reference
    of step 0: it sees the known tokens only, and every drafted row sees it. The mask tokens at
    known positions are seen by nobody; their rows are unused.
    """
    ti, tj = step[..., :, None], step[..., None, :]  # query step, key step (step may be batched)
    reference_rows = torch.cat([tj <= ti, (tj > ti) & (ti > 0)], dim=-1)  # (..., B, 2B)
    mask_rows = torch.cat([tj < ti, tj >= ti], dim=-1)  # (..., B, 2B)
    return torch.cat([reference_rows, mask_rows], dim=-2)


def copies(n, block, device=None):
    """(n*B, n*B) exact verification mask: n copies of a block, each bidirectional within itself
    (as the block is when the model denoises it) and blind to the others."""
    copy = torch.arange(n * block, device=device) // block
    return copy[:, None] == copy[None, :]


def with_pending(n, mask, block):
    """The mask of [pending | tokens]: n pending tokens (whole blocks just before, completed and
    not yet cached: storing them is folded into this forward) are block-causal and seen by every
    token after them; the tokens see each other by `mask` and are seen by no pending token."""
    T = len(mask)
    out = torch.zeros(n + T, n + T, dtype=torch.bool, device=mask.device)
    out[:n, :n] = block_causal(n, block, device=mask.device)
    out[n:, :n] = True
    out[n:, n:] = mask
    return out


def tree(parts, n_pending, block, ancestors, cleans):
    """The mask of one target forward over [pending | clean copies | parts], one part per node of
    a tree of proposals (a node before its children).

    parts: each node's own (n, n) mask: a proposed state is copies(1, B), the paper's layout of a
    block is verify(step). ancestors (N, N) bool: node n is node m or descends from it.
    cleans: the nodes (ascending) that start a block after their parent's; each has a clean copy
    of the block before it (B tokens, complete, as proposed on its path), in this order.
    pending (with_pending) is seen by everything. A clean copy sees itself and the clean copies of
    its node's ancestors, as storing those blocks would see them; a part sees the clean copies of
    its node and of its ancestors, and itself by its own mask. A chain of L blocks (ancestors
    lower-triangular, cleans 1..L-1) is lookahead: block j is verified as if the blocks before it
    were stored as proposed.
    """
    dev = ancestors.device
    cleans = torch.as_tensor(cleans, dtype=torch.long, device=dev)
    sees = ancestors[:, cleans]  # (N, C): node n sees clean copy c
    sizes = torch.tensor([len(p) for p in parts], device=dev)
    part_of = torch.arange(len(parts), device=dev).repeat_interleave(sizes)
    C = len(cleans) * block
    out = torch.zeros(C + len(part_of), C + len(part_of), dtype=torch.bool, device=dev)
    out[:C, :C] = sees[cleans].repeat_interleave(block, 0).repeat_interleave(block, 1)
    out[C:, :C] = sees[part_of].repeat_interleave(block, 1)
    out[C:, C:] = torch.block_diag(*parts)
    return with_pending(n_pending, out, block)


def render(mask, labels):
    """ASCII picture of a mask: one row per query, '#' = attends, '.' = not. Labels head the rows
    and (written vertically) the columns; runs of labels with one first character are grouped."""
    cuts = {i for i in range(1, len(labels)) if labels[i][0] != labels[i - 1][0]}
    width = max(map(len, labels))

    def line(head, cells, bar="|"):  # one text row of the grid
        out = head.rjust(width)
        for j, cell in enumerate(cells):
            out += (f" {bar} " if j in cuts else " ") + cell
        return out

    out = ["# = row (query) attends to column (key), . = does not"]
    out += [line("", [label.ljust(width)[r] for label in labels]) for r in range(width)]
    for i, row in enumerate(mask.tolist()):
        if i in cuts:
            out.append(line("", "-" * len(labels), bar="+").replace(" ", "-"))
        out.append(line(labels[i], ["#" if a else "." for a in row]))
    return "\n".join(out)


def examples():
    """The three layouts drawn for a reader, as (title, picture)."""
    step = torch.tensor([0, 2, 1, 3])  # position 0 known; 1, 2, 3 revealed at draft steps 2, 1, 3
    shown = [0, 1, 2, 3, 5, 6, 7]  # the mask token of the known position is unused: left out
    labels = ["k0"] + [f"{kind}{i}@{s}" for kind in "rm" for i, s in enumerate(step.tolist()) if s]
    simsd = render(verify(step)[shown][:, shown], labels)
    def label(s, i, t):  # in the copy before step s, position i revealed at step t (0: known)
        kind = "k" if t == 0 else "r" if t < s else "m"
        return f"{s}{kind}{i}"
    labels = [label(s, i, t) for s in (1, 2, 3) for i, t in enumerate(step.tolist())]
    exact = render(copies(3, 4), labels)
    parent = [-1, 0, 0, 1]  # the current state; the draft's next state, the target's; next block
    ancestors = torch.tensor([[m == n or m == parent[n] or m == 0 for m in range(4)]
                              for n in range(4)])
    labels = ["c0", "c1"] + [f"{name}{i}" for name in "rdsb" for i in (0, 1)]
    trie = render(tree([copies(1, 2)] * 4, 0, 2, ancestors, [3]), labels)
    return [
        ("SimSD verification, block 4: position 0 known, 1, 2, 3 drafted at steps 2, 1, 3.\n"
         "rN@t / mN@t = reference / mask token of position N; mask row mN@t sees the block as\n"
         "the draft saw it just before step t.", simsd),
        ("Exact (and lossless) verification: one copy per proposed state; label s + r/m/k + i:\n"
         "in the copy before step s, position i is revealed / masked / known.", exact),
        ("A trie of proposals, block 2: r = the current state; d and s = the states the draft and\n"
         "the target itself propose after it (each a copy, blind to the others); c = the block as\n"
         "the draft completes it after d, a clean copy, seen as storing it would; b = the next\n"
         "block, all masked, after c.", trie)]


def main(argv=None):
    argparse.ArgumentParser(description="Draw the attention masks of SimSD's verification layouts "
                            "('#' = attends).").parse_args(argv)
    for title, picture in examples():
        print(f"{title}\n\n{picture}\n")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
