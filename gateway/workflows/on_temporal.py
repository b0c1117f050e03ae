"""Workflow calls on the Temporal engine (``gateway.engine: temporal://…``): what :class:`~gateway.workflows.runs.Runs`
does with a call when runs live in Temporal, and how this replica's workers make the steps' calls.

A workflow call starts a run of the generic Temporal workflow (:mod:`gateway.workflows.temporal`) and awaits
its end; the result is what the local runner gives (the output as text and structured content, or an error
naming the failed step, ``_meta["io.patchbay/run"]`` the run id). A call with an idempotency key is the run
that key names, at any replica: the run's id is derived from the caller and the key, and Temporal starts a
workflow id once, so a re-issued call (after a replica died under it, say) gets the first call's run and
result. A caller that gives up does not cancel the run, as with a keyed local run.

Each step's call is an activity that any replica's worker makes through its own dispatch path (``invoke``),
so policies, limits, metrics and audit apply as for a local run, under the run's caller and with the step's
idempotency key. What needs the client that made the call (``ask_user``, ``ask_model``, progress) is not
carried to the replica that runs a step yet: such a step takes its ``default``, or fails saying so.
"""

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from gateway.dispatch import Invocation
from gateway.metrics import Metrics
from gateway.types import RUN_META_KEY, CallContext, JSONObject, Principal, ToolResult
from gateway.workflows.commands import AskModel, AskUser, CallTool, Leaf, StepError
from gateway.workflows.plan import Plan
from gateway.workflows.runner import IDEMPOTENCY_META_KEY, error_text, result_value
from gateway.workflows.runs import caller_scope
from gateway.workflows.temporal import TemporalEngine

__all__ = ["TemporalRuns", "run_id_for", "step_executor"]

InvokeFn = Callable[[str, JSONObject, CallContext], Awaitable[Invocation]]

CANCEL_LIMIT = 10.0
"""Seconds asking Temporal to cancel a run may take (the run's compensations go on there after)."""
NOT_CARRIED = "asking the caller is not available on the Temporal engine yet (the step runs on any replica)"


def run_id_for(principal: Principal, workflow: str, key: str) -> str:
    """The run id (Temporal's workflow id) of ``principal``'s call of ``workflow`` with idempotency ``key``."""
    digest = hashlib.sha256(json.dumps([caller_scope(principal), workflow, key]).encode()).hexdigest()
    return f"key-{digest[:32]}"


def step_executor(invoke: InvokeFn) -> Callable[[Leaf, str, dict[str, str]], Awaitable[tuple[Any, StepError | None]]]:
    """The ``execute`` of this replica's Temporal workers: a step's call through the dispatch path ``invoke``."""

    async def execute(command: Leaf, run_id: str, caller: dict[str, str]) -> tuple[Any, StepError | None]:
        if isinstance(command, AskUser | AskModel):
            if command.default is not None:
                return command.default, None
            return None, StepError("unavailable", NOT_CARRIED)
        assert isinstance(command, CallTool)
        context = CallContext(
            principal=Principal(caller.get("id", ""), caller.get("kind", "client")),
            meta={IDEMPOTENCY_META_KEY: command.idempotency_key} if command.idempotency_key else None,
            workflow_run=run_id,
            workflow_step=command.key,
        )
        result, outcome, retry_after = await invoke(command.tool, command.arguments, context)
        if result.input_required is not None:
            return None, StepError("unavailable", f"{command.tool} asked for input, which a workflow step cannot give")
        if result.is_error:
            return None, StepError(outcome, error_text(result), retry_after=retry_after)
        return result_value(result), None

    return execute


class TemporalRuns:
    """Workflow calls as runs on Temporal, through ``engine``."""

    def __init__(
        self, engine: TemporalEngine, *, metrics: Metrics | None = None, stopping: Callable[[], bool] = lambda: False
    ) -> None:
        """``stopping()`` tells whether this gateway is going down: a call cancelled then leaves its run to go on
        (another replica's workers carry it on); a call its caller cancelled cancels its run (unless keyed)."""
        self.engine = engine
        self._metrics = metrics
        self._stopping = stopping

    async def call(self, plan: Plan, arguments: Mapping[str, Any], context: CallContext, run_id: str) -> ToolResult:
        """Run ``plan`` as run ``run_id`` (or the run of that id started before) and return its result."""
        principal = context.principal
        key = (context.meta or {}).get(IDEMPOTENCY_META_KEY)
        if isinstance(key, str) and key:
            run_id = run_id_for(principal, plan.name, key)
        caller = {"kind": principal.kind, "id": principal.id}
        if self._metrics is not None:
            self._metrics.workflow_started(plan.name)
        try:
            ended = await self.engine.run(plan.name, arguments, caller, run_id)
        except anyio.get_cancelled_exc_class():
            # As a local run: an unkeyed call's run ends with its caller (compensated); a keyed one goes on.
            if not (isinstance(key, str) and key) and not self._stopping():
                with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_LIMIT):
                    await self.engine.cancel(run_id)
            raise
        status = str(ended.get("status"))
        if self._metrics is not None:
            self._metrics.workflow_run(plan.name, status if status in ("succeeded", "cancelled") else "failed")
        return _result(plan, run_id, ended)


def _result(plan: Plan, run_id: str, ended: Mapping[str, Any]) -> ToolResult:
    meta = {RUN_META_KEY: run_id}
    if ended.get("status") == "succeeded":
        output = ended.get("output")
        text = output if isinstance(output, str) else json.dumps(output, indent=2, ensure_ascii=False)
        structured = output if isinstance(output, Mapping) else None
        return ToolResult(({"type": "text", "text": text},), structured_content=structured, meta=meta)
    error = ended.get("error")
    described = StepError(**error).describe() if isinstance(error, Mapping) else "compensation did not finish"
    message = f"workflow {plan.name!r} failed: {described}"
    compensations = [StepError(**e).describe() for e in ended.get("compensation_errors") or ()]
    if compensations:
        message += "; " + "; ".join(compensations)
    message += f" (run {run_id})"
    return ToolResult(({"type": "text", "text": message},), is_error=True, meta=meta)
