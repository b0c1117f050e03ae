"""The clients of the Temporal runs this replica awaits: where a run's questions are asked.

A run on Temporal executes its steps on any replica holding its plan, but its client's request is held
by the replica that started the run (or took a re-issue of its keyed call). That replica registers the
request's client channel here, under the run id, while it awaits the run (:meth:`Callers.attend`); the
run's ``ask_user``, ``ask_model`` and ``agent`` questions come to it as an activity on its own queue, and are asked
through that channel (:meth:`Callers.ask`) by the code the local runner asks with
(:mod:`gateway.workflows.asking`). As for a detached local run, the client is whichever caller attached
last; a question asked while none is (a keyed call's caller gave up), or whose client went away mid-question,
waits for the next one to attend here (a re-issue at another replica moves the question there instead:
:class:`~gateway.workflows.temporal.PatchbayRun`'s ``attach`` signal).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gateway.errors import UpstreamError
from gateway.types import ClientChannel, JSONObject, Principal
from gateway.workflows.asking import ToolCatalog, ask, offered
from gateway.workflows.commands import AskAgent, AskModel, AskUser, CallTool, StepError
from gateway.workflows.runs import AttachedClient

__all__ = ["Callers"]


class _NoClient:
    """The channel of a caller without a client to ask (a workflow's step calling a workflow, say): asked
    nothing, as the local runner asks nothing of a call without one (the question takes its default)."""

    capabilities: JSONObject = {}
    protocol_version = ""

    async def request(self, method: str, params: JSONObject) -> JSONObject:
        raise UpstreamError(f"the caller has no client to answer {method}")

    async def log(self, params: JSONObject) -> None:
        return None


@dataclass
class _Attendance:
    client: AttachedClient
    count: int = 0
    """Callers awaiting the run here, plus questions being asked."""


class Callers:
    """The client channels of the runs awaited at this replica, by run id."""

    def __init__(self) -> None:
        self._runs: dict[str, _Attendance] = {}
        self.catalog: ToolCatalog | None = None
        """The tools each caller may call, which an ``agent``'s turn offers (the gateway sets it once assembled)."""

    @contextmanager
    def attend(self, run_id: str, client: ClientChannel | None) -> Iterator[None]:
        """While the block runs, questions of run ``run_id`` asked here go to ``client`` (or a later caller's)."""
        attendance = self._enter(run_id)
        attendance.client.attach(client if client is not None else _NoClient())
        try:
            yield
        finally:
            self._leave(run_id, attendance)

    def attending(self, run_id: str) -> bool:
        """Whether a caller (or a question) of run ``run_id`` is here now."""
        return run_id in self._runs

    async def ask(
        self, command: CallTool | AskUser | AskModel | AskAgent, run_id: str, caller: dict[str, str]
    ) -> tuple[Any, StepError | None]:
        """Ask the client of run ``run_id`` the question of ``command`` (the ask activity's ``execute``)."""
        if isinstance(command, CallTool):  # never sent here: calls go to the plan's queue
            return None, StepError("error", "internal error: a tool call reached the questions' queue")
        attendance = self._enter(run_id)
        try:
            if isinstance(command, AskAgent):
                tools = offered(self.catalog, Principal.of_caller(caller), command)
                return await ask(attendance.client, command, tools)
            return await ask(attendance.client, command)
        finally:
            self._leave(run_id, attendance)

    def _enter(self, run_id: str) -> _Attendance:
        attendance = self._runs.get(run_id)
        if attendance is None:
            attendance = self._runs[run_id] = _Attendance(AttachedClient(None))
        attendance.count += 1
        return attendance

    def _leave(self, run_id: str, attendance: _Attendance) -> None:
        attendance.count -= 1
        if attendance.count == 0 and self._runs.get(run_id) is attendance:
            del self._runs[run_id]
