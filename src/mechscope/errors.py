"""Errors mechscope raises. Each message says what was wrong and what would work."""


class MechscopeError(Exception):
    """Base class for mechscope's own errors."""


class HookNameError(MechscopeError, KeyError):
    """An unknown hook name."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0])


class UnsupportedModelError(MechscopeError, ValueError):
    """A model whose architecture no adapter covers."""


class ModelLoadError(MechscopeError, OSError):
    """A model that cannot be loaded: unreachable hub, missing file, broken cache."""


class InputError(MechscopeError, ValueError):
    """Bad input: tokens outside the vocabulary, clean/corrupt pairs of different lengths, ..."""


class OutputError(MechscopeError, OSError):
    """An output path that cannot be written without harm: a directory, a device, an input, ..."""


class DistributedError(MechscopeError, RuntimeError):
    """Work spread over Ray workers that cannot run: Ray missing, no cluster at an address, a shard
    whose worker keeps dying."""
