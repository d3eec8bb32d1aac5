"""Command-line conventions shared by the tools (generate.py, eval.py, quantize.py, anyprec.py, medusa.py and
scripts/): flag types that state the range they allow, and one-line errors.

    p.add_argument("--top_p", type=cli.probability)
    if __name__ == "__main__":
        cli.run(main)

A user's mistake or a damaged file ends as one `error: ...` line and a non-zero exit (argparse's own usage errors
exit with 2); anything else is a bug, and keeps its traceback. Needs no other file of the project.
"""
import argparse
import math
import sys

import torch


def at_least(minimum, kind=int):
    """An argparse type: a number of `kind` that is at least `minimum` (and finite)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    return parse


def positive(text: str) -> float:
    """An argparse type: a finite number above 0 (a learning rate, a damping)."""
    value = at_least(0.0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return value


def probability(text: str) -> float:
    """An argparse type: a probability mass in (0, 1], as top_p is (0 would keep no token at all)."""
    value = at_least(0.0, float)(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def device(text: str) -> str:
    """An argparse type: a device this machine has (cpu, cuda, cuda:1, mps)."""
    try:
        kind = torch.device(text).type
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda or mps") from None
    there = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(kind)
    if kind == "cuda" and there and (torch.device(text).index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} GPU(s)")
    if not there:
        raise argparse.ArgumentTypeError(f"{text}: this machine has no such device; use cpu"
                                         + (", cuda" if torch.cuda.is_available() else ""))
    return text


def run(main):
    """Run a command line's main(): an expected failure is one line on stderr and exit status 1."""
    try:
        main()
    except (ValueError, OSError) as e:  # FileNotFoundError, PermissionError, a full disk are OSErrors
        sys.exit(f"error: {e}")
