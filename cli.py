"""How every command line of the library ends: one rule for a user's mistake and for a bug.

A user's mistake (a bad option value, a missing file or folder, a folder with one class, a file that
is not a zip) is one line on standard error, ``<prog>: error: <what to change>``, and exit status 2,
as argparse reports a bad option. The library raises ``ValueError`` or an ``OSError`` (e.g.
``FileNotFoundError``) naming the argument or the path for those, so ``run`` turns exactly these into
that line. Anything else is a bug and keeps its traceback; ``SIAMESE_TRIPLET_TRACEBACK=1`` shows the
traceback of a user error too (for a bug report).

Each command line is ``python <module>.py ...`` ending in ``sys.exit(cli.run(main, "<module>.py"))``, its
options read by ``cli.ArgumentParser``: argparse's parser whose mistakes (an unknown option, a bad value)
raise ValueError instead of printing the usage and exiting, so that ``run`` reports them by the same rule
(one line, exit status 2); ``--help`` prints the help and exits 0 as ever. ``whole_number`` is the type of
an option that takes a count.
"""

import argparse
import os
import sys

USER_ERRORS = (ValueError, OSError)  # what the library raises for a bad argument, path or file
USAGE_ERROR_STATUS = 2  # argparse's status for a bad option; the same for every user error
TRACEBACK_VARIABLE = "SIAMESE_TRIPLET_TRACEBACK"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser (and its subcommands' parsers) whose mistakes reach ``run`` as a ValueError: one line,
    exit status 2, like every other user's error."""

    def error(self, message):
        raise ValueError(message)


def whole_number(smallest=1):
    """An argparse ``type`` for an option that takes a whole number of at least ``smallest``: the option's text
    -> its int; anything else (``"1.5"``, ``"two"``, a smaller number) is refused by the parser, naming the
    option, before the command does any work."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < smallest:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {smallest}, got {text!r}")
        return value

    return parse


def run(main, prog, argv=None):
    """Call ``main(argv)`` and return the process's exit status: 0 when it returns a truthy result,
    1 for a falsy one, ``USAGE_ERROR_STATUS`` (2) after printing ``<prog>: error: <message>`` for a
    user's mistake (``USER_ERRORS``); any other exception propagates with its traceback."""
    try:
        result = main(argv)
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0"):
            raise
        print(f"{prog}: error: {error_message(error)}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    if isinstance(result, int) and not isinstance(result, bool):
        return result  # main returned an exit status itself
    return 0 if result else 1


def error_message(error):
    """The one line a user sees for ``error``: its message (an OSError's ``strerror: filename`` when it
    has no message of its own), on one line."""
    text = str(error)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.strerror}: {error.filename}"
    return " ".join(text.split()) or type(error).__name__
