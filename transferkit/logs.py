"""What transferkit shows on stderr: progress and epoch lines for people using it from Python
(scripts, notebooks), and nothing of TensorFlow's start-up chatter (:func:`start_keras_quietly`).

transferkit logs to the ``"transferkit"`` logger. The command line configures logging itself; a
script or notebook that has not configured logging would see nothing, so the first long-running
call (extract, finetune, compare) gives the logger a plain handler on stderr, unless the
application has configured logging (the root or the transferkit logger has handlers). Configure
logging before that call to take over; ``logging.getLogger("transferkit").setLevel("WARNING")``
quiets it.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

LOGGER = "transferkit"


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which notebooks replace), one line per record, and
    steps aside once the application configures the root logger itself."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the current sys.stderr is used instead
        pass

    def emit(self, record):
        if not logging.getLogger().handlers:  # else the record reaches the application's handlers
            super().emit(record)


def log_to_stderr_unless_configured() -> None:
    """Show transferkit's INFO lines on stderr if nobody configured logging (see the module docstring)."""
    logger = logging.getLogger(LOGGER)
    if logger.handlers or logging.getLogger().handlers:
        return
    logger.addHandler(_StderrHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def start_keras_quietly() -> None:
    """Import Keras and start its backend with TensorFlow's C++ start-up chatter kept off the terminal.

    TensorFlow prints a few lines before its logging is initialised, which no environment setting
    silences. They are captured and shown only if the start-up fails.
    """
    if "keras" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import keras
            keras.ops.convert_to_numpy(keras.ops.zeros(1))  # device start-up prints too
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
