"""Command-line plumbing shared by every script: the argument parser and the main-function wrapper."""

import argparse
import os
import sys
import traceback

from .errors import EXIT_CODES_HELP, EXIT_INTERNAL, EXIT_USAGE, KitError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit 2) and the exit-code table in --help."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs["epilog"] = ((kwargs.get("epilog") or "") + "\n\n" + EXIT_CODES_HELP).strip()
        super().__init__(**kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def run(main, argv=None):
    """Call `main(argv)` and turn its outcome into an exit code; KitErrors print one line."""
    prog = os.path.basename(sys.argv[0])
    try:
        return main(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KitError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug in the kit or an engine: keep the traceback, it is what a report needs
        traceback.print_exc()
        print(f"{prog}: internal error (exit {EXIT_INTERNAL}); please report it with the traceback above",
              file=sys.stderr)
        return EXIT_INTERNAL
