"""Attention masks and position ids for every layout, as pure functions.

A mask is a (T, T) torch.bool tensor, row = query, column = key, True = may
attend. It only governs the T new tokens of a forward among themselves: every
token also sees everything committed in the KV cache (model.KVCache).

Layouts (n known tokens of the current block, m drafted positions in it; the known
and drafted positions may interleave in any pattern, since positions are separate):
  prefill       prompt tokens; block k sees blocks <= k              block_causal
  training      [x_t ; x_0], both halves at positions 0..n-1         training
  verify        [known (n) | reference d_1..d_m (m) | mask (m)]      verify
  verify exact  [known | state_s] once per distinct draft step s     verify_exact
  folded store  [just-completed block | any layout above]            with_store
The step map `step` is a LongTensor (m,): step[i] = the draft step (>= 1) that
revealed drafted position i. Ties are allowed (dynamic decoding reveals several
positions per step). Run `python mask.py` to see the verification mask drawn.
"""
import torch


def block_causal(n, block, start=0, device=None):
    """(n, n) prefill mask for positions start..start+n-1: a token sees every
    token whose block (pos // block) is <= its own."""
    b = torch.arange(start, start + n, device=device) // block
    return b[None, :] <= b[:, None]


def training(n, block, device=None):
    """(2n, 2n) SDAR training mask for [x_t ; x_0] (noisy half, then clean half,
    both at positions 0..n-1): x_t block b denoises from x_t block b plus the
    clean past x_0 blocks < b; x_0 is block-causal; x_0 never sees x_t."""
    b = torch.arange(n, device=device) // block
    q, k = b[:, None], b[None, :]
    top = torch.cat([q == k, k < q], dim=1)                # x_t rows: (n, 2n)
    blind = torch.zeros(n, n, dtype=torch.bool, device=device)
    bottom = torch.cat([blind, k <= q], dim=1)             # x_0 rows: (n, 2n)
    return torch.cat([top, bottom], dim=0)


def verify(step, n_known):
    """(n+2m, n+2m) SimSD verification mask for [known | reference | mask].

    A mask token inherits the step of its position; with t = step:
      reference i sees reference j iff t_j <= t_i, and mask j iff t_j > t_i;
      mask i      sees reference j iff t_j <  t_i, and mask j iff t_j >= t_i;
    so mask token i sees the block as the draft saw it just before step t_i,
    and every drafted row sees exactly one version (token or mask) of each
    position. Known tokens see each other only; every drafted row sees them.
    Nothing here depends on where the known and drafted tokens sit in the block
    (their positions go to verify_positions), so known tokens may be anywhere.
    """
    n, m = n_known, step.shape[0]
    ti, tj = step[:, None], step[None, :]                  # query step, key step
    ref_rows = torch.cat([tj <= ti, tj > ti], dim=1)       # (m, 2m)
    mask_rows = torch.cat([tj < ti, tj >= ti], dim=1)      # (m, 2m)
    out = torch.zeros(n + 2 * m, n + 2 * m, dtype=torch.bool, device=step.device)
    out[:, :n] = True                                      # everyone sees known
    out[n:, n:] = torch.cat([ref_rows, mask_rows], dim=0)  # known rows stop at n
    return out


def verify_exact(step, n_known):
    """Exact mode: one copy of [known (n) | block state s (m)] per distinct step
    s, ascending, each bidirectional within itself and blind to the others.

    The caller fills copy s with the known tokens, then reference token j where
    t_j < s and a mask token elsewhere: the block just before step s. Returns
    (mask, rows): mask is (S*(n+m), S*(n+m)); rows (m,) is the row whose logits
    verify drafted position i, namely position i inside the copy of step t_i.
    """
    steps = torch.unique(step)                             # sorted distinct steps (S,)
    size = n_known + step.shape[0]                         # one copy: n + m
    copy = torch.arange(steps.shape[0] * size, device=step.device) // size
    rows = torch.searchsorted(steps, step) * size + n_known
    rows = rows + torch.arange(step.shape[0], device=step.device)
    return copy[:, None] == copy[None, :], rows


def with_store(mask, n_store):
    """Prepend a just-completed block of n_store tokens stored in this forward:
    it sees only itself (a complete block is bidirectional) and everything
    after sees it. Returns (n_store+T, n_store+T)."""
    size = n_store + mask.shape[0]
    out = torch.zeros(size, size, dtype=torch.bool, device=mask.device)
    out[:, :n_store] = True                                # everyone sees the store
    out[n_store:, n_store:] = mask                         # store rows stop at n_store
    return out


def verify_positions(known_pos, drafted_pos):
    """(n+2m,) positions for verify: known tokens at their own positions, then
    reference i and mask i both at drafted position i's (the RoPE copy: two
    versions of one position)."""
    return torch.cat([known_pos, drafted_pos, drafted_pos])


def verify_exact_positions(step, known_pos, drafted_pos):
    """(S*(n+m),) positions for verify_exact: [known | drafted] once per distinct step."""
    return torch.cat([known_pos, drafted_pos]).repeat(torch.unique(step).shape[0])


def render(mask, labels=None):
    """ASCII picture of a mask: one row per query, '#' = attends, '.' = not.
    Labels head the rows and (written vertically) the columns; a '|' column and
    '-' row separate groups, runs of labels with the same first character."""
    labels = labels or [str(i) for i in range(mask.shape[0])]
    cuts = {i for i in range(1, len(labels)) if labels[i][0] != labels[i - 1][0]}
    w = max(map(len, labels), default=1)

    def line(head, cells, bar="|"):                        # one text row of the grid
        return head.rjust(w) + "".join((f" {bar} " if j in cuts else " ") + c
                                       for j, c in enumerate(cells))

    out = ["# = row (query) attends to column (key), . = does not"]
    out += [line("", [s.ljust(w)[r] for s in labels]) for r in range(w)]
    for i, row in enumerate(mask.tolist()):
        if i in cuts:
            out.append(line("", "-" * len(labels), bar="+").replace(" ", "-"))
        out.append(line(labels[i], ["#" if a else "." for a in row]))
    return "\n".join(out)


if __name__ == "__main__":
    step, n = torch.tensor([2, 1, 3]), 1
    t = step.tolist()
    labels = [f"k{i}" for i in range(n)] + [f"{kind}{n + i}@{s}" for kind in "rm" for i, s in enumerate(t)]
    print("SimSD verification, block 4: 1 known token, 3 drafted, step map [2, 1, 3]")
    print("rN@t / mN@t = reference / mask token of position N, revealed at draft step t;")
    print("mask row mN@t sees the block as the draft saw it just before step t.\n")
    print(render(verify(step, n), labels))
    exact, rows = verify_exact(step, n)
    steps = torch.unique(step).tolist()
    labels = [f"{s}{'k' if i < n else 'r' if t[i - n] < s else 'm'}{i}"   # copy s, token, position
              for s in steps for i in range(n + len(t))]
    print("\nExact mode: one copy per draft step s (label s + token), each the block just before s.\n")
    print(render(exact, labels))
    print("\nrows whose logits verify positions 1, 2, 3 (position i in the copy of step t_i): "
          + ", ".join(labels[r] for r in rows.tolist()))
