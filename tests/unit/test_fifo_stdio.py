"""Opening containerd's stdout/stderr FIFOs for a container: with or without a reader there yet.

containerd's fifo package opens its read end in a goroutine, so under load the sandboxer can get to the
FIFO first; a plain O_WRONLY|O_NONBLOCK open then fails with ENXIO (found by tests/integration/test_churn.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from kuasar.common.fifo_stdio import open_fifo_for_writing


def test_fifo_with_a_reader_is_opened_write_only(tmp_path: Path) -> None:
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fd = open_fifo_for_writing(str(fifo))
        assert os.get_blocking(fd)
        os.write(fd, b"out")
        os.close(fd)
        assert os.read(reader, 16) == b"out"
    finally:
        os.close(reader)


def test_fifo_whose_reader_comes_late_is_opened_and_keeps_early_output(tmp_path: Path) -> None:
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    fd = open_fifo_for_writing(str(fifo))  # no reader yet: no ENXIO
    os.write(fd, b"early")  # no EPIPE either: it waits in the pipe
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert os.read(reader, 16) == b"early"
        os.close(fd)
        assert os.read(reader, 16) == b""  # and the reader still sees EOF once the writer is gone
    finally:
        os.close(reader)
