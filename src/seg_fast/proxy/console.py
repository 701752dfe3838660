"""One line on stderr from one process of a serve: the control process and its workers share the pipe."""

import os
import sys


def say(text: str) -> None:
    """Write ``seg-fast[pid]: text`` and its newline in one write: with stderr unbuffered
    (PYTHONUNBUFFERED, ``python -u``) print() writes the text and the newline apart, and two
    workers starting together then run their lines into one."""
    sys.stderr.write(f"seg-fast[{os.getpid()}]: {text}\n")
    sys.stderr.flush()
