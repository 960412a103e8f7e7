"""Tool calling: parsers that find tool calls in model text (`parsers`), and the request side
(`calls`: tools for the chat template, tool_choice, the constraints that enforce required/named
choices, and streamed tool_calls deltas)."""
