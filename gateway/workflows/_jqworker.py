"""The jq worker process: ``python -P _jqworker.py MEMORY_LIMIT CPU_SECONDS``, and the protocol it speaks.

Started and spoken to by :mod:`gateway.workflows._jqsafe`. It answers requests from stdin on stdout,
one at a time, under ``RLIMIT_AS`` (the memory limit) and ``RLIMIT_CPU`` (its own time bound, should
the gateway die mid-evaluation), with no core file and a bounded C stack. A request is the program's
and the input's lengths (:data:`REQUEST`), then both, UTF-8; an answer is a status and the payload's
length (:data:`ANSWER`), then the payload: the first output as JSON, jq's error, or nothing. Run as a
script (``-P``: its directory does not go on ``sys.path``), it imports the standard library and
``jq`` only.
"""

import json
import os
import resource
import select
import struct
import sys
import time
from collections import OrderedDict
from typing import Any

import jq

__all__ = ["ANSWER", "EMPTY", "ERROR", "NO_MEMORY", "OUTPUT", "READY", "REQUEST", "serve"]

REQUEST = struct.Struct("<II")
"""Program and input lengths; then both, UTF-8."""
ANSWER = struct.Struct("<BI")
"""Status and payload length; then the payload."""
READY, OUTPUT, EMPTY, ERROR, NO_MEMORY = range(5)
"""The statuses of an answer (``READY``: the worker's first, once it has started)."""

_STACK_LIMIT = 8 * 2**20  # the worker's C stack: converting an output nested ~100 000 deep overflows it
_WORKER_SPIN = 50e-6  # seconds the worker polls for the next request before it sleeps (steps of a chain)
_CACHE_SIZE = 4096  # compiled programs a worker keeps (≈4 KiB each; compiling one takes ≈1.5 ms)


def serve(memory_limit: int, cpu_seconds: int) -> None:
    """Answer requests from stdin on stdout until stdin ends."""
    _limit(resource.RLIMIT_CORE, 0)  # an abort leaves no core file behind
    _limit(resource.RLIMIT_AS, memory_limit)
    _limit(resource.RLIMIT_STACK, _STACK_LIMIT)  # deep recursion in C crashes alike everywhere
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)  # the protocol's pipes are not jq's stdin and stdout
    os.dup2(null, 1)
    os.set_blocking(2, False)  # `debug` output the gateway has not read yet is dropped, never waited on
    programs: OrderedDict[bytes, Any] = OrderedDict()
    answers.write(ANSWER.pack(READY, 0))
    answers.flush()
    incoming = select.poll()
    incoming.register(requests.fileno(), select.POLLIN)
    while True:
        # One request at a time (the caller waits for each answer), so none sits in the read buffer
        # unseen by poll; a request that follows at once is caught without sleeping.
        spin_until = time.monotonic() + _WORKER_SPIN
        while not incoming.poll(0) and time.monotonic() < spin_until:
            pass
        if len(header := requests.read(REQUEST.size)) != REQUEST.size:
            break
        program_size, input_size = REQUEST.unpack(header)
        source, text = requests.read(program_size), requests.read(input_size)
        _limit(resource.RLIMIT_CPU, int(time.process_time()) + cpu_seconds)
        status, payload = _evaluate(programs, source, text)
        answers.write(ANSWER.pack(status, len(payload)) + payload)
        answers.flush()


def _limit(kind: int, value: int) -> None:
    """Lower the soft limit ``kind`` to ``value``, or to the hard limit if that is lower."""
    hard = resource.getrlimit(kind)[1]
    resource.setrlimit(kind, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))


def _evaluate(programs: OrderedDict[bytes, Any], source: bytes, text: bytes) -> tuple[int, bytes]:
    try:
        program = programs.get(source)
        if program is None:
            program = programs[source] = jq.compile(source.decode())
            if len(programs) > _CACHE_SIZE:
                programs.popitem(last=False)
        else:
            programs.move_to_end(source)
        output = program.input_text(text.decode()).first()
        return OUTPUT, json.dumps(output).encode()
    except StopIteration:
        return EMPTY, b""
    except ValueError as exc:  # jq's errors, at run time (or compile time: the gateway compiled it first)
        return ERROR, str(exc).encode()
    except RecursionError:
        return ERROR, b"output nested too deeply"
    except MemoryError:
        return NO_MEMORY, b""


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
