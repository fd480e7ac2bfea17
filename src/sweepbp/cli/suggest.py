"""Did you mean: the closest known option, key or flag to a misspelt one, for pre-flight's one-line errors
(`memory=chkpt` -> `ckpt`), by difflib's similarity. Nothing heavy is imported."""

from __future__ import annotations

import difflib
from dataclasses import fields

from hydra._internal.utils import get_args_parser

from sweepbp.config import NAMED_SCHEMAS


def did_you_mean(word: str, choices: list[str]) -> str:
    """`; did you mean 'ckpt'?` for the choice closest to a misspelt word, or nothing when none is close."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def similar_key(key: str, parent) -> str:
    """The suggestion for a misspelt key: a sibling key of the config node it was looked up in."""
    if parent is None or not hasattr(parent, "keys"):
        return ""
    head, _, last = key.rpartition(".")
    siblings = [str(k) for k in parent.keys() if k != "hydra" or key.startswith("hydra")]
    close = difflib.get_close_matches(last, siblings, n=1)
    return f"; did you mean {(head + '.' if head else '') + close[0]!r}?" if close else ""


def option_with_field(key: str, parent) -> str:
    """For a key of a group whose chosen option lacks it (`memory.every` with memory=none): the options that
    have it, since a field of another option is no typo."""
    group, _, field = key.partition(".")
    if group not in NAMED_SCHEMAS or parent is None or not hasattr(parent, "get"):
        return ""
    chosen = parent.get("name")
    having = [name for name, schema in NAMED_SCHEMAS[group].items() if field in {f.name for f in fields(schema)}]
    if not isinstance(chosen, str) or not having or chosen in having:
        return ""
    verb = "has" if len(having) == 1 else "have"
    return f" ({group}={chosen} has no {field}; {', '.join(f'{group}={n}' for n in having)} {verb} it)"


def unknown_flags(args: list[str]) -> list[str]:
    """A problem line for each flag Hydra's parser does not know (`--multirn`), with the closest it knows;
    argparse would print its usage and no suggestion."""
    known = [flag for action in get_args_parser()._actions for flag in action.option_strings]
    flags = [a.split("=", 1)[0] for a in args if a.startswith("-") and a != "--version"]
    return [f"{flag} must be one of sweepbp's flags (python -m sweepbp --help){did_you_mean(flag, known)}"
            for flag in flags if flag not in known]
