"""Progress bars for the benchmark commands (tqdm), and a print that does not break them.

On a terminal the bar redraws in place several times a second. When stderr is not a
terminal (a log file on the GPU machine, CI), each redraw would be a new line in the log,
so the bar redraws at most every ``LOG_INTERVAL_S`` seconds there. ``RINGFLASH_PROGRESS=0``
turns the bars off.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from tqdm import tqdm

#: Seconds between redraws when stderr is not a terminal.
LOG_INTERVAL_S = 30.0


def progress_bar(total: int, desc: str, unit: str = "case", disable: Optional[bool] = None) -> tqdm:
    """A tqdm bar over ``total`` units with an ETA; ``disable=True`` (or the environment
    variable ``RINGFLASH_PROGRESS=0``) gives a bar that draws nothing but still accepts
    ``update``/``set_postfix_str``, so callers need no branches."""
    if disable is None:
        disable = os.environ.get("RINGFLASH_PROGRESS", "1") == "0"
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
        mininterval=0.1 if interactive else LOG_INTERVAL_S, file=sys.stderr,
    )


def show(bar: tqdm, text: str) -> None:
    """Name the case now running beside the bar. On a terminal the bar redraws at once; in a
    log it waits for the next timed redraw (an immediate one would add a line per case)."""
    bar.set_postfix_str(text, refresh=sys.stderr.isatty())


def write(message: str) -> None:
    """Print a line to stdout without tearing an active progress bar (tqdm clears the bar,
    prints, and redraws it)."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()
