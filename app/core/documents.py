"""YAML (and JSON, which is YAML) from outside the process, parsed without letting its shape hurt.

The admin API parses bodies anyone holding the token sends. PyYAML builds nested collections
recursively and shares aliased nodes instead of copying them, so a small document can be nested
past the interpreter's stack, hold an alias inside itself (a cycle nothing can serialise), or
expand to billions of values (the "billion laughs") that take minutes to validate and hash on
the event loop. Each of these is one refusal here, like a syntax error.
"""

from __future__ import annotations

import yaml

MAX_DOCUMENT_NODES = 100_000  # a real provider file has hundreds


class DocumentInvalid(ValueError):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message


def load_yaml(text: str) -> object:
    """The document, or DocumentInvalid naming where (a line, or `(root)`) and what is wrong."""
    try:
        document = yaml.safe_load(text)
    except RecursionError:
        raise DocumentInvalid("(root)", "nested too deeply") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(root)"
        raise DocumentInvalid(where, f"not valid YAML/JSON: {error}") from None
    problem = _expansion_problem(document)
    if problem is not None:
        raise DocumentInvalid("(root)", problem)
    return document


def _expansion_problem(document: object) -> str | None:
    """What is wrong with the document's size once its aliases are expanded, counted without
    expanding them: a node shared by several aliases is sized once (by identity)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: object) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in open_nodes:
            raise ValueError("an alias refers to a node that contains it")
        if key not in sizes:
            open_nodes.add(key)
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            sizes[key] = 1 + sum(size(child) for child in children)
            open_nodes.discard(key)
        return sizes[key]

    try:
        nodes = size(document)
    except ValueError as cycle:
        return str(cycle)
    except RecursionError:
        return "nested too deeply"
    if nodes > MAX_DOCUMENT_NODES:
        return f"{nodes} values once its aliases are expanded (at most {MAX_DOCUMENT_NODES})"
    return None
