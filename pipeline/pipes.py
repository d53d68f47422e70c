"""`pipe:COMMAND` shards: the standard output of a shell command, read with a deadline.

A shard streamed from object storage (``pipe:curl -s https://host/train-000000.tar``) is a
command that can stall for ever (a dead connection, a prompt for credentials). Every read waits
at most `timeout` seconds for the next bytes; then the command is killed and an InputError names
the shard, so training stops with one line instead of hanging. The command runs in its own
process group, so a pipeline of several commands is killed whole.
"""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
from typing import BinaryIO

from lresnet.core.errors import InputError

# a command stopped because its reader closed early (SIGPIPE), directly or as a shell reports it
_CLOSED_EARLY = (-signal.SIGPIPE, 128 + signal.SIGPIPE)


class _CommandOutput(io.RawIOBase):
    """The raw standard output of `command`; each read waits at most `timeout` seconds for data."""

    def __init__(self, command: str, timeout: float, name: str):
        super().__init__()
        self.command, self.timeout, self.name = command, timeout, name
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=0,
                                     start_new_session=True)
        self._fd = self.proc.stdout.fileno()
        self._killed = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self._fd], [], [], self.timeout)
        if not ready:
            self._kill()
            raise InputError(self.name, f"the pipe command sent no data for {self.timeout:g} s "
                             "(data.pipe_timeout); is it hanging?")
        return os.readv(self._fd, [buffer])

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended meanwhile
                pass
        self._killed = True

    def close(self) -> None:
        """Close the pipe and reap the command (killed if it does not end within the timeout).

        Raises:
            OSError: the command failed (a non-zero exit status other than a closed pipe).
        """
        if self.closed:
            return
        super().close()
        self.proc.stdout.close()
        try:
            status = self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:  # still running after its output was closed: stop it
            self._kill()
            status = self.proc.wait()
        if status != 0 and status not in _CLOSED_EARLY and not self._killed:
            raise OSError(f"command {self.command!r} exited with status {status}")


def open_pipe(command: str, timeout: float, name: str, bufsize: int = 1 << 20) -> BinaryIO:
    """A buffered binary stream of `command`'s standard output (see the module docstring).

    Args:
        command: a shell command line.
        timeout: seconds any read may wait for data before the command is killed.
        name: what errors name (the shard URL).
    Raises (on read): InputError: no data within `timeout`. (On close): OSError: the command failed.
    """
    return io.BufferedReader(_CommandOutput(command, timeout, name), buffer_size=bufsize)
