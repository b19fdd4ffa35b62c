"""Exception types. Every user-facing error names the offending value and the limit."""


class MnemosyneError(Exception):
    """Base class for errors raised by Mnemosyne."""


class ConfigError(MnemosyneError, ValueError):
    """An impossible or unsupported configuration (model, layout, memory budget)."""


class InvalidRequestError(MnemosyneError, ValueError):
    """A request that can never be served: bad parameters, empty or over-long prompt."""


class ContextLengthError(InvalidRequestError):
    """A prompt plus its requested output tokens exceed the context limit or the KV capacity."""


class ModelLoadError(MnemosyneError, FileNotFoundError):
    """A model directory or file that is missing or unreadable."""


class WorkerError(MnemosyneError, RuntimeError):
    """A worker process failed, died or stopped answering; the engine cannot continue."""


class EngineCoreError(MnemosyneError, RuntimeError):
    """The engine core process (of `mnemosyne serve`) failed to start, died or froze."""
