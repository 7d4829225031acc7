"""Exit codes and the errors that map onto them.

One table, used by every script:

    0  pass            every check passed
    1  fail            a check ran and found a mismatch (the verdict)
    2  usage error     bad flag, bad or missing checkpoint, shapes that do not fit, dtype the device lacks
    3  not available   the device, its backend module, or an engine / engine capability is not present here
    4  internal error  an unexpected exception inside the kit (a bug: the traceback is printed)
"""

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERNAL = 4

EXIT_CODES_HELP = (
    "exit codes: 0 pass, 1 check failed, 2 usage error / bad input, "
    "3 device, backend or engine not available, 4 internal error"
)


class KitError(Exception):
    """An error with a one-line message for the user and an exit code."""

    exit_code = EXIT_INTERNAL


class UsageError(KitError):
    """Bad input: the message names the problem and the fix."""

    exit_code = EXIT_USAGE


class NotWhatWasAsked(KitError):
    """The engine attests it ran something other than `--require` asked for: the check's verdict (fail)."""

    exit_code = EXIT_FAIL


class EngineFailed(KitError):
    """The engine under test stopped working mid-check (a worker or rank died, hung or raised): its verdict (fail)."""

    exit_code = EXIT_FAIL


class Unavailable(KitError):
    """Something the run needs is not present on this machine."""

    exit_code = EXIT_UNAVAILABLE
