"""The one exception type the command line turns into a one-line message."""


class TcptraceError(Exception):
    """A problem the user can fix; str() is the whole message, exit code 1."""

    exit_code = 1
