"""A benchmark path built and timed in a process of its own.

A competitor built in the benchmark's own process shares it with qcompile: the allocator, the
OpenMP and TBB pools, a second oneDNN, whatever its import sets. In one session on the 2-core
AMX VM, qcompile's ResNet-18 (batch 8) measured 15.6-16.7 ms per call, then 36-41 ms in every
call after ``openvino.compile_model`` had built the OpenVINO + NNCF model in the process (before
it ever ran; torch's oneDNN convolutions summed 10.4 ms of a call before, 27.1 after, and a
bf16 matmul on AMX 2.3 ms before, 3.7 after), three times in three scripts. An alternated A/B
later, each arm in its own process (qcompile alone against qcompile beside a compiled OpenVINO
model, 20 rounds), read 1.006x while the VM ran in its slow phase (bf16 matmul 7 ms): so the
VM's own drift may have made those transitions, and no mechanism was found (no OpenVINO thread
used CPU, no affinity changed). Building each competitor in its own process takes the question
out of every comparison, and a competitor that crashes its process leaves the benchmark running.

:class:`IsolatedPath` starts the process (``spawn``: a fresh interpreter that imports nothing of
the parent's state), which calls ``build()`` (a picklable function returning the table's
:class:`~benchmarks.cpu_int8.Row`, its ``run`` / ``run_one`` the calls to time) and sends the row
back without its calls; then :meth:`IsolatedPath.sample` asks it for the median of a block of
calls, timed inside that process, so the head-to-head line alternates processes as it
alternates calls. The process waits on its pipe between requests and uses no CPU.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from benchmarks.timing import block_ms

_READY_TIMEOUT_S = 3600.0  # building a competitor (NNCF's calibration, Inductor's compile) takes minutes


def _serve(build: Callable[[], Any], threads: int, connection: Connection) -> None:
    """The process's whole life: build the row, send it without its calls, then time calls."""
    torch.set_num_threads(threads)
    torch.backends.quantized.engine = "onednn"
    row = build()
    connection.send(dataclasses.replace(row, run=None, run_one=None))
    while (request := connection.recv()) is not None:
        block, one = request
        call = row.run_one if one else row.run
        connection.send(None if call is None else block_ms(call)(block))


class IsolatedPath:
    """One benchmark path living in a process of its own (see the module's doc)."""

    def __init__(self, build: Callable[[], Any]):
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(build, torch.get_num_threads(), child), daemon=True)
        self._process.start()
        child.close()
        if not self._connection.poll(_READY_TIMEOUT_S):
            self.close()
            raise TimeoutError(f"the isolated benchmark path did not build within {_READY_TIMEOUT_S:.0f} s")
        try:
            self.row = self._connection.recv()
        except EOFError as exc:
            self.close()
            raise RuntimeError(f"the isolated benchmark path's process died (exit code {self._process.exitcode})") \
                from exc

    def sample(self, block: int, one: bool = False) -> float | None:
        """The median ms of ``block`` calls (after one untimed call), timed in the path's process;
        None if the path has no such call."""
        self._connection.send((block, one))
        return self._connection.recv()

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._connection.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._connection.close()
