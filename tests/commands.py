"""Deployment commands read with the parsers that will run them: torchrun's and syncnorm's own."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence

from syncnorm.cli import build_parser


def parse_syncnorm(command: str | Sequence[str]) -> argparse.Namespace:
    """``syncnorm ...`` (a shell line or a word list) as ``syncnorm`` would parse it."""
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    assert words[0] == "syncnorm", words
    return build_parser().parse_args(words[1:])


def parse_torchrun(command: Sequence[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    """``torchrun ... -m syncnorm <args>``: torchrun's options and syncnorm's."""
    from torch.distributed.run import get_args_parser

    words = [str(w) for w in command]
    assert words[0] == "torchrun", words
    launch = get_args_parser().parse_args(words[1:])
    assert launch.module and launch.training_script == "syncnorm", words
    return launch, parse_syncnorm(["syncnorm", *launch.training_script_args])
