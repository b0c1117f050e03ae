"""An upstream that lacks an optional list method, the way ``mcp-server-sqlite`` (on ``mcp`` 1.x) does.

It declares the ``resources`` capability (it lists resources) but has no handler for
``resources/templates/list``, so the SDK answers that method with -32601 Method not found.
``--unlisted-tools`` goes further: it declares ``tools`` and can call them, but answers
``tools/list`` with -32601 too. Run over stdio.
"""

import argparse
from typing import Any

import anyio
import mcp_types as types
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.stdio import stdio_server

TOOLS = {
    "echo": types.Tool(
        name="echo",
        description="Return the text unchanged.",
        input_schema={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    ),
    "add_tool": types.Tool(
        name="add_tool",
        description="Serve one more tool called `name` and announce it with tools/list_changed.",
        input_schema={"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    ),
}
INSIGHTS = "memo://insights"


async def list_tools(
    ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    return types.ListToolsResult(tools=list(TOOLS.values()))


async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
    arguments = params.arguments or {}
    if params.name == "add_tool":
        name = str(arguments["name"])
        TOOLS[name] = types.Tool(name=name, description="added at run time", input_schema={"type": "object"})
        await ctx.session.send_tool_list_changed()
        return types.CallToolResult(content=[types.TextContent(type="text", text=f"added {name}")])
    if params.name in TOOLS:
        text = str(arguments.get("text", f"I am {params.name}"))
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])
    return types.CallToolResult(content=[types.TextContent(type="text", text=f"no tool {params.name}")], is_error=True)


async def list_resources(
    ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
) -> types.ListResourcesResult:
    return types.ListResourcesResult(resources=[types.Resource(uri=INSIGHTS, name="insights", mime_type="text/plain")])


async def read_resource(
    ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
) -> types.ReadResourceResult:
    return types.ReadResourceResult(contents=[types.TextResourceContents(uri=str(params.uri), text="no insights yet")])


class _ToolsUnlisted(Server[Any]):
    """Declares ``tools`` although it has no ``tools/list`` handler."""

    def get_capabilities(self, *args: Any, **kwargs: Any) -> types.ServerCapabilities:
        capabilities = super().get_capabilities(*args, **kwargs)
        return capabilities.model_copy(update={"tools": types.ToolsCapability(list_changed=True)})


def build_server(*, unlisted_tools: bool = False) -> Server[Any]:
    """The server; with ``unlisted_tools``, one whose tools can be called but not listed."""
    if unlisted_tools:
        return _ToolsUnlisted(
            "partial",
            on_call_tool=call_tool,
            on_list_resources=list_resources,
            on_read_resource=read_resource,
        )
    return Server(
        "partial",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
    )


async def serve(server: Server[Any]) -> None:
    async with stdio_server() as (read, write):
        options = server.create_initialization_options(NotificationOptions(tools_changed=True))
        await server.run(read, write, options)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--unlisted-tools", action="store_true", help="declare tools but answer -32601 to tools/list")
    args = parser.parse_args()
    anyio.run(serve, build_server(unlisted_tools=args.unlisted_tools))


if __name__ == "__main__":
    main()
