"""The one exception type the command line turns into a one-line message, and exit codes."""

# Exit codes: 0 done (summary printed), 1 TcptraceError, 2 usage error (click),
# 130 = 128 + SIGINT: a second Ctrl-C, or Ctrl-C before tracing started (no summary).
EXIT_INTERRUPTED = 130


class TcptraceError(Exception):
    """A problem the user can fix; str() is the whole message, exit code 1."""

    exit_code = 1
