"""Which upstreams one tool needs: what ``patchbay call`` and ``patchbay tools TOOL`` start, and nothing more.

A tool belongs to the server or connector whose prefix its name starts with; a workflow needs what its steps
call (compensations included, and the workflows it calls, through theirs); a server's ``fallback`` routes add
their targets' upstreams. When that cannot be told from the names alone (an upstream with an empty prefix, a
name no prefix matches), every upstream is started, as before. Pure.
"""

from gateway.config import Config
from gateway.registry import owner_by_prefix, prefix_head

__all__ = ["for_tool", "upstreams_for"]


def upstreams_for(config: Config, tool: str) -> set[str] | None:
    """The names of the upstreams ``tool`` needs, or None when every upstream may be needed."""
    heads = {
        name: prefix_head(name if upstream.prefix is None else upstream.prefix, config.gateway.separator)
        for name, upstream in config.upstreams.items()
    }
    if not all(heads.values()):
        return None  # an upstream without a prefix: any name may be one of its tools
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
        owner = owner_by_prefix(heads, name)
        if owner is None:
            return None  # not a name of any upstream's: let the whole gateway say what it is
        if owner not in needed:
            needed.add(owner)
            pending.extend(config.upstreams[owner].fallback.values())
    return needed


def for_tool(config: Config, tool: str) -> Config:
    """``config`` with only the servers and connectors ``tool`` needs (all of them when that cannot be told)."""
    needed = upstreams_for(config, tool)
    if needed is None:
        return config
    servers = {name: server for name, server in config.servers.items() if name in needed}
    connectors = {name: connector for name, connector in config.connectors.items() if name in needed}
    return config.model_copy(update={"servers": servers, "connectors": connectors})
