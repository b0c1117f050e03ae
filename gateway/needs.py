"""Which upstreams one tool needs: what ``patchbay call`` and ``patchbay tools TOOL`` start, and nothing more.

A tool belongs to the server or connector whose prefix its name starts with; a workflow needs what its steps
call (compensations included, and the workflows it calls, through theirs); a server's ``fallback`` routes add
their targets' upstreams. When that cannot be told from the names alone (an upstream with an empty prefix, a
name no prefix matches), every upstream is started, as before. Pure.
"""

import re

from gateway.config import Config

__all__ = ["for_tool", "upstreams_for"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def upstreams_for(config: Config, tool: str) -> set[str] | None:
    """The names of the upstreams ``tool`` needs, or None when every upstream may be needed."""
    separator = config.gateway.separator
    heads: dict[str, str] = {}
    for name, upstream in config.upstreams.items():
        prefix = name if upstream.prefix is None else upstream.prefix
        if not prefix:
            return None  # its tools' names are its own: any name may be one of them
        heads[name] = _UNSAFE.sub("_", prefix + separator)
    needed: set[str] = set()
    pending, seen = [tool], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        plan = config.plans.get(name)
        if plan is not None:
            pending.extend(plan.calls)
            continue
        owners = {upstream for upstream, head in heads.items() if name.startswith(head)}
        if not owners:
            return None  # not a name of any upstream's: let the whole gateway say what it is
        for owner in owners - needed:
            pending.extend(config.upstreams[owner].fallback.values())
        needed |= owners
    return needed


def for_tool(config: Config, tool: str) -> Config:
    """``config`` with only the servers and connectors ``tool`` needs (all of them when that cannot be told)."""
    needed = upstreams_for(config, tool)
    if needed is None:
        return config
    servers = {name: server for name, server in config.servers.items() if name in needed}
    connectors = {name: connector for name, connector in config.connectors.items() if name in needed}
    return config.model_copy(update={"servers": servers, "connectors": connectors})
