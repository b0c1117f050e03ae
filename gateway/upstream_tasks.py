"""Upstream tasks: an upstream server's MCP tasks, passed through to the client whose call created them.

A client's task-augmented call of an upstream tool that can run as a task takes the one dispatch path
(policies, limits, audit and metrics see the call that creates the task) and the upstream answers with its
task (2025-11-25, on the gateway's handshake session, ``connectors.mcp``). The client is given that task
under an id of the gateway's, which routes its ``tasks/*`` requests back to the upstream::

    patchbay-task:<base64url({"s": server, "t": upstream task id, "n": tool, "p": principal})>.<HMAC>

The id is sealed with the gateway's key (``gateway.state_key``, as ``requestState`` values are), so it
needs no table, survives a restart when the key is configured, and any replica can serve it. It is bound
to the client that created the task: presented by another client, or altered, it is "task not found",
exactly as an unknown id is, never a hint that it exists. The upstream's own task ids are never shown.

Era translation (the client's era, whatever the upstream's):

* 2025-11-25 clients get the upstream's ``Task`` with the gateway's id; ``tasks/result`` waits for the task
  to end (polling ``tasks/get``, so no one request outlasts the server's timeout), then gives the upstream's
  result, its related-task ``_meta`` naming the gateway's id.
* 2026-07-28 clients (tasks extension, ``gateway.tasks``) get ``resultType: "task"``; ``tasks/get`` inlines
  the ``result`` once the task has ended with one (the upstream's ``failed`` with an ``isError`` result is
  ``completed`` there) or the ``error`` the upstream's ``tasks/result`` answered; an upstream task waiting
  for input (``input_required``) is ``working`` (its questions reach the client only on the handshake era's
  ``tasks/result`` stream); ``tasks/update`` is acknowledged, ``tasks/cancel`` acknowledges with nothing.

``tasks/list`` gives a client its upstream tasks created through this gateway process (the newest
:data:`LISTED_PER_CLIENT`), each as the upstream says it is now; an upstream's own ``tasks/list`` is not
passed through, as it lists the tasks of every client of the gateway's shared session.
"""

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from gateway.errors import TaskError, UpstreamError, UpstreamRefused
from gateway.requeststate import StateSigner
from gateway.tasks import NOT_FOUND, extension_task
from gateway.types import (
    TASK_ANSWERS_NOW,
    CallContext,
    JSONObject,
    Principal,
    Provider,
    task_poll_seconds,
    tied_to_task,
)

__all__ = ["LISTED_PER_CLIENT", "TASK_PREFIX", "UpstreamTasks"]

TASK_PREFIX = "patchbay-task:"
"""How every task id the gateway gives for an upstream's task starts."""
LISTED_PER_CLIENT = 100
"""How many of a client's most recent upstream tasks ``tasks/list`` shows."""

_ENDED = frozenset({"completed", "failed", "cancelled"})
_INTERNAL_ERROR = -32603


@dataclass(frozen=True, slots=True)
class _Ref:
    """Where a client's task lives: the upstream, its id there, and the tool whose call created it."""

    server: str
    task_id: str
    tool: str


class UpstreamTasks:
    """The ``tasks/*`` methods of both eras for upstream tasks, in wire form, each task only for its creator."""

    def __init__(self, providers: Callable[[], Mapping[str, Provider]], signer: StateSigner) -> None:
        self._providers = providers
        self._signer = signer
        self._recent: dict[str, deque[str]] = {}

    @staticmethod
    def owns(task_id: str) -> bool:
        """Whether ``task_id`` is one of these (else a workflow run's, or unknown)."""
        return task_id.startswith(TASK_PREFIX)

    def created(self, server: str, tool: str, task: JSONObject, principal: Principal) -> dict[str, Any]:
        """The task an upstream created for ``principal``'s call of ``tool``, as that client is given it
        (2025-11-25 ``Task`` shape, the gateway's id)."""
        payload = {"s": server, "t": str(task["taskId"]), "n": tool, "p": _key(principal)}
        task_id = self._signer.seal(TASK_PREFIX, payload)
        recent = self._recent.setdefault(_key(principal), deque(maxlen=LISTED_PER_CLIENT))
        recent.appendleft(task_id)
        return {**task, "taskId": task_id}

    async def get(self, task_id: str, context: CallContext, *, modern: bool) -> dict[str, Any]:
        """``tasks/get``: the task now (2026-07-28: with its result or error once it has ended).

        Raises:
            TaskError: not found (or not the caller's); the upstream refused or could not be reached.
        """
        ref = self._ref(task_id, context.principal)
        task = {**await self._ask(ref, "tasks/get", context), "taskId": task_id}
        return await self._detailed(ref, task, context) if modern else task

    async def result(self, task_id: str, context: CallContext) -> dict[str, Any]:
        """2025-11-25 ``tasks/result``: waits for the task to end, then gives the upstream's result.

        Raises:
            TaskError: not found; the upstream's error for a task that left no result (its code).
        """
        ref = self._ref(task_id, context.principal)
        task = await self._ask(ref, "tasks/get", context)
        while task.get("status") not in TASK_ANSWERS_NOW:
            await anyio.sleep(task_poll_seconds(task))
            task = await self._ask(ref, "tasks/get", context)
        return tied_to_task(await self._ask(ref, "tasks/result", context), task_id)

    async def cancel(self, task_id: str, context: CallContext, *, modern: bool) -> dict[str, Any]:
        """``tasks/cancel``, passed to the upstream. 2025-11-25 answers with the task (or the upstream's
        refusal of one that has ended); 2026-07-28 acknowledges with nothing, even for one that has ended.

        Raises:
            TaskError: not found; (2025-11-25) the upstream refused.
        """
        ref = self._ref(task_id, context.principal)
        if not modern:
            return {**await self._ask(ref, "tasks/cancel", context), "taskId": task_id}
        task = await self._ask(ref, "tasks/get", context)
        if task.get("status") not in _ENDED:
            try:
                await self._ask(ref, "tasks/cancel", context)
            except TaskError:
                pass  # it ended meanwhile: the extension acknowledges that too
        return {}

    async def update(self, task_id: str, context: CallContext) -> dict[str, Any]:
        """2026-07-28 ``tasks/update``: acknowledged (an upstream's questions reach a client only on the
        handshake era's ``tasks/result`` stream, so no response answers one here: ignored, as the extension says).

        Raises:
            TaskError: not found.
        """
        await self._ask(self._ref(task_id, context.principal), "tasks/get", context)
        return {}

    async def listed(self, context: CallContext) -> list[dict[str, Any]]:
        """The client's upstream tasks created through this process, newest first, as their upstreams say they
        are now (2025-11-25 shape); tasks an upstream no longer knows, or cannot say now, are left out."""
        ids = list(self._recent.get(_key(context.principal), ()))
        found: dict[str, dict[str, Any]] = {}

        async def fetch(task_id: str) -> None:
            try:
                found[task_id] = await self.get(task_id, context, modern=False)
            except TaskError:
                return

        async with anyio.create_task_group() as tg:
            for task_id in ids:
                tg.start_soon(fetch, task_id)
        return [found[task_id] for task_id in ids if task_id in found]

    def _ref(self, task_id: str, principal: Principal) -> _Ref:
        payload = self._signer.unseal(task_id, TASK_PREFIX)
        if payload is None or payload.get("p") != _key(principal):
            raise TaskError(NOT_FOUND)
        return _Ref(str(payload["s"]), str(payload["t"]), str(payload["n"]))

    async def _ask(self, ref: _Ref, method: str, context: CallContext) -> dict[str, Any]:
        """``method`` for the task, on its upstream: the raw answer.

        Raises:
            TaskError: the upstream answered with an error (its code), or could not be asked (-32603).
        """
        provider = self._providers().get(ref.server)
        if provider is None:  # the server left the config: its tasks went with it
            raise TaskError(NOT_FOUND)
        try:
            return dict(await provider.request(method, {"taskId": ref.task_id}, context))
        except UpstreamRefused as exc:
            raise TaskError(str(exc), code=exc.code, data=exc.data) from None
        except UpstreamError as exc:
            raise TaskError(str(exc), code=_INTERNAL_ERROR) from None

    async def _detailed(self, ref: _Ref, task: dict[str, Any], context: CallContext) -> dict[str, Any]:
        """The upstream's task (2025-11-25) as the 2026-07-28 extension's ``tasks/get`` answers it."""
        status = task.get("status")
        if status == "input_required":
            return extension_task({**task, "status": "working"})
        if status not in ("completed", "failed"):
            return extension_task(task)
        try:
            result = await self._ask(ref, "tasks/result", context)
        except TaskError as exc:  # the task left an error, not a result
            error = {"code": exc.code, "message": str(exc)}
            return {**extension_task({**task, "status": "failed"}), "error": error}
        return {**extension_task({**task, "status": "completed"}), "result": tied_to_task(result, None)}


def _key(principal: Principal) -> str:
    return f"{principal.kind}:{principal.id}"
