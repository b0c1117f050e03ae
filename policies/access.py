"""Access rules: which caller may see and call which tools (``policies:`` deny/allow, ``clients.<name>.tools``).

A call is refused when, in this order:

1. a **deny** rule applies to it: its globs match the tool, it is for every caller or for this
   client, and its ``if`` condition (if any) holds over ``{arguments, client, tool}``;
2. the caller is a configured client with a ``tools:`` list that does not match the tool;
3. some **allow** rule applies to the caller and none of them both matches the tool and has its
   ``if`` hold.

Deny wins, whatever the order of the rules in the file. Rules naming ``clients`` and a client's
own ``tools:`` list judge what that client calls directly; a workflow's steps are judged only by
rules for every caller, since the workflow (not the client) chose them. A condition that cannot be
evaluated counts against the call: a deny applies, an allow does not. The decision itself is
synchronous; a condition it needs is awaited outside it (jq runs in a worker process, and must not
block the event loop), then the decision is taken again, knowing it.

``tools/list`` shows a caller exactly the tools it could call: deny rules with a condition do not
hide a tool (some arguments may pass) and allow rules with one do not hide it either.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.config import AccessRule, ClientConfig
from gateway.errors import Forbidden
from gateway.types import CallNext, Principal, ToolCall, ToolResult
from policies._globs import matcher

__all__ = ["AccessPolicy"]


@dataclass(frozen=True, slots=True)
class _Rule:
    label: str
    deny: bool
    tools: re.Pattern[str]
    clients: re.Pattern[str] | None
    rule: AccessRule
    conditional: bool
    """The rule has an ``if``; read once, since pydantic's private attributes are slow to reach."""

    def for_caller(self, principal: Principal, step: bool) -> bool:
        if self.clients is None:
            return True
        return not step and principal.kind == "client" and self.clients.fullmatch(principal.id) is not None


class _Unknown(Exception):
    """The decision needs the condition of ``rule``, not evaluated yet."""

    def __init__(self, rule: _Rule) -> None:
        self.rule = rule


class AccessPolicy:
    """Refuses calls the access rules do not permit (:class:`~gateway.errors.Forbidden`); filters listings."""

    def __init__(self, rules: Sequence[AccessRule], clients: Mapping[str, ClientConfig]) -> None:
        """``rules``: in file order; each is named by its ``id`` in refusals."""
        self._rules = [
            _Rule(
                rule.id,
                rule.deny is not None,
                matcher(rule.tools),
                matcher(rule.clients) if rule.clients is not None else None,
                rule,
                rule.if_ is not None,
            )
            for rule in rules
        ]
        self._denies = [rule for rule in self._rules if rule.deny]
        self._allows = [rule for rule in self._rules if not rule.deny]
        self._client_tools = {
            name: (matcher(client.tools), ", ".join(client.tools))
            for name, client in clients.items()
            if client.tools is not None
        }

    @property
    def active(self) -> bool:
        """Whether any rule or client list can refuse anything (else the policy need not be in the chain)."""
        return bool(self._rules or self._client_tools)

    def visible(self, principal: Principal, tool: str) -> bool:
        """Whether ``tools/list`` shows ``tool`` to ``principal``: it is not certain to be refused."""
        return self._refusal(principal, tool, None, step=False, held={}) is None

    async def __call__(self, call: ToolCall, call_next: CallNext) -> ToolResult:
        principal = call.context.principal
        step = call.context.workflow_run is not None
        held: dict[int, bool] = {}  # by rule (its id() – labels may repeat where a program builds the rules)
        while True:
            try:
                refusal = self._refusal(principal, call.name, call.arguments, step=step, held=held)
                break
            except _Unknown as unknown:  # evaluate it (jq: awaited in the worker pool), then decide again
                rule = unknown.rule
                held[id(rule)] = await rule.rule.applies_to(call.arguments, principal.id, call.name)
        if refusal is not None:
            message, label = refusal
            raise Forbidden(message, policy=label)
        return await call_next(call)

    def _refusal(
        self,
        principal: Principal,
        tool: str,
        arguments: Mapping[str, object] | None,
        *,
        step: bool,
        held: Mapping[int, bool],
    ) -> tuple[str, str] | None:
        """Why the call is refused and by which rule; None when it is permitted. ``arguments`` None: a listing.

        ``held``: the conditions evaluated so far, by ``id()`` of the rule. Raises _Unknown for one it needs.
        """

        def holds(rule: _Rule) -> bool:
            known = held.get(id(rule))
            if known is None:
                raise _Unknown(rule)
            return known

        for rule in self._denies:
            if rule.for_caller(principal, step) and rule.tools.fullmatch(tool):
                if rule.conditional and (arguments is None or not holds(rule)):
                    continue
                reason = rule.rule.reason or "the gateway's policy denies it"
                return f"{tool} is not allowed ({rule.label}): {reason}.", rule.label
        listed = self._client_tools.get(principal.id) if principal.kind == "client" and not step else None
        if listed is not None and not listed[0].fullmatch(tool):
            return f"client {principal.id!r} may only call {listed[1]}; {tool} is not among them.", (
                f"clients.{principal.id}.tools"
            )
        allows = [rule for rule in self._allows if rule.for_caller(principal, step)]
        if not allows:
            return None
        for rule in allows:
            if rule.tools.fullmatch(tool) and (not rule.conditional or arguments is None or holds(rule)):
                return None
        labels = ", ".join(rule.label for rule in allows)
        return f"{tool} is not allowed for {principal.id!r}: no allow rule permits this call ({labels}).", allows[
            0
        ].label
