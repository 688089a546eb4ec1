"""The OpenAI-compatible HTTP API: request and response bodies (protocol), the routes'
logic shared by both lanes (serving), chat rendering and tool calls (chat, tools)."""
