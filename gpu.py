"""Forwards at real model shapes, with random weights, against the weight-bytes floor.

    python gpu.py --shapes sdar-8b:sdar-1.7b    # on a GPU: SDAR-8B and its SDAR-1.7B draft
    python gpu.py --shapes tiny:tiny            # anywhere, in seconds

A forward at batch 1 must read every weight once, so it takes at least the weight bytes over the
memory bandwidth (measured by a large copy on CUDA). This times each forward one block costs (a
denoising step, the verifications, the draft's step) and vanilla decoding, and prints a table and
one JSON line.
"""
import argparse
import json
import os
import signal
import statistics
import sys
from functools import partial


def quit_at_once(signum, frame):
    """Ctrl-C while torch imports: one line and exit status 130 at once, not a traceback."""
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, quit_at_once)  # from here, not after torch's second or more

import torch

import mask as masks
import model
import sdar
from batch import clock
from bench import clean, markdown, show

TINY = model.Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, mask_token_id=511)
SHAPES = {**model.PRESETS, "tiny": TINY}


def fail(message):
    print(f"gpu.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def random_model(config, device, dtype, seed):
    """Random weights of `config`'s shape, built on the meta device and materialised once on
    `device` (an 8B model builds in seconds): normals of std 0.02, norms at 1."""
    with torch.device("meta"):
        m = model.Transformer(config).to(dtype)
    m = m.to_empty(device=device).eval()
    if config.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight  # to_empty materialises each module's copy
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for param_name, p in m.named_parameters():
            if param_name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return m


def median_time(run, repeats, device):
    """Median seconds of `repeats` calls of run() after one untimed, synchronised on CUDA."""
    run()
    seconds = []
    for _ in range(repeats):
        t0 = clock(device)
        run()
        seconds.append(clock(device) - t0)
    return statistics.median(seconds)


def layouts(B):
    """{forward: (attention mask, positions after the context)} of the forwards one block costs:
    a denoise step (the target's, or the draft's), and the target's verification of a block drafted
    one position per step, lossless or exact (B copies, mask.copies) or simsd (2B, mask.verify)."""
    step = torch.ones(B, B, dtype=torch.bool)
    return {"target denoise step": (step, torch.arange(B)),
            "target verify, lossless/exact": (masks.copies(B, B), torch.arange(B).repeat(B)),
            "target verify, simsd": (masks.verify(torch.arange(1, B + 1)),
                                     torch.arange(B).repeat(2)),
            "draft step": (step, torch.arange(B))}


def forward_seconds(m, attend, pos, ctx, repeats, device):
    """Median seconds of one forward of m over the layout (attend, pos) after ctx cached tokens."""
    cache = m.new_cache(ctx + len(pos))
    ids = torch.randint(0, m.config.vocab_size - 1, (ctx + len(pos),), device=device)
    sdar.prefill(m, ids[:ctx], cache, 1)
    call = partial(m, ids[None, ctx:], pos.to(device) + ctx, attend.to(device), cache)
    return median_time(call, repeats, device)


@torch.inference_mode()
def shapes(args, device, dtype):
    names = args.shapes.split(":")
    if len(names) != 2 or any(n not in SHAPES for n in names):
        fail(f"--shapes takes TARGET:DRAFT with names from {', '.join(sorted(SHAPES))}")
    target, draft = (random_model(SHAPES[n], device, dtype, seed) for seed, n in enumerate(names))
    new, repeats, dev = args.new_tokens, args.repeats, torch.device(device)
    bandwidth = args.bandwidth and args.bandwidth * 1e9
    if device == "cuda" and not bandwidth:  # bytes read + written per second by a large copy
        a = torch.empty(2 ** 28, device=device)
        bandwidth = 2 * a.nbytes / median_time(lambda: torch.empty_like(a).copy_(a), 5, dev)
    blocks, cells = [], []
    for B in args.blocks:
        forwards = []
        for label, (attend, pos) in layouts(B).items():
            m = draft if label == "draft step" else target
            seconds = forward_seconds(m, attend, pos, args.context, repeats, dev)
            nbytes = sum(p.nbytes for p in m.parameters())
            floor = bandwidth and nbytes / bandwidth / seconds  # the share of the bytes floor
            forwards.append({"name": label, "tokens": len(pos), "ms": seconds * 1e3,
                             "weight_bytes": nbytes, "floor_fraction": floor})
            cells.append([B, label, len(pos), f"{seconds * 1e3:.2f}", f"{nbytes / 1e9:.3f}",
                          show(floor, ".0%")])
        prompt = torch.randint(0, target.config.mask_token_id, (args.context,)).tolist()
        vanilla = new / median_time(partial(sdar.generate, target, prompt, new, block=B),
                                    repeats, dev)
        blocks.append({"block": B, "forwards": forwards, "vanilla_tok_s": vanilla})
        cells.append([B, f"vanilla decoding: {vanilla:.1f} tok/s", "", "", "", ""])
    gpu = torch.cuda.get_device_name(dev) if device == "cuda" else None
    print(f"- {gpu or device}, {str(dtype).removeprefix('torch.')}, threads "
          f"{torch.get_num_threads()}, batch 1, {args.context} context tokens cached, median "
          f"of {repeats} after one warm-up; vanilla: {new} new tokens, prefill included\n")
    print(markdown(["block", "forward", "query tokens", "ms", "weight GB",
                    "fraction of the weight-bytes floor"], cells))
    peak = torch.cuda.max_memory_allocated(dev) if device == "cuda" else None
    result = {"device": device, "dtype": str(dtype).removeprefix("torch."), "gpu": gpu,
              "peak_memory_bytes": peak, "bandwidth_GBps": bandwidth and bandwidth / 1e9,
              "threads": torch.get_num_threads(), "target": names[0], "draft": names[1],
              "context": args.context, "new_tokens": new, "batch": 1, "blocks": blocks}
    print(json.dumps(clean(result), allow_nan=False))


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line: the reason, and where to learn more
        fail(f"{message} (python gpu.py --help lists the options)")


def count(text):
    """argparse's type of the counts: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {value}")
    return value


def main(argv=None):
    p = Parser(prog="gpu.py", description="Forwards at real model shapes with random weights, "
               "against the weight-bytes floor: a table and one JSON line.")
    add = p.add_argument
    add("--shapes", default="sdar-8b:sdar-1.7b", help="TARGET:DRAFT, from "
        f"{', '.join(sorted(SHAPES))} (default sdar-8b:sdar-1.7b)")
    add("--blocks", type=count, nargs="+", default=[4, 8], help="block lengths (default 4 8)")
    add("--context", type=int, default=512, help="prefilled tokens (default 512)")
    add("--new-tokens", type=count, default=256, help="vanilla decoding's tokens (default 256)")
    add("--repeats", type=count, default=3, help="timed runs per forward (default 3)")
    add("--bandwidth", type=float, help="GB/s for the floor (default: measured on CUDA)")
    add("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, "
        "else float32")
    add("--threads", type=count, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.context < 0 or args.bandwidth is not None and not 0 < args.bandwidth < float("inf"):
        fail("--context must be >= 0 and --bandwidth a finite number of GB/s above 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but this machine has no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes(args, device, getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else
                                                        "float32")))


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is quit_at_once:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt from here
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:  # done: a Ctrl-C while Python exits (it then resets the handler) changes nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)
