"""User-facing configuration errors: the CLI prints them as one line and exits non-zero."""


class ConfigError(ValueError):
    """A bad value in the config or the data; the message names the key or row and what is allowed."""


class RewardError(ConfigError):
    """A reward function failed or returned something that is not a reward; the message names the
    function by import path and the completion."""


class EngineError(RuntimeError):
    """A rollout engine's server died, hung or refused a request; the message names the server and
    what it was doing. The CLI prints it as one line and exits non-zero."""
