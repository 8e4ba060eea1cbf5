"""The ``syncnorm`` command line (also ``python -m syncnorm``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 3,13, got {text!r}"
        ) from None
    if len(sizes) < 2 or min(sizes) < 0 or sum(sizes) < 2:
        raise argparse.ArgumentTypeError(
            f"need at least two workers' batch sizes, none negative, at least 2 values in all; got {text!r}"
        )
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncnorm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="SyncBatchNorm on local Gloo workers, checked against torch BN on the global batch"
    )
    demo.add_argument(
        "--batch-sizes", type=_batch_sizes, default=(3, 13), help="one per worker (default 3,13)"
    )
    demo.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from syncnorm.demo import DemoConfig, run_demo

        if args.steps < 1:
            build_parser().error("--steps must be at least 1")
        print(run_demo(DemoConfig(batch_sizes=args.batch_sizes, steps=args.steps)))
    return 0
