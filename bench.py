"""Decoding methods side by side: a markdown table per task, a headline per task, one JSON line.

    python bench.py                                        # the toy models (trained if missing)
    python bench.py --model T --draft D --prompts p.jsonl  # checkpoints: an SDAR or a Qwen3 target

Rows: the target alone (`target`, `target-dyn0.9`, `target-dyn0.7`: its strongest decodings),
the `draft` alone, an autoregressive target alone (`ar`), and speculative rows, each naming its
draft (`data` or `distilled`) and lookahead L. `simsd-lossless*` return what `target*` return; the
paper's `simsd*` do not; `specdiff` drafts for the AR target. Quality decodes stop at EOS; latency
decodes make fixed new tokens in --repeats passes, each prompt running every row before the next,
and a speedup compares a row with its baseline on the same prompt in the same pass (paired).
"projected" is the speedup SDAR-8B with an SDAR-1.7B draft would get from the row's forward counts
(projected_cost). The headline compares the best speculative rows with the fastest target-alone
row within 1 point of the static target's accuracy; a comparison whose rows' speedups differ
between passes by more than SPREAD is withheld. The batch tables decode every prompt in batches of
each size. Everything printed is also written as markdown to --results (RESULTS.md is one run's).
Elsewhere: split.py (where an iteration's time goes), gpu.py (forwards at real model shapes).
"""
import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import sys
from collections import namedtuple
from dataclasses import asdict
from functools import partial
from pathlib import Path


def quit_at_once(signum, frame):
    """Ctrl-C while torch imports: one line and exit status 130 at once, not a traceback."""
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, quit_at_once)  # from here, not after torch's second or more

import torch

import checkpoint
import decode
import head
import sdar
import speculative
import train_tiny

TARGET_GB, DRAFT_GB = 16.4, 4.06  # bf16 weights of SDAR-8B-Chat and SDAR-1.7B-Chat
HEAD_GB = 0.021  # a head's at SDAR-8B's width and vocabulary (width 64: 10.5M parameters, bf16)
PROG = "bench.py"  # the program that says so when it refuses an input
SPREAD = 0.10  # the most a row's speedup may differ between passes for the headline to print
DEFAULT_PROMPTS = 16  # per toy task: as many as the default run's time budget allows
MAX_TOY_PROMPTS = 1000  # a toy run of more would take hours
PAPER_DRAFT = "data"  # the paper's rows use it unless --drafts says otherwise, as the paper does
LOSSLESS_DRAFT = "distilled"  # the lossless rows' unless --drafts says otherwise: the better proposer
LOOKAHEADS = (1, 2, 3)  # the speculative rows' by default: 1, the default (2) and one past it

# How a row decodes. kind: target, draft or ar (alone), self (an SDAR target proposing for
# itself: target-alone, lossless), simsd (an SDAR target with a draft) or specdiff (an AR target
# with a draft); reproduces: the row a lossless one equals when greedy; proposer and drafting: a
# lossless row's (speculative.generate's).
Method = namedtuple("Method", "kind strategy threshold verify accept reproduces proposer drafting "
                    "draft", defaults=("static", 0.9, None, None, None, None, None, None))
DYN = ("dynamic", 0.9)
# lossless rows: (name, proposer, drafting), each static and at dynamic 0.9
LOSSLESS = [("simsd-lossless", "draft", "step"), ("simsd-lossless-block", "draft", "block"),
            ("simsd-hybrid", "hybrid", "step"), ("simsd-hybrid-block", "hybrid", "block")]
METHODS = {
    "target": Method("target"),
    "target-dyn0.9": Method("target", *DYN),
    "target-dyn0.7": Method("target", "dynamic", 0.7),
    "target-self": Method("self", verify="lossless", reproduces="target"),
    "target-self-dyn0.9": Method("self", *DYN, "lossless", reproduces="target-dyn0.9"),
    "draft": Method("draft"),
    "ar": Method("ar"),
    **{name: Method("simsd", verify="lossless", reproduces="target", proposer=proposer,
                    drafting=drafting) for name, proposer, drafting in LOSSLESS},
    **{f"{name}-dyn0.9": Method("simsd", *DYN, "lossless", None, "target-dyn0.9", proposer,
                                drafting) for name, proposer, drafting in LOSSLESS},
    "simsd": Method("simsd", verify="simsd", accept="step"),
    "simsd-position": Method("simsd", verify="simsd", accept="position"),
    "simsd-dyn0.9": Method("simsd", *DYN, "simsd", "step"),
    "simsd-exact": Method("simsd", verify="exact", accept="step"),
    "specdiff": Method("specdiff", reproduces="ar"),
    "specdiff-step": Method("specdiff", reproduces="ar", drafting="step"),
    **{f"simsd-head{part}{dyn}": Method("simsd", *rule, "lossless", None, reproduces,
                                        proposer, draft="head")
       for part, proposer in (("", "draft"), ("-hybrid", "hybrid"))
       for dyn, rule, reproduces in (("", ("static", 0.9), "target"),
                                     ("-dyn0.9", DYN, "target-dyn0.9"))},
}
DEFAULT_METHODS = ("target", "target-dyn0.9", "target-dyn0.7", "target-self", "target-self-dyn0.9",
                   "draft", "ar", "simsd-lossless", "simsd-lossless-dyn0.9", "simsd-lossless-block",
                   "simsd-lossless-block-dyn0.9", "simsd-hybrid-block", "simsd-hybrid-block-dyn0.9",
                   "simsd", "specdiff", "simsd-head", "simsd-head-dyn0.9", "simsd-head-hybrid",
                   "simsd-head-hybrid-dyn0.9")
ALONE = ("target", "target-dyn0.9", "target-dyn0.7")
# A line of the table. draft None: no draft; lookahead None: not speculative; block None: AR.
Row = namedtuple("Row", "task method draft lookahead block temperature")

# A task: prompts [(text, answer or None)], scorer, whether sampled rows run (a sampled answer can
# be right), tokenizer, the SDAR target and the AR one (either may be None), drafts {name: model}
# (of both targets), and its folders by role.
Task = namedtuple("Task", "prompts score sampled tok target ar drafts folders")


def fail(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def ratio(a, b):
    """a / b, or None when that is not a finite number."""
    value = a / b if a is not None and b else None
    return value if value is not None and math.isfinite(value) else None


def projected_cost(target_forwards, draft_forwards, tokens, draft_gb=DRAFT_GB):
    """Weight GB read per token, the time per token at batch 1 on a GPU where a forward costs its
    weight bytes over memory bandwidth: (target forwards x TARGET_GB + draft forwards x draft_gb
    (DRAFT_GB, a head's passes HEAD_GB)) / tokens. A projection of forward counts to SDAR-8B and
    SDAR-1.7B, not a measurement."""
    return ratio(target_forwards * TARGET_GB + draft_forwards * draft_gb, tokens)


# ----------------------------------------------------------------------------- measuring

def decode_once(row, task, ids, n, stop_ids, seed):
    """One decode of `row` on prompt ids: (new tokens, batch.Stats)."""
    method = METHODS[row.method]
    target = task.ar if method.kind in ("ar", "specdiff") else task.target
    draft = task.drafts.get(row.draft)
    device = sdar.device_of(target if draft is None else draft)
    common = dict(sampling=sdar.Sampling(row.temperature), stop_ids=stop_ids,
                  generator=torch.Generator(device).manual_seed(seed))
    if method.kind == "ar":
        return sdar.generate_ar(target, ids, n, **common)
    diffusion = dict(block=row.block, strategy=method.strategy, threshold=method.threshold,
                     **common)
    if method.kind in ("target", "draft"):
        return sdar.generate(target if method.kind == "target" else draft, ids, n, **diffusion)
    return speculative.generate(target, draft, ids, n, verify=method.verify, accept=method.accept,
                                lookahead=row.lookahead, proposer=method.proposer,
                                drafting=method.drafting, **diffusion)


def measure(tasks, rows, new_tokens, answer_cap, repeats):
    """{row: record}: per task, the quality decode of every prompt (outputs; correct, None without
    an answer), then `repeats` latency passes over the prompts (the Stats of each decode)."""
    records = {row: {"outputs": [], "correct": [], "passes": [[] for _ in range(repeats)]}
               for row in rows}
    for name, task in tasks.items():
        mine = [row for row in rows if row.task == name]
        chats = [task.tok.chat(text) for text, _ in task.prompts]
        for i, (ids, (text, answer)) in enumerate(zip(chats, task.prompts)):
            for row in mine:
                out, _ = decode_once(row, task, ids, answer_cap, task.tok.stop_ids, i)
                records[row]["outputs"].append(out)
                correct = None if answer is None else task.score(text, task.tok.decode(out), answer)
                records[row]["correct"].append(correct)
        for p in range(repeats):
            for i, ids in enumerate(chats):
                for row in mine:
                    _, stats = decode_once(row, task, ids, new_tokens, (), i)
                    records[row]["passes"][p].append(stats)
            print(f"{name}: latency pass {p + 1} of {repeats} done", file=sys.stderr, flush=True)
    return records


# ----------------------------------------------------------------------------- the table

def median(values):
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def spread(values):
    """How far apart the passes are: max / min - 1 (None with fewer than two)."""
    present = [v for v in values if v is not None]
    return ratio(max(present), min(present)) - 1 if len(present) > 1 else None


def tok_s(one_pass):
    return [ratio(s.tokens, s.seconds) for s in one_pass]


def paired(rec, base):
    """Per pass, the median over prompts of a row's tok/s over its baseline's on the same prompt."""
    return [median([ratio(a, b) for a, b in zip(tok_s(mine), tok_s(theirs))])
            for mine, theirs in zip(rec["passes"], base["passes"])]


def baseline(row, rows):
    """The row `row` is measured against: `target` at its block and temperature; `ar` for the
    autoregressive rows, and for a draft alone where there is no `target`."""
    target = Row(row.task, "target", None, None, row.block, row.temperature)
    if METHODS[row.method].kind in ("ar", "specdiff") or target not in rows:
        return Row(row.task, "ar", None, None, None, row.temperature)
    return target


def equal_share(records, row):
    """The share of prompts whose greedy output equals that of the row a lossless row reproduces."""
    reproduced = METHODS[row.method].reproduces
    reference = baseline(row, records)._replace(method=reproduced)
    if reproduced is None or row.temperature != 0 or reference not in records:
        return None
    pairs = list(zip(records[row]["outputs"], records[reference]["outputs"]))
    return ratio(sum(a == b for a, b in pairs), len(pairs))


def table_row(row, records):
    """A row's JSON fields: the Stats fields summed over the first latency pass (later passes
    repeat its counts) and what the table shows."""
    rec = records[row]
    first = rec["passes"][0]
    n = {key: sum(getattr(s, key) for s in first) for key in asdict(first[0])}
    kind = METHODS[row.method].kind
    speculating = kind in ("self", "simsd", "specdiff")
    forwards = (0, n["forwards"]) if kind == "draft" else (n["forwards"], n["draft_forwards"])
    speedups = paired(rec, records[baseline(row, records)])
    scored = [c for c in rec["correct"] if c is not None]
    return {**row._asdict(), **n,
            "tok_s": median([median(tok_s(one)) for one in rec["passes"]]),
            "speedup": median(speedups), "speedup_passes": speedups, "spread": spread(speedups),
            "cost": projected_cost(*forwards, n["tokens"],
                                   HEAD_GB if row.draft == "head" else DRAFT_GB),
            "tokens_per_target_forward": ratio(n["tokens"], forwards[0]),
            "steps_matched": ratio(n["matched"], n["steps"]) if speculating else None,
            "acceptance": ratio(n["accepted"], n["drafted"]) if speculating else None,
            "drafting": ratio(n["draft_seconds"], n["seconds"]) if speculating else None,
            "draft_forwards_per_target_forward": ratio(n["draft_forwards"], n["forwards"])
            if speculating else None,
            "width": ratio(n["width"], n["forwards"]) if speculating else None,
            "accuracy": 100 * ratio(sum(scored), len(scored)) if scored else None,
            "outputs_equal_target": equal_share(records, row)}


def table_rows(records):
    out = {row: table_row(row, records) for row in records}
    for row, r in out.items():
        r["projected_speedup"] = ratio(out[baseline(row, out)]["cost"], r["cost"])
    return list(out.values())


# ----------------------------------------------------------------------------- the headline

def name(row):
    """A row as a sentence names it: method (draft, L)."""
    extras = [f"{row['draft']} draft"] if row["draft"] else []
    extras += [f"L={row['lookahead']}"] if row["lookahead"] else []
    return row["method"] + (f" ({', '.join(extras)})" if extras else "")


def versus(spec, base):
    """How `spec` compares with `base`, measured and projected, and what limits it when slower;
    withheld when either row has fewer than two timing passes, or passes that disagree."""
    for row in (spec, base):
        if row["spread"] is None:
            return (f"{name(spec)} against {name(base)}: withheld: {name(row)} has fewer than "
                    "two timing passes to compare; use --repeats 2 or more")
        if row["spread"] > SPREAD:
            return (f"{name(spec)} against {name(base)}: withheld: the speedup of {name(row)} "
                    f"differs by {row['spread']:.0%} between passes, more than {SPREAD:.0%}; "
                    "rerun on a quieter machine")
    measured = ratio(spec["speedup"], base["speedup"])
    projected = ratio(spec["projected_speedup"], base["projected_speedup"])
    if measured is None or projected is None:
        return f"{name(spec)} against {name(base)}: not measured"
    against = "ar" if METHODS[base["method"]].kind == "ar" else "target"
    line = (f"{name(spec)} runs at {measured:.2f}x {name(base)} measured ({spec['speedup']:.2f}x "
            f"against {base['speedup']:.2f}x {against}), {projected:.2f}x projected")
    if measured < 1:
        per_forward = ratio(spec["matched"], spec["forwards"]) or 0.0
        line += (f"; {1 - measured:.0%} slower measured: drafting takes "
                 f"{spec['drafting'] or 0:.0%} of its time, and a target forward commits "
                 f"{per_forward:.2f} matched draft steps")
    return line


def comparisons(group):
    """The headline's sentences for one task, block and temperature."""
    fastest = partial(max, key=lambda r: r["speedup"] or 0.0)
    alone = {r["method"]: r for r in group if r["draft"] is None}
    lines = []
    if alone.get("target", {}).get("accuracy") is not None:
        floor = alone["target"]["accuracy"] - 1
        near = [r for r in group if r["accuracy"] is not None and r["accuracy"] >= floor]
        best_alone = fastest([r for r in near if r["method"] in ALONE])
        lossless = [r for r in near if METHODS[r["method"]].verify == "lossless"]
        proposed = [r for r in lossless if r["draft"] is not None]
        drafted = [r for r in proposed if r["draft"] != "head"]
        heads = [r for r in proposed if r["draft"] == "head"]
        selves = [r for r in lossless if METHODS[r["method"]].kind == "self"]
        paper = [r for r in group if METHODS[r["method"]].verify in ("simsd", "exact")]
        paper_near = [r for r in paper if r in near]
        # does speculation beat the target's best alone; does a draft, or a head, pay over the
        # target proposing for itself; does a head beat the draft; does the target proposing
        # for itself beat its best alone
        pairs = [(proposed, [best_alone]), (drafted, selves), (heads, selves), (heads, drafted),
                 (selves, [best_alone]), (paper_near, [best_alone])]
        lines += [versus(fastest(rows), fastest(bases)) for rows, bases in pairs if rows and bases]
        if paper and not paper_near:
            top = fastest(paper)
            lines.append(f"no paper SimSD row is within 1 point of the static target's accuracy "
                         f"(the fastest, {name(top)}, has {top['accuracy']:.1f}%)")
    specdiff = [r for r in group if METHODS[r["method"]].kind == "specdiff"]
    if specdiff and "ar" in alone:
        lines.append(versus(fastest(specdiff), alone["ar"]))
    return lines


def headlines(rows):
    """Per task, block and temperature: comparisons(), each sentence prefixed with where."""
    lines = []
    groups = dict.fromkeys((r["task"], r["block"], r["temperature"]) for r in rows if r["block"])
    for task, block, temperature in groups:
        group = [r for r in rows if (r["task"], r["temperature"]) == (task, temperature)
                 and r["block"] in (block, None)]
        sampling = "greedy" if temperature == 0 else f"temperature {temperature:g}"
        where = f"{task}, block {block}, {sampling}"
        lines += [f"{where}: {line}" for line in comparisons(group)]
    return lines


# ----------------------------------------------------------------------------- the report

def show(v, spec):
    return "" if v is None else format(v, spec)


def markdown(header, cells):
    lines = ["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in cells])


COLUMNS = {  # header: (JSON field, format)
    "method": ("method", "s"), "draft": ("draft", "s"), "L": ("lookahead", "d"),
    "block": ("block", "d"), "temp": ("temperature", "g"), "tok/s": ("tok_s", ".1f"),
    "speedup": ("speedup", ".2f"), "projected": ("projected_speedup", ".2f"),
    "tokens / target forward": ("tokens_per_target_forward", ".2f"),
    "steps matched": ("steps_matched", ".0%"), "acceptance": ("acceptance", ".0%"),
    "drafting": ("drafting", ".0%"),
    "draft fwd / target fwd": ("draft_forwards_per_target_forward", ".2f"),
    "width": ("width", ".1f"), "accuracy %": ("accuracy", ".1f"),
    "= target": ("outputs_equal_target", ".0%"),
}


def clean(value):
    """JSON-safe, through lists and dicts: floats rounded, None for any that is not finite."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


BATCH_COLUMNS = {"method": ("method", "s"), "draft": ("draft", "s"), "L": ("lookahead", "d"),
                 "batch": ("batch", "d"), "tok/s": ("tok_s", ".1f"), "speedup": ("speedup", ".2f"),
                 "x batch 1": ("over_batch_1", ".2f"), "= batch 1": ("equal_batch_1", ".0%"),
                 "readbacks / forward": ("readbacks", ".2f")}


LEGEND = """`speedup`: the median over prompts of a row's tok/s over its baseline's (the static \
target; `ar` for `ar` and `specdiff`) on the same prompt in the same pass, then over passes; \
`projected`: the same forward counts priced at the weight bytes they read; `steps matched`: the \
share of the target's committed steps that were proposed; `acceptance`: proposed tokens \
committed as proposed; `drafting`: the share of decode time spent proposing; `width`: a target \
forward's mean query tokens; `= target`: outputs equal to the target alone's (the quality \
protocol); `= batch 1`: outputs equal to the row's own at batch 1; `readbacks / forward`: host \
round trips per target forward."""


def shown(path):
    """A folder as the reader typed it: relative to the working directory where it lies below."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def report(conditions, rows, batched=(), results=None):
    """Conditions, a table per task, the headlines, the batch tables, then the JSON line: the last
    line of stdout. The same markdown (without the JSON) goes to the file `results` too."""
    out = ["\n".join(f"- {k}: {v}" for k, v in conditions.items())]
    for task in dict.fromkeys(r["task"] for r in rows):
        cells = [[show(r[key], spec) for key, spec in COLUMNS.values()]
                 for r in rows if r["task"] == task]
        out.append(f"{task}:\n\n" + markdown(list(COLUMNS), cells))
    lines = headlines(rows)
    out.append("\n".join(lines))
    for task in dict.fromkeys(r["task"] for r in batched):
        cells = [[show(r[key], spec) for key, spec in BATCH_COLUMNS.values()]
                 for r in batched if r["task"] == task]
        out.append(f"{task}, batches (every prompt, in batches of each size):\n\n" +
                   markdown(list(BATCH_COLUMNS), cells))
    print("\n\n".join(out))
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python", *sys.argv]) if sys.argv[0].endswith("bench.py") else None
        made = [f"# Results\n\nWritten by `{command}`. {LEGEND}"] if command else []
        results.write_text("\n\n".join(made + out) + "\n")
    result = {key: conditions[key] for key in ("device", "dtype", "threads")}
    result.update(spread_limit=SPREAD, headlines=lines, rows=rows, batches=list(batched))
    print(json.dumps(clean(result), allow_nan=False))


# ----------------------------------------------------------------------------- tasks and rows

def load(path, device, dtype, loaded, compile=False):
    """(model, tokenizer) of a folder, each loaded once (compiled: sdar.compiled); a sentence,
    not a traceback."""
    key = Path(path).resolve()
    if key not in loaded:
        try:
            m = checkpoint.load(path, device, dtype)
            loaded[key] = (sdar.compiled(m) if compile else m, checkpoint.load_tokenizer(path))
        except (OSError, ValueError) as e:
            fail(f"cannot load the checkpoint {path}: {e}")
    return loaded[key]


def build_task(prompts, score, sampled, targets, drafts, where):
    """A Task from folders: targets {"target" and/or "ar": path}, drafts {name: path}, every draft
    checked against every target. where: (device, dtype, {} of what is loaded, compile)."""
    loaded = {path: load(path, *where) for path in [*targets.values(), *drafts.values()]}
    for target in targets.values():
        for draft in drafts.values():
            try:
                checkpoint.check_pair(loaded[target][0], loaded[draft][0], loaded[target][1],
                                 loaded[draft][1])
            except ValueError as e:
                fail(f"the draft {draft} cannot propose to {target}: {e}")
    roles = {role: loaded[path][0] for role, path in targets.items()}
    folders = {**targets, **{f"{d} draft": path for d, path in drafts.items()}}  # by role
    tok = loaded[next(iter(drafts.values()))][1]  # the draft's: it covers every target's ids
    return Task(prompts, score, sampled, tok, roles.get("target"), roles.get("ar"),
                {d: loaded[path][0] for d, path in drafts.items()}, folders)


def read_prompts(path, n):
    """[(prompt, answer or None)] from the first n lines of a JSONL file."""
    try:
        lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"--prompts {path} cannot be read as JSONL ({e}); give one JSON object per line")
    for i, x in enumerate(lines, 1):
        if not isinstance(x, dict) or not isinstance(x.get("prompt"), str) or not x["prompt"]:
            fail(f'--prompts {path}: line {i} is not a {{"prompt": ..., "answer": ...}} object '
                 "with a prompt of at least one character")
    if not lines:
        fail(f"--prompts {path} holds no prompt")
    answers = [None if x.get("answer") is None else str(x["answer"]) for x in lines]
    return [(x["prompt"], answer) for x, answer in zip(lines, answers)][:n]


def toy_tasks(args, where):
    """{task: Task} of train_tiny's toys (trained first if missing) on held-out prompts."""
    n, prompts = args.num_prompts or DEFAULT_PROMPTS, {}
    for task in args.tasks or train_tiny.TASKS:
        try:
            prompts[task] = train_tiny.examples(n, "heldout", task=task)
        except ValueError as e:
            fail(f"--num-prompts {n}: {e}")
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the table, then the JSON line
        train_tiny.ensure_trained(quiet=True)
    tasks = {}
    for task, chosen in prompts.items():
        folders = train_tiny.folders(task)
        drafts = {d: folders[d] for d in args.drafts or train_tiny.DRAFTS}
        targets = {"target": folders["target"], "ar": folders["ar"]}
        sampled = task != "sort"  # a sorted list has one right answer: greedy only
        tasks[task] = build_task(chosen, train_tiny.score, sampled, targets, drafts, where)
        tasks[task].drafts["head"] = head.load(folders["head"], tasks[task].target, where[0])
        tasks[task].folders["head draft"] = folders["head"]
    return tasks


def checkpoint_tasks(args, where):
    """{"prompts": Task} of --model (SDAR or Qwen3), --draft and --prompts; an answer counts when
    the output contains it."""
    prompts = read_prompts(args.prompts, args.num_prompts)
    kind = load(args.model, *where)[0].config.model_type
    targets = {"target" if kind == "sdar" else "ar": args.model}
    drafts = {Path(args.draft).name: args.draft}

    def contains(prompt, output, answer):
        return answer.strip() in output
    return {"prompts": build_task(prompts, contains, True, targets, drafts, where)}


def blocks_of(task, asked):
    """--blocks, which must be the block a checkpoint was trained with if its config names one."""
    models = [m for m in (task.target, *task.drafts.values()) if m is not None]
    trained = next((m.config.block_size for m in models if m.config.block_size), None)
    wrong = [b for b in asked or () if trained and b != trained]
    if wrong:
        fail(f"block {wrong[0]} requested but the models were trained with block {trained} "
             f"(block_size in their config.json); use --blocks {trained}")
    return asked or [trained or 4]


def drafts_of(method, task, args):
    """The drafts of a method's rows: none alone; by default PAPER_DRAFT for the paper's rows,
    as in the paper, LOSSLESS_DRAFT for the lossless ones; every draft otherwise."""
    if method.kind in ("target", "ar", "self"):
        return [None]
    if method.draft:  # a head: its task's, where it has one
        return [method.draft] if method.draft in task.drafts else []
    default = {"simsd": PAPER_DRAFT, "exact": PAPER_DRAFT, "lossless": LOSSLESS_DRAFT}
    if default.get(method.verify) in task.drafts and not args.drafts:
        return [default[method.verify]]
    return [d for d in task.drafts if d != "head"]


def plan(task_name, task, args):
    """The rows of one task: each chosen method its models can run, at every block, temperature,
    draft and lookahead, and the rows they are measured against or reproduce."""
    methods = list(args.methods or DEFAULT_METHODS)
    methods += [METHODS[m].reproduces for m in methods if METHODS[m].reproduces]
    ar_baseline = task.target is None or any(METHODS[m].kind == "specdiff" for m in methods)
    methods += ["target"] + (["ar"] if ar_baseline else [])  # what the rows are measured against
    runnable = {"target": task.target, "simsd": task.target, "ar": task.ar, "specdiff": task.ar,
                "draft": task.drafts or None, "self": task.target}
    ahead = {"simsd": args.lookahead, "specdiff": args.lookahead,  # the target proposes 2 at most
             "self": sorted({min(L, 2) for L in args.lookahead})}
    temperatures = [t for t in args.temperatures or [0.0] if t == 0 or task.sampled]
    rows = []
    for temperature in temperatures:
        for block in blocks_of(task, args.blocks):
            for method in dict.fromkeys(methods):
                m = METHODS[method]
                if runnable[m.kind] is None:
                    continue
                lookaheads = ahead.get(m.kind, [None])
                row_block = None if m.kind == "ar" else block
                rows += [Row(task_name, method, d, L, row_block, temperature)
                         for d in drafts_of(m, task, args) for L in lookaheads]
    return list(dict.fromkeys(rows))


def conditions(args, tasks, device, dtype, new_tokens, source):
    def described(task):
        models = {"target": task.target, "ar": task.ar,
                  **{f"{d} draft": m for d, m in task.drafts.items()}}
        sizes = {role: sum(p.numel() for p in m.parameters()) / 1e6
                 for role, m in models.items() if m is not None}
        return ", ".join(f"{role} {n:.3g}M ({shown(task.folders[role])})" for role, n in sizes.items())
    return {
        "device": device, "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "batch": "1 (the batch tables: as they say)",
        "models": "; ".join(f"{t}: {described(task)}" for t, task in tasks.items()),
        "prompts": ", ".join(f"{len(task.prompts)} {t}" for t, task in tasks.items()) + source,
        "latency": f"{new_tokens} new tokens, stop tokens ignored, prefill excluded, "
        f"{args.repeats} passes; tok/s and speedup: medians over prompts, then over passes",
        "quality": f"stop at EOS or {args.answer_cap} tokens",
        "projected": f"target SDAR-8B ({TARGET_GB} GB bf16), draft SDAR-1.7B ({DRAFT_GB} GB), "
        "a forward costing its weight bytes over memory bandwidth: not a measurement",
    }


def table_main(args, device, dtype):
    toys, where = args.model is None, (device, dtype, {}, args.compile)
    tasks = toy_tasks(args, where) if toys else checkpoint_tasks(args, where)
    source = (" (train_tiny held-out; sort by exact match, walk by validity; sampled rows on walk)"
              if toys else f" ({args.prompts}, answer contained in the output)")
    rows = [row for task_name, task in tasks.items() for row in plan(task_name, task, args)]
    new_tokens = args.new_tokens or (32 if toys else 128)
    args.answer_cap = args.answer_cap or (64 if toys else 256)
    records = measure(tasks, rows, new_tokens, args.answer_cap, args.repeats)
    table = table_rows(records)
    batched = measure_batches(tasks, batch_plan(table), args.batch_sizes or BATCH_SIZES,
                              new_tokens, args.repeats)
    report(conditions(args, tasks, device, dtype, new_tokens, source), table, batched,
           args.results)


# ----------------------------------------------------------------------------- batches

BATCH_SIZES = (1, 4, 16)


def batch_plan(table):
    """The batch table's rows, per task (greedy): target, target-dyn0.9 and ar, the fastest lossless
    row (any proposer) and the fastest specdiff row of the main table."""
    fastest = partial(max, key=lambda r: r["speedup"] or 0.0)
    out = []
    for task in dict.fromkeys(r["task"] for r in table):
        mine = [r for r in table if r["task"] == task and r["temperature"] == 0]
        lossless = [r for r in mine if METHODS[r["method"]].verify == "lossless"]
        specdiff = [r for r in mine if METHODS[r["method"]].kind == "specdiff"]
        chosen = [r for r in mine if r["method"] in ("target", "target-dyn0.9", "ar")]
        chosen += [fastest(rows) for rows in (lossless, specdiff) if rows]
        out += [Row(*(r[f] for f in Row._fields)) for r in chosen]
    return out


def measure_batches(tasks, rows, sizes, new_tokens, repeats):
    """Each row's decode of all its task's prompts in batches of each size (latency protocol):
    per pass, tokens over the summed decode time of the batches (a batch's: its last row's);
    speedup against the target alone (ar for ar and specdiff) at the same size, per pass then
    the median; times its own batch-1 throughput; the share of prompts whose output equals the
    batch-1 output; and a row's host readbacks per target forward (one iteration)."""
    tok_s, outputs, reads, out = {}, {}, {}, []
    for row in rows:
        task = tasks[row.task]
        chats = [task.tok.chat(text) for text, _ in task.prompts]
        for size in sizes:
            tok_s[row, size] = []
            for _ in range(repeats):
                tokens = seconds = 0
                outputs[row, size], reads[row, size] = [], [0, 0]
                for first in range(0, len(chats), size):
                    outs, stats = decode_once(row, task, chats[first:first + size], new_tokens, (),
                                              first)
                    outputs[row, size] += outs
                    tokens += sum(s.tokens for s in stats)
                    seconds += max(s.seconds for s in stats)
                    reads[row, size][0] += sum(s.readbacks for s in stats)
                    reads[row, size][1] += sum(s.forwards for s in stats)
                tok_s[row, size].append(ratio(tokens, seconds))
        print(f"{row.task}: batches of {name(row._asdict())} done", file=sys.stderr, flush=True)
    for row in rows:
        base = baseline(row, rows)
        for size in sizes:
            paired = [ratio(a, b) for a, b in zip(tok_s[row, size], tok_s[base, size])]
            same = sum(a == b for a, b in zip(outputs[row, size], outputs[row, sizes[0]]))
            out.append({**row._asdict(), "batch": size, "tok_s": median(tok_s[row, size]),
                        "speedup": median(paired), "over_batch_1": ratio(
                            median(tok_s[row, size]), median(tok_s[row, sizes[0]])),
                        "equal_batch_1": ratio(same, len(outputs[row, size])),
                        "readbacks": ratio(*reads[row, size])})
    return out


# ----------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line: the reason, and where to learn more
        fail(f"{message} (python {self.prog} --help lists the options)")


def parse_args(argv=None, prog="bench.py", about="Decoding methods side by side: a table per "
               "task, the headlines and the batch tables, then one JSON line. Default: "
               "train_tiny's toy models."):
    p = Parser(prog=prog, description=about)
    add = p.add_argument
    add("--model", help="target checkpoint folder, SDAR or Qwen3 (with --draft and --prompts)")
    add("--draft", help="draft SDAR checkpoint folder")
    add("--prompts", help='JSONL, one {"prompt": ..., "answer": ...} per line (answer optional)')
    add("--num-prompts", type=count, help=f"prompts per task (default: {DEFAULT_PROMPTS} held-out "
        "toy prompts per task, or every line of --prompts)")
    add("--tasks", nargs="+", choices=train_tiny.TASKS, help="toy tasks (default: all)")
    add("--drafts", nargs="+", choices=train_tiny.DRAFTS, help="toy drafts: data (trained on "
        "the task), distilled (on the target's decoding); default: both (the paper's rows: "
        f"{PAPER_DRAFT}; the lossless ones: {LOSSLESS_DRAFT})")
    add("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
        help=f"rows, from {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)})")
    add("--lookahead", type=count, nargs="+", help="blocks one target forward reaches, a row each "
        f"(default: {' '.join(map(str, LOOKAHEADS))}; the target proposing for itself reaches 2 "
        "at most)")
    add("--temperatures", type=float, nargs="+", help="0 = greedy (default); sampled rows run "
        "only where a sampled answer can be right")
    add("--new-tokens", type=count, help="latency protocol: fixed new tokens (default: toys 32, "
        "checkpoints 128)")
    add("--answer-cap", type=count, help="quality protocol: most new tokens before EOS (default: "
        "toys 64, checkpoints 256)")
    add("--repeats", type=count, default=2, help="timed passes over the prompts (default 2, the "
        "fewest the headline's spread check needs)")
    add("--blocks", type=count, nargs="+", help="block lengths (default: the checkpoint's, else 4)")
    add("--batch-sizes", type=count, nargs="+", help="the batch table's sizes (default: "
        f"{' '.join(map(str, BATCH_SIZES))}; the first is the one the others are compared with)")
    add("--results", type=Path, default=Path("out") / "results.md", help="where the markdown "
        "report goes (default out/results.md)")
    add("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, "
        "else float32")
    add("--compile", action="store_true", help="compile the models (torch.compile, static "
        "shapes; CUDA graphs on cuda): opt-in, eager is the reference; the first forwards of each "
        "shape compile (tens of seconds on a CPU)")
    add("--threads", type=int, help=f"CPU threads, 1 to {os.cpu_count()} (default: 1 for the toys "
        "on a CPU: their micro models are as fast on one thread, and far faster under load)")
    return p.parse_args(argv)


def count(text):
    """argparse's type of the counts: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {value}")
    return value


def check_args(args):
    """Every option in range, every combination meaningful: a sentence and exit 2 otherwise."""
    for value in args.temperatures or ():
        try:
            sdar.check(sdar.FLAGS, temperature=value)
        except ValueError as e:
            fail(str(e).replace("--temperature", "--temperatures"))
    if args.threads is not None and not 1 <= args.threads <= os.cpu_count():
        fail(f"--threads must be from 1 to this machine's {os.cpu_count()} CPUs; got "
             f"{args.threads}")
    checkpoints = [flag is not None for flag in (args.model, args.draft, args.prompts)]
    if any(checkpoints) and not all(checkpoints):
        fail("checkpoints need all of --model, --draft and --prompts FILE.jsonl")
    if (args.tasks or args.drafts) and args.model:
        fail("--tasks and --drafts choose toys; checkpoints take --draft and --prompts")
    if args.model is None and (args.num_prompts or 0) > MAX_TOY_PROMPTS:
        fail(f"--num-prompts {args.num_prompts} is more than a toy run takes: at most "
             f"{MAX_TOY_PROMPTS} held-out prompts per task")


def setup(argv, **about):
    """The checked arguments, the device and the dtype; the toys on a CPU run one thread."""
    global PROG  # the program whose refusals these are (split.py shares the flags)
    PROG = about.get("prog", "bench.py")
    args = parse_args(argv, **about)
    check_args(args)
    args.lookahead = list(dict.fromkeys(args.lookahead or LOOKAHEADS))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but this machine has no CUDA GPU")
    if args.threads or (device == "cpu" and not args.model):
        torch.set_num_threads(args.threads or 1)
    return args, device, getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else
                                                       "float32"))


def main(argv=None):
    table_main(*setup(argv))


if __name__ == "__main__":
    decode.run(main)
