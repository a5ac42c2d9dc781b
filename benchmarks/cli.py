"""Command-line arguments of the benchmark scripts: every mistake is one line `error: ...` on
stderr with exit status 1, found before any work (argparse's own habit is the usage text and
status 2; `--help` still prints the usage and exits 0).

    parser = cli.Parser(description=...)
    parser.add_argument("--steps", type=cli.int_in(1), default=1000)
    parser.add_argument("--workdir", type=cli.directory, default="ckpts")
"""

import argparse
import ast
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fail(message):
    """Exit with status 1 after one line `error: MESSAGE` on stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


class Parser(argparse.ArgumentParser):
    """argparse with its errors as `error: --flag: what is valid` (status 1)."""

    def error(self, message):
        fail(re.sub(r"^argument ([^:]+): ", r"\1: ", message))


def int_in(low, high=None):
    """`type=` validator: an integer in [low, high] (high None: unbounded)."""
    valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}")
        return value

    return parse


def directory_problem(path, name):
    """One line naming `name` unless `path` is a directory, or can be made one, in which a file
    can be created (utils.check_output_dir; nothing is made here), else None."""
    import utils

    if not path.strip():
        return f"{name} is empty: give a directory path"
    try:
        utils.check_output_dir(path, name)
    except ValueError as e:
        return str(e)
    return None


def check_directory(path, name):
    """Exit with directory_problem's line, if any."""
    problem = directory_problem(path, name)
    if problem:
        fail(problem)


def directory(text):
    """`type=` validator: a directory that exists or can be made, in which files can be made."""
    problem = directory_problem(text, repr(text))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def key_value(text):
    """`type=` validator of KEY=VALUE: (KEY, VALUE as a Python literal, else the string)."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. train.lr=1e-3), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value
