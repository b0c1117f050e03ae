"""Workflows served as tools: the provider the registry lists them from and the dispatcher calls.

A workflow's tool has the workflow's ``input`` as its ``inputSchema`` (and ``output_schema`` as its
``outputSchema``); its arguments are validated before anything runs, every violation listed with
its JSON path.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from gateway.errors import InvalidArguments, ToolNotFound
from gateway.types import CallContext, JSONObject, Tool, ToolResult
from gateway.workflows.plan import Plan
from gateway.workflows.runner import Runner

__all__ = ["WORKFLOW_PROVIDER", "WorkflowProvider"]

WORKFLOW_PROVIDER = "@workflows"
"""The provider name of workflow tools (no server can have it)."""


class WorkflowProvider:
    """Lists the workflows as tools and runs one per call."""

    name = WORKFLOW_PROVIDER

    def __init__(self, plans: Mapping[str, Plan], runner: Runner) -> None:
        self.plans = plans
        self.runner = runner
        self.tools = tuple(_tool(plan) for plan in plans.values())
        """The workflows as tools, in the order the config lists them."""
        self._validators: dict[str, Validator] = {}
        for name, plan in plans.items():
            schema = plan.workflow.input
            self._validators[name] = validator_for(schema)(schema)

    async def list_tools(self) -> Sequence[Tool]:
        return self.tools

    async def call_tool(self, name: str, arguments: JSONObject, context: CallContext) -> ToolResult:
        """Run workflow ``name``.

        Raises:
            ToolNotFound: no such workflow.
            InvalidArguments: the arguments do not satisfy the workflow's ``input`` schema (nothing ran).
        """
        plan = self.plans.get(name)
        if plan is None:
            raise ToolNotFound(name)
        errors = sorted(self._validators[name].iter_errors(dict(arguments)), key=lambda e: e.json_path)
        if errors:
            problems = "; ".join(f"{error.json_path}: {error.message}" for error in errors)
            raise InvalidArguments(f"invalid arguments for workflow {name!r}: {problems}")
        return await self.runner.run(plan, arguments, context)


def _tool(plan: Plan) -> Tool:
    workflow = plan.workflow
    definition: dict[str, Any] = {
        "name": plan.name,
        "description": workflow.description or f"Workflow {plan.name}.",
        "inputSchema": workflow.input,
    }
    if workflow.output_schema is not None:
        definition["outputSchema"] = workflow.output_schema
    return Tool(plan.name, definition)
