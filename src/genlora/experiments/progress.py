"""Progress of the long phases (training, evaluation, ensemble evaluation, a comparison's cells).

On a terminal: tqdm bars (stderr). When stderr is not a terminal (redirected to a log file, CI): no carriage-return
clutter, but plain lines: one at most every `every_s` seconds while a phase runs, and one at its end, so a log shows
that work is moving without a line per batch.
`enabled=False` silences both (tests, tuning cells inside a comparison). `quiet_libraries` keeps the libraries'
own bars, reports and deprecation warnings out of the runner's logs, in the CLI and in every worker process.
"""

from __future__ import annotations

import os
import sys
import time
import warnings


def is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def quiet_libraries() -> None:
    """The runner's processes (the CLI's, and every `workers` process of a comparison, which starts a fresh
    interpreter) run offline and keep their logs to genlora's own lines: no hub access, no FutureWarnings or loading
    reports from transformers/PEFT that a user cannot act on, no "Loading weights" bars with carriage returns."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def say(prefix: str, message: str) -> None:
    """One line on stderr that does not break a running tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"{prefix}: {message}", file=sys.stderr)


class Progress:
    """`with Progress(total, "train") as bar: bar.update(1, loss=0.3)`."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, position: int = 0, leave: bool = False,
                 every_s: float = 10.0):
        self.total, self.desc, self.enabled = max(int(total), 0), desc, enabled
        self.done = 0
        self.postfix: dict[str, str] = {}
        self._bar = None
        self._every_s = every_s
        self._start = self._last_line = time.perf_counter()
        if enabled and is_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, leave=leave, position=position, dynamic_ncols=True,
                             file=sys.stderr)

    @property
    def on_terminal(self) -> bool:
        """Whether this shows a tqdm bar (rather than plain lines or nothing)."""
        return self._bar is not None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if postfix:
            self.postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in postfix.items()})
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(n)
        else:
            now = time.perf_counter()
            if self.done >= self.total or now - self._last_line >= self._every_s:
                self._last_line = now
                extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
                print(f"{self.desc}: {self.done}/{self.total} ({now - self._start:.0f} s)"
                      f"{' ' + extra if extra else ''}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
