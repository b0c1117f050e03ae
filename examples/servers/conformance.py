"""Conformance fixture: the MCP server the official conformance suite's server scenarios expect.

The suite (npm `@modelcontextprotocol/conformance`, `server --url URL`) calls fixed tool,
resource and prompt names; this server provides exactly those, with the contents each
scenario checks (read from the scenario sources of version 0.1.16). Served directly it
scores 44 passed / 0 failed on `--suite all`; behind the gateway with names passed
through, it should score the same.

It is written on the low-level `Server` because the scenarios need what `MCPServer` does
not expose: raw JSON Schema 2020-12 input schemas, `logging/setLevel`,
`completion/complete` and resource subscriptions.

    python examples/servers/conformance.py                     # stdio (the default)
    python examples/servers/conformance.py --http --port 9102  # streamable HTTP, stateful sessions
"""

import argparse
import base64
import io
import json
import logging
import re
import sys
import warnings
import wave
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, get_args

import anyio
import uvicorn
from mcp import types
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp.shared.message import ServerMessageMetadata

DEFAULT_PORT = 9102
HOST = "127.0.0.1"
RED_PIXEL_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"  # 1x1
LOG_LEVELS: tuple[types.LoggingLevel, ...] = get_args(types.LoggingLevel)  # least severe first
STEP_DELAY = 0.05  # the ~50 ms pauses the logging and progress scenarios ask for
NO_ARGS: dict[str, Any] = {"type": "object", "properties": {}}

Context = ServerRequestContext[Any, Any]
Paginated = types.PaginatedRequestParams | None
ToolHandler = Callable[[Context, dict[str, Any]], Awaitable[types.CallToolResult]]


def _plain(text: str) -> types.TextContent:
    return types.TextContent(type="text", text=text)


def _text(text: str, *, is_error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(content=[_plain(text)], is_error=is_error)


def _image() -> types.ImageContent:
    return types.ImageContent(type="image", data=RED_PIXEL_PNG, mime_type="image/png")


def _contents(uri: str, text: str, mime_type: str = "text/plain") -> types.TextResourceContents:
    return types.TextResourceContents(uri=uri, mime_type=mime_type, text=text)


def _embedded(uri: str, text: str, mime_type: str = "text/plain") -> types.EmbeddedResource:
    return types.EmbeddedResource(type="resource", resource=_contents(uri, text, mime_type))


def _silent_wav() -> str:
    """A tenth of a second of 8 kHz mono silence, base64-encoded."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x00" * 800)
    return base64.b64encode(buffer.getvalue()).decode()


def _requires(*names: str) -> dict[str, Any]:
    return {"type": "object", "properties": {name: {"type": "string"} for name in names}, "required": list(names)}


# Tools whose result never changes: name -> (description, result).
FIXED_RESULTS: dict[str, tuple[str, types.CallToolResult]] = {
    "test_simple_text": ("Returns simple text", _text("This is a simple text response for testing.")),
    "test_image_content": ("Returns a PNG image", types.CallToolResult(content=[_image()])),
    "test_audio_content": (
        "Returns WAV audio",
        types.CallToolResult(content=[types.AudioContent(type="audio", data=_silent_wav(), mime_type="audio/wav")]),
    ),
    "test_embedded_resource": (
        "Returns an embedded text resource",
        types.CallToolResult(content=[_embedded("test://embedded-resource", "This is an embedded resource content.")]),
    ),
    "test_multiple_content_types": (
        "Returns text, an image and a resource",
        types.CallToolResult(
            content=[
                _plain("Multiple content types test:"),
                _image(),
                _embedded("test://mixed-content-resource", '{"test":"data","value":123}', "application/json"),
            ]
        ),
    ),
    "test_error_handling": (
        "Always fails with isError",
        _text("This tool intentionally returns an error for testing", is_error=True),
    ),
}
USER_SCHEMA = {
    "type": "object",
    "properties": {
        "username": {"type": "string", "description": "User's response"},
        "email": {"type": "string", "description": "User's email address"},
    },
    "required": ["username", "email"],
}
DEFAULTS_SCHEMA = {  # SEP-1034: a default for every primitive type
    "type": "object",
    "properties": {
        "name": {"type": "string", "default": "John Doe"},
        "age": {"type": "integer", "default": 30},
        "score": {"type": "number", "default": 95.5},
        "status": {"type": "string", "enum": ["active", "inactive", "pending"], "default": "active"},
        "verified": {"type": "boolean", "default": True},
    },
}
_TITLED = [{"const": f"value{n}", "title": title} for n, title in ((1, "First"), (2, "Second"), (3, "Third"))]
ENUMS_SCHEMA = {  # SEP-1330: the five enum shapes
    "type": "object",
    "properties": {
        "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
        "titledSingle": {"type": "string", "oneOf": [{**t, "title": f"{t['title']} Option"} for t in _TITLED]},
        "legacyEnum": {"type": "string", "enum": ["opt1", "opt2"], "enumNames": ["Option One", "Option Two"]},
        "untitledMulti": {"type": "array", "items": {"type": "string", "enum": ["option1", "option2", "option3"]}},
        "titledMulti": {"type": "array", "items": {"anyOf": [{**t, "title": f"{t['title']} Choice"} for t in _TITLED]}},
    },
}
JSON_SCHEMA_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {"address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}}}},
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
    "additionalProperties": False,
}
# uri -> (description, contents); the name is the uri without its scheme.
RESOURCES: dict[str, tuple[str, types.TextResourceContents | types.BlobResourceContents]] = {
    "test://static-text": (
        "A static text resource",
        _contents("test://static-text", "This is the content of the static text resource."),
    ),
    "test://static-binary": (
        "A static binary resource (PNG)",
        types.BlobResourceContents(uri="test://static-binary", mime_type="image/png", blob=RED_PIXEL_PNG),
    ),
    "test://watched-resource": ("A resource to subscribe to", _contents("test://watched-resource", "Watched content")),
}
TEMPLATE = re.compile(r"test://template/(?P<id>[^/]+)/data")
# name -> (description, required arguments)
PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "test_simple_prompt": ("A simple prompt without arguments", ()),
    "test_prompt_with_arguments": ("A prompt with two required arguments", ("arg1", "arg2")),
    "test_prompt_with_embedded_resource": ("A prompt embedding a resource", ("resourceUri",)),
    "test_prompt_with_image": ("A prompt with an image", ()),
}
COMPLETIONS = ("paris", "park", "party", "test", "testing")


def _prompt_content(name: str, args: dict[str, str]) -> list[types.ContentBlock]:
    if name == "test_prompt_with_arguments":
        return [_plain(f"Prompt with arguments: arg1='{args['arg1']}', arg2='{args['arg2']}'")]
    if name == "test_prompt_with_embedded_resource":
        resource = _embedded(args["resourceUri"], "Embedded resource content for testing.")
        return [resource, _plain("Please process the embedded resource above.")]
    if name == "test_prompt_with_image":
        return [_image(), _plain("Please analyze the image above.")]
    return [_plain("This is a simple prompt for testing.")]


class Fixture:
    """The request handlers, and the little state they keep (log level, subscriptions)."""

    def __init__(self) -> None:
        self.log_level: types.LoggingLevel = "debug"
        self.subscriptions: set[str] = set()
        elicit = self.elicit
        # name -> (description, input schema, handler)
        self.tools: dict[str, tuple[str, dict[str, Any], ToolHandler]] = {
            name: (description, NO_ARGS, partial(self.fixed, result))
            for name, (description, result) in FIXED_RESULTS.items()
        }
        self.tools |= {
            "test_tool_with_logging": ("Sends three info log messages", NO_ARGS, self.with_logging),
            "test_tool_with_progress": ("Reports progress 0, 50 and 100 of 100", NO_ARGS, self.with_progress),
            "test_sampling": ("Asks the client's LLM to answer a prompt", _requires("prompt"), self.sampling),
            "test_elicitation": ("Asks for a name and email", _requires("message"), partial(elicit, USER_SCHEMA)),
            "test_elicitation_sep1034_defaults": ("Elicits with defaults", NO_ARGS, partial(elicit, DEFAULTS_SCHEMA)),
            "test_elicitation_sep1330_enums": ("Elicits every enum shape", NO_ARGS, partial(elicit, ENUMS_SCHEMA)),
            "json_schema_2020_12_tool": ("Tool with JSON Schema 2020-12 features", JSON_SCHEMA_2020_12, self.echo),
            "test_reconnection": ("Closes its SSE stream mid-call (SEP-1699)", NO_ARGS, self.reconnection),
        }

    async def fixed(self, result: types.CallToolResult, ctx: Context, args: dict[str, Any]) -> types.CallToolResult:
        return result

    async def with_logging(self, ctx: Context, args: dict[str, Any]) -> types.CallToolResult:
        for n, message in enumerate(("Tool execution started", "Tool processing data", "Tool execution completed")):
            await anyio.sleep(STEP_DELAY if n else 0)
            await self.log(ctx, "info", message)
        return _text("Tool with logging executed successfully")

    async def with_progress(self, ctx: Context, args: dict[str, Any]) -> types.CallToolResult:
        for n, progress in enumerate((0, 50, 100)):
            await anyio.sleep(STEP_DELAY if n else 0)
            await ctx.session.report_progress(progress, 100)  # a no-op without a progressToken
        return _text("Tool with progress executed successfully")

    async def sampling(self, ctx: Context, args: dict[str, Any]) -> types.CallToolResult:
        if (ctx.session.client_capabilities or types.ClientCapabilities()).sampling is None:
            return _text("The client does not support sampling", is_error=True)
        message = types.SamplingMessage(role="user", content=_plain(str(args["prompt"])))
        request = types.CreateMessageRequest(
            params=types.CreateMessageRequestParams(messages=[message], max_tokens=100)
        )
        metadata = ServerMessageMetadata(related_request_id=ctx.request_id)
        result = await ctx.session.send_request(request, types.CreateMessageResult, metadata=metadata)
        content = result.content
        return _text(f"LLM response: {content.text if isinstance(content, types.TextContent) else content}")

    async def elicit(self, schema: dict[str, Any], ctx: Context, args: dict[str, Any]) -> types.CallToolResult:
        if (ctx.session.client_capabilities or types.ClientCapabilities()).elicitation is None:
            return _text("The client does not support elicitation", is_error=True)
        message = str(args.get("message", "Please fill in the form"))
        result = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)
        return _text(f"Elicitation completed: action={result.action}, content={json.dumps(result.content)}")

    async def echo(self, ctx: Context, args: dict[str, Any]) -> types.CallToolResult:
        return _text(f"Received: {json.dumps(args, sort_keys=True)}")

    async def reconnection(self, ctx: Context, args: dict[str, Any]) -> types.CallToolResult:
        # The SDK offers this callback only with an event store and a 2025-11-25+ client.
        if ctx.close_sse_stream is not None:
            await ctx.close_sse_stream()
        await anyio.sleep(2 * STEP_DELAY)
        return _text("Reconnection test completed")

    async def log(self, ctx: Context, level: types.LoggingLevel, message: str) -> None:
        if LOG_LEVELS.index(level) < LOG_LEVELS.index(self.log_level):
            return
        # Logging is deprecated as of 2026-07-28 (the SDK warns), but the handshake-era
        # scenarios test it; the SDK still applies each era's delivery rules.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            await ctx.session.send_log_message(level, message, logger="conformance", related_request_id=ctx.request_id)

    async def list_tools(self, ctx: Context, params: Paginated) -> types.ListToolsResult:
        tools = [types.Tool(name=name, description=d, input_schema=s) for name, (d, s, _) in self.tools.items()]
        return types.ListToolsResult(tools=tools)

    async def call_tool(self, ctx: Context, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name not in self.tools:
            raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name}")
        _, schema, handler = self.tools[params.name]
        args = params.arguments or {}
        if missing := [name for name in schema.get("required", []) if name not in args]:
            return _text(f"Missing required arguments: {', '.join(missing)}", is_error=True)
        try:
            return await handler(ctx, args)
        except MCPError as exc:  # a sampling or elicitation round trip failed
            return _text(f"{params.name} failed: {exc}", is_error=True)

    async def list_resources(self, ctx: Context, params: Paginated) -> types.ListResourcesResult:
        return types.ListResourcesResult(
            resources=[
                types.Resource(uri=uri, name=uri[7:], description=description, mime_type=contents.mime_type)
                for uri, (description, contents) in RESOURCES.items()
            ]
        )

    async def list_templates(self, ctx: Context, params: Paginated) -> types.ListResourceTemplatesResult:
        template = types.ResourceTemplate(
            uri_template="test://template/{id}/data",
            name="template",
            description="Data for one id",
            mime_type="application/json",
        )
        return types.ListResourceTemplatesResult(resource_templates=[template])

    async def read_resource(self, ctx: Context, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        if uri in RESOURCES:
            return types.ReadResourceResult(contents=[RESOURCES[uri][1]])
        if match := TEMPLATE.fullmatch(uri):
            data = json.dumps({"id": match["id"], "templateTest": True, "data": f"Data for ID: {match['id']}"})
            return types.ReadResourceResult(contents=[_contents(uri, data, "application/json")])
        raise MCPError(types.INVALID_PARAMS, f"Resource not found: {uri}")

    async def subscribe(self, ctx: Context, params: types.SubscribeRequestParams) -> types.EmptyResult:
        self.subscriptions.add(str(params.uri))
        return types.EmptyResult()

    async def unsubscribe(self, ctx: Context, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        self.subscriptions.discard(str(params.uri))
        return types.EmptyResult()

    async def list_prompts(self, ctx: Context, params: Paginated) -> types.ListPromptsResult:
        return types.ListPromptsResult(
            prompts=[
                types.Prompt(
                    name=name,
                    description=description,
                    arguments=[types.PromptArgument(name=arg, description=f"The {arg}", required=True) for arg in args],
                )
                for name, (description, args) in PROMPTS.items()
            ]
        )

    async def get_prompt(self, ctx: Context, params: types.GetPromptRequestParams) -> types.GetPromptResult:
        if params.name not in PROMPTS:
            raise MCPError(types.INVALID_PARAMS, f"Unknown prompt: {params.name}")
        description, required = PROMPTS[params.name]
        args = params.arguments or {}
        if missing := [arg for arg in required if arg not in args]:
            raise MCPError(types.INVALID_PARAMS, f"Missing required arguments: {', '.join(missing)}")
        content = _prompt_content(params.name, args)
        messages = [types.PromptMessage(role="user", content=block) for block in content]
        return types.GetPromptResult(description=description, messages=messages)

    async def complete(self, ctx: Context, params: types.CompleteRequestParams) -> types.CompleteResult:
        values: list[str] = []
        if isinstance(params.ref, types.PromptReference) and params.ref.name in PROMPTS:
            values = [value for value in COMPLETIONS if value.startswith(params.argument.value)]
        return types.CompleteResult(completion=types.Completion(values=values, total=len(values), has_more=False))

    async def set_level(self, ctx: Context, params: types.SetLevelRequestParams) -> types.EmptyResult:
        self.log_level = params.level
        return types.EmptyResult()


def build_server() -> Server[Any]:
    """Build the fixture as a low-level `Server`, with fresh state."""
    fixture = Fixture()
    server: Server[Any] = Server(
        "conformance-fixture",
        version="1.0.0",
        on_list_tools=fixture.list_tools,
        on_call_tool=fixture.call_tool,
        on_list_resources=fixture.list_resources,
        on_list_resource_templates=fixture.list_templates,
        on_read_resource=fixture.read_resource,
        on_subscribe_resource=fixture.subscribe,
        on_unsubscribe_resource=fixture.unsubscribe,
        on_list_prompts=fixture.list_prompts,
        on_get_prompt=fixture.get_prompt,
        on_completion=fixture.complete,
    )
    # Registered here, not as on_set_logging_level, which warns that logging is deprecated.
    server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, fixture.set_level)
    return server


async def serve_stdio(server: Server[Any]) -> None:
    """Serve `server` over stdio until the client closes stdin."""
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def main(argv: list[str] | None = None) -> None:
    """Serve over stdio, or over stateful streamable HTTP on 127.0.0.1 with `--http`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    server = build_server()
    if args.http:
        print(f"conformance: serving streamable HTTP on http://{HOST}:{args.port}/mcp", file=sys.stderr, flush=True)
        uvicorn.run(server.streamable_http_app(host=HOST), host=HOST, port=args.port, log_level="warning")
    else:
        anyio.run(serve_stdio, server)


if __name__ == "__main__":
    main()
