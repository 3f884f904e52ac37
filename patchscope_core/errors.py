"""Errors for bad input. Each message starts with the field it is about."""


class PatchscopeError(ValueError):
    """Input that cannot run: the message names the field and the allowed range."""


class UnknownModelError(PatchscopeError):
    """A model name that is no alias, local directory or loadable hub name."""
