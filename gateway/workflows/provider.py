"""Workflows served as tools: the provider the registry lists them from and the dispatcher calls.

A workflow's tool has the workflow's ``input`` as its ``inputSchema`` (and ``output_schema`` as its
``outputSchema``); its arguments are validated before anything runs, every violation listed with
its JSON path, and the schema's ``default`` values fill in what the caller omitted.

It is a provider like any other (``gateway.types.Provider``): always up, listing the workflow tools,
no prompts, and (when there are workflows) one resource template, ``patchbay://runs/{run_id}``: the
timeline of a run, which only the client that started it can read (for any other it does not exist);
while it runs, it owns the task group where the runs of 2026-07-28 clients wait for their answers.
"""

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
from anyio.abc import TaskGroup
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from gateway.errors import ConfigProblem, InvalidArguments, ResourceNotFound, ToolNotFound, UpstreamError
from gateway.requeststate import STATE_PREFIX, StateSigner, request_digest
from gateway.roundtrip import RoundTrips, needs_round_trip
from gateway.store import Store
from gateway.store.memory import MemoryStore
from gateway.tasks import task_of
from gateway.types import (
    CallContext,
    JSONObject,
    Listing,
    ProviderEvents,
    ProviderState,
    Resource,
    Tool,
    ToolResult,
)
from gateway.workflows.defaults import with_defaults
from gateway.workflows.history import Redact, timeline
from gateway.workflows.plan import Plan
from gateway.workflows.runner import Runner
from gateway.workflows.runs import Runs
from policies.redaction import Redactor
from policies.validation import violations

__all__ = ["RUNS_TEMPLATE", "WORKFLOW_PROVIDER", "WorkflowProvider"]

WORKFLOW_PROVIDER = "@workflows"
"""The provider name of workflow tools (no server can have it)."""
RUNS_TEMPLATE = "patchbay://runs/{run_id}"
"""The URI template of a run's timeline (the run id is in a workflow result's ``_meta["io.patchbay/run"]``)."""
_RUNS_PREFIX = RUNS_TEMPLATE.removesuffix("{run_id}")


class WorkflowProvider:
    """Lists the workflows as tools and runs one per call."""

    name = WORKFLOW_PROVIDER
    state = ProviderState.UP
    last_error: str | None = None
    warnings: tuple[str, ...] = ()
    problems: tuple[ConfigProblem, ...] = ()

    def __init__(
        self,
        plans: Mapping[str, Plan],
        runner: Runner,
        background: Callable[[], TaskGroup | None] | None = None,
        *,
        runs: Runs | None = None,
        redact: Redact | None = None,
        signer: StateSigner | None = None,
        store: Store | None = None,
    ) -> None:
        """``background`` gives the task group that runs wait in for a 2026-07-28 client's answers; by
        default, the one :meth:`run` holds (none before it runs: such a run is then answered inline).
        ``runs`` starts and attaches to the runs (idempotency keys); by default, one of its own over
        an in-memory store. ``redact`` redacts what a run's resource shows (by default, with the built-in
        rules of the audit trail). ``signer`` mints the ``requestState`` of runs waiting for answers (by default
        with a random key); with a ``store`` shared by replicas, their retries are relayed through it to the
        replica where the run waits (:attr:`round_trips`)."""
        self.plans = plans
        self.runner = runner
        self.runs = runs if runs is not None else Runs(runner, MemoryStore(), plans)
        self._redact = redact or Redactor().redact
        self._tasks: TaskGroup | None = None
        self.round_trips = RoundTrips(background or (lambda: self._tasks), signer=signer, store=store, name="workflows")
        """The runs waiting for a 2026-07-28 client's answers."""
        self.tools = tuple(_tool(plan) for plan in plans.values())
        """The workflows as tools, in the order the config lists them."""
        self.listing = Listing(tools=self.tools, resources=(_RUNS_RESOURCE,) if plans else ())
        """The workflow tools, and (when there are workflows) the template of their runs' resources."""
        self._validators: dict[str, Validator] = {}
        self._output_validators: dict[str, Validator] = {}
        for name, plan in plans.items():
            schema = plan.workflow.input
            self._validators[name] = validator_for(schema)(schema)
            if (output := plan.workflow.output_schema) is not None:
                self._output_validators[name] = validator_for(output)(output)

    async def run(
        self, events: ProviderEvents, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the task group of waiting runs until cancelled or closed (the listing never changes)."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tasks = None

    async def close(self) -> None:
        """Cancel the runs waiting for a client's answers, and stop."""
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()

    async def list_tools(self) -> Sequence[Tool]:
        return self.tools

    async def request(self, method: str, params: JSONObject, context: CallContext) -> JSONObject:
        """Read a run's timeline (``resources/read`` of ``patchbay://runs/<id>``); workflows offer nothing else.

        Raises:
            ResourceNotFound: no such run, or not one the caller started (the same answer for both).
            UpstreamError: any other request.
        """
        if method == "resources/read":
            uri = str(params.get("uri", ""))
            run_id = uri.removeprefix(_RUNS_PREFIX) if uri.startswith(_RUNS_PREFIX) else ""
            record = await self.runs.get(run_id, context.principal) if run_id and "/" not in run_id else None
            if record is None:
                raise ResourceNotFound(uri)
            view = timeline(record, await self.runs.events(run_id), self._redact)
            text = json.dumps(view, indent=2, ensure_ascii=False)
            return {"contents": [{"uri": uri, "mimeType": "application/json", "text": text}]}
        raise UpstreamError(f"workflows offer no prompts and no other resources ({method})", server=self.name)

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        """Run workflow ``name``.

        Raises:
            ToolNotFound: no such workflow.
            InvalidArguments: the arguments do not satisfy the workflow's ``input`` schema (nothing ran).
        """
        plan = self.plans.get(name)
        if plan is None:
            raise ToolNotFound(name)
        if context.request_state is not None and context.request_state.startswith(STATE_PREFIX):
            # a 2026-07-28 client's answers
            return await self.round_trips.resume(context, request=request_digest(name, arguments))
        # The gateway's chain has validated them already; this guards calls made to the provider directly.
        problems = violations(self._validators[name], arguments)
        if problems:
            raise InvalidArguments(f"invalid arguments for workflow {name!r}: {'; '.join(problems)}")
        given = with_defaults(plan.workflow.input, arguments)
        if context.task is not None:  # the client polls for the result: the run goes on after this call returns
            record = await self.runs.start_task(plan, given, context, context.task)
            return ToolResult(content=(), task=task_of(record))

        async def run(run_context: CallContext) -> ToolResult:
            return self._checked(name, await self.runs.call(plan, given, run_context))

        if needs_round_trip(context):
            return await self.round_trips.start(run, context, request=request_digest(name, arguments))
        return await run(context)

    def _checked(self, name: str, result: ToolResult) -> ToolResult:
        """``result``, or an error when it does not match the workflow's ``output_schema``."""
        checker = self._output_validators.get(name)
        if checker is None or result.is_error:
            return result
        wrong = violations(checker, result.structured_content) if result.structured_content is not None else []
        if result.structured_content is None or wrong:
            detail = "; ".join(wrong) if result.structured_content is not None else "it is not an object"
            message = f"workflow {name!r} produced an output that does not match its output_schema: {detail}"
            return ToolResult.text(message, is_error=True)
        return result


_RUNS_RESOURCE = Resource(
    RUNS_TEMPLATE,
    {
        "uriTemplate": RUNS_TEMPLATE,
        "name": "workflow-run",
        "title": "Workflow run",
        "description": (
            "The timeline of a workflow run you started: each step's start, end, duration, attempts, outcome,"
            " arguments and result (secrets redacted), the compensations, and the run's output or error."
            ' The run id is in the workflow result\'s _meta["io.patchbay/run"].'
        ),
        "mimeType": "application/json",
    },
    template=True,
)


def _tool(plan: Plan) -> Tool:
    workflow = plan.workflow
    definition: dict[str, Any] = {
        "name": plan.name,
        "description": workflow.description or f"Workflow {plan.name}.",
        "inputSchema": workflow.input,
        "execution": {"taskSupport": "optional"},  # a client may run it as an MCP task (gateway.tasks)
    }
    if workflow.output_schema is not None:
        definition["outputSchema"] = workflow.output_schema
    return Tool(plan.name, definition)
