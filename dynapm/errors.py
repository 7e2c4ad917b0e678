"""The exception hierarchy, defined once and raised by Python and Cython alike.

Each error that can reach a client carries the HTTP status it maps to.
"""


class DynaPMError(Exception):
    """Base class of every error DynaPM raises on purpose."""

    status = 500


class ConfigError(DynaPMError):
    """The configuration file is invalid. The CLI exits 2 with ``str(err)``.

    The message names the file, the line when YAML can tell it, the key path
    and the problem: ``conf.yaml:12: services.app.upstream: expected a URL``.
    """

    def __init__(self, problem, *, file, line=None, key=None):
        self.problem = problem
        self.file = file
        self.line = line
        self.key = key
        where = file if line is None else f"{file}:{line}"
        message = f"{where}: {key}: {problem}" if key else f"{where}: {problem}"
        super().__init__(message)


class StartError(DynaPMError):
    """A service could not be started or did not become ready in time."""

    status = 503

    def __init__(self, service, reason):
        self.service = service
        self.reason = reason
        super().__init__(f"service '{service}' failed to start: {reason}")


class CommandError(DynaPMError):
    """A lifecycle command (start, stop, check) failed."""
