"""Where a command speaks to the person running it: progress and notes go to stderr, one line at a time, flushed (so
they interleave rightly with a child process's and survive a kill), and stdout holds only the command's result.

Every module that reports progress takes a `say` callable defaulting to `say` here; a test passes its own to keep the
lines (`say=lines.append`). This module imports nothing: the light commands use it too.
"""

from __future__ import annotations

import sys


def say(text: str) -> None:
    """One line of progress or a note, on stderr."""
    print(text, file=sys.stderr, flush=True)
