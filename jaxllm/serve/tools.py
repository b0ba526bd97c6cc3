"""Tool calls in Llama 4's format: the tools in the prompt, the calls read back from the text.

Llama 4 calls a function with a JSON object, ``{"name": "f", "parameters": {...}}`` (its
chat template's JSON style), or with a Python-like list, ``[f(a=1, b="x")]`` (the pythonic
style, sometimes between ``<|python_start|>`` and ``<|python_end|>``). Both are read back.

``tool_choice``: ``none`` (no tools in the prompt, no parsing), ``auto`` (the model decides;
the text is parsed afterwards), ``required`` and a named function (the output is constrained
to calls whose arguments match the function's parameter schema: ``call_schema``).
"""

from __future__ import annotations

import ast
import json
import secrets
from collections.abc import Sequence
from typing import Any

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def tool_instructions(tools: Sequence[dict[str, Any]]) -> str:
    """How to call the tools, for a chat template that has no tool section of its own."""
    listed = "\n".join(json.dumps(t["function"]) for t in tools)
    return ('To call a function, answer only {"name": <name>, "parameters": <arguments>}. '
            "Functions:\n" + listed)


def prompt_messages(messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                    template_has_tools: bool) -> list[dict[str, Any]]:
    """The messages as the chat template gets them. Earlier calls' ``arguments`` become
    objects (what tool-aware templates print); for a template without a tool section, the
    tool list goes into the system message and earlier calls become their JSON text."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            m["tool_calls"] = [_with_object_arguments(c) for c in calls]
            if not template_has_tools:
                text = "".join(json.dumps({"name": c["function"]["name"],
                                           "parameters": c["function"]["arguments"]})
                               for c in m.pop("tool_calls"))
                m["content"] = (m.get("content") or "") + text
        out.append(m)
    if tools and not template_has_tools:
        note = tool_instructions(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{note}\n\n{out[0].get('content') or ''}"}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def _with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # left as the client sent it
    return {**call, "function": function}


def call_schema(tools: Sequence[dict[str, Any]], name: str | None, parallel: bool
                ) -> dict[str, Any]:
    """The JSON schema of the constrained output: one call of function ``name``, or (for
    ``required``) a call of any tool; when ``parallel``, also a list of one or more (Llama 4
    writes a single call as a bare object: a list-only grammar would force a model that
    wants to end after one call to keep writing calls)."""
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not functions:
        raise ValueError(f"no tool named {name!r}" if name else "no tools to call")
    calls = [{"type": "object", "properties": {
        "name": {"const": f["name"]},
        "parameters": f.get("parameters") or ANY_OBJECT},
        "required": ["name", "parameters"], "additionalProperties": False}
        for f in functions]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if name is None and parallel:
        return {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}
    return one


def parse_tool_calls(text: str, names: Sequence[str]) -> list[dict[str, Any]] | None:
    """The calls in a model's answer (OpenAI's ``tool_calls`` entries, arguments as JSON
    text), or None when the answer is not only calls of the known functions ``names``."""
    body = text.strip()
    if body.startswith(PYTHON_START):
        body = body[len(PYTHON_START):].replace(PYTHON_END, "").strip()
    calls = _json_calls(body)
    if calls is None:
        calls = _pythonic_calls(body)
    if not calls or any(name not in names for name, _ in calls):
        return None
    return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments)}}
            for name, arguments in calls]


def _json_calls(body: str) -> list[tuple[str, dict[str, Any]]] | None:
    """``{"name": ..., "parameters": ...}`` (or ``"arguments"``), a list of them, or several
    separated by ';'."""
    decoder, items, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            value, end = decoder.raw_decode(body, at)
        except json.JSONDecodeError:
            return None
        items += value if isinstance(value, list) else [value]
        at = end
        while at < len(body) and body[at] in " \n\t;":
            at += 1
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("parameters", item.get("arguments", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict) or set(item) - {"name", "parameters", "arguments"}:
            return None
        calls.append((item["name"], arguments))
    return calls


def _pythonic_calls(body: str) -> list[tuple[str, dict[str, Any]]] | None:
    """``[f(a=1, b="x"), g()]``: calls by keyword with literal values only."""
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError):
        return None
    if not isinstance(tree, ast.List):
        return None
    calls = []
    for call in tree.elts:
        if (not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args
                or any(k.arg is None for k in call.keywords)):
            return None
        try:
            arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except ValueError:
            return None
        calls.append((call.func.id, arguments))
    return calls


def looks_like_call(text: str) -> bool:
    """Whether an answer that starts with ``text`` may turn out to be a tool call (a stream
    holds such text back until the answer ends)."""
    head = text.lstrip()
    return (not head or head[0] in "{[" or head.startswith(PYTHON_START)
            or PYTHON_START.startswith(head))


class CallStream:
    """One streamed choice's chat deltas when tools may be called: text that may turn out to
    be a call is held back until the answer ends, then goes out as ``tool_calls`` deltas
    (each call's id, type and name first, then its arguments) or, when it is not a call, as
    content. Text that cannot start a call streams as it comes."""

    def __init__(self, names: Sequence[str], named: bool):
        self.names, self.named = list(names), named
        self.held, self.passing = "", False

    def delta(self, text: str) -> dict[str, Any]:
        if not self.passing:
            self.held += text
            if looks_like_call(self.held):
                return {}
            self.passing, text, self.held = True, self.held, ""
        return {"content": text} if text else {}

    def finish(self, text: str, reason: str) -> tuple[list[dict[str, Any]], str]:
        """The last deltas and the finish reason ("tool_calls" when calls were made, "stop"
        for a function chosen by name, as OpenAI does)."""
        if self.passing:
            return ([{"content": text}] if text else []), reason
        self.held += text
        calls = parse_tool_calls(self.held, self.names) if reason == "stop" else None
        if calls is None:
            return ([{"content": self.held}] if self.held else []), reason
        deltas = []
        for i, call in enumerate(calls):
            deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"],
                                                        "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": i, "function": {
                "arguments": call["function"]["arguments"]}}]})
        return deltas, "stop" if self.named else "tool_calls"
