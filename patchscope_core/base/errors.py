"""Errors for bad input. Each message starts with the field it is about.

`InputError` is the one base class of every error that bad input (a config, a command-line
option, a spec) causes; the CLI turns exactly these into exit status 2 with one line. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input that cannot run: the message names the field and the allowed range."""


class PatchscopeError(InputError):
    """A Patchscope, intervention or model option that cannot run."""


class UnknownModelError(PatchscopeError):
    """A model name that is no alias, local directory or loadable hub name."""
