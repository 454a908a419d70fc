"""Where a decode's time goes: each method's time per target forward, split by the labels its loop
declares (speculative.speculate: propose, of which the draft's denoising, lay out, target forward,
accept, commit; the target alone: target forward, step), under torch.profiler.

    python split.py                                        # the toys, the default methods
    python split.py --methods target-dyn0.9 simsd-lossless-block-dyn0.9 --batch-sizes 1 16

The profiler adds its own cost to every operation, so the parts are shares of a slower run: read
them as proportions; bench.py measures speed.
"""
import os
import signal
import sys


def quit_at_once(signum, frame):
    """Ctrl-C while torch imports: one line and exit status 130 at once, not a traceback."""
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, quit_at_once)  # from here, not after torch's second or more

import torch
from torch.profiler import ProfilerActivity, profile

import bench
import decode

METHODS = ("target-dyn0.9", "target-self-dyn0.9", "simsd-lossless-dyn0.9",
           "simsd-lossless-block-dyn0.9", "simsd-hybrid-block")
# The loops' labels (phase()), in the order a column shows them; "draft" is part of "propose".
LABELS = ("target forward", "step", "propose", "draft", "lay out", "accept", "commit")


def split(task, row, batch_size, new_tokens):
    """(seconds of decoding, target forwards, {label: seconds}) of every prompt of a task decoded
    by `row` in batches of batch_size, after a warm-up."""
    chats = [task.tok.chat(text) for text, _ in task.prompts]
    batches = [chats[i:i + batch_size] for i in range(0, len(chats), batch_size)]
    bench.decode_once(row, task, batches[0], new_tokens, (), 0)  # warm-up
    seconds = forwards = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i, prompts in enumerate(batches):
            _, stats = bench.decode_once(row, task, prompts, new_tokens, (), i)
            seconds += max(s.seconds for s in stats)
            forwards += max(s.forwards for s in stats)
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in LABELS}
    return seconds, forwards, totals


def main(argv=None):
    args, device, dtype = bench.setup(argv, prog="split.py", about="Where each method's decode "
                                      "time goes, per target forward, by the loop's labels.")
    args.methods = args.methods or METHODS
    where = (device, dtype, {}, args.compile)
    tasks = bench.toy_tasks(args, where) if args.model is None else \
        bench.checkpoint_tasks(args, where)
    new, cells = args.new_tokens or 32, []
    for task_name, task in tasks.items():
        rows = [r for r in bench.plan(task_name, task, args)
                if r.method in args.methods and r.lookahead in (None, 2)]
        for row in rows:
            for size in args.batch_sizes or (1,):
                seconds, forwards, parts = split(task, row, size, new)
                rest = seconds - sum(v for k, v in parts.items() if k != "draft")
                shown = [parts.get(label, 0.0) for label in LABELS] + [rest]
                cells.append([task_name, bench.name(row._asdict()), size,
                              f"{1e3 * seconds / forwards:.2f}",
                              *(f"{1e3 * v / forwards:.2f}" for v in shown)])
        print(f"{task_name} done", file=sys.stderr, flush=True)
    print(f"- ms per target forward (an iteration) under torch.profiler, {len(task.prompts)} "
          f"prompts per task, {new} new tokens, {device}, {torch.get_num_threads()} thread(s)\n")
    print(bench.markdown(["task", "method", "batch", "total", *LABELS, "the rest"], cells))


if __name__ == "__main__":
    decode.run(main)
