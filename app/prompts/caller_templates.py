"""Templates a caller sends with a /chat request (inline source, or the name of a file under
app/templates/), rendered with the caller's variables.

The source itself comes from outside, so on top of Jinja's sandbox (no attribute escapes, no
unsafe calls, ranges capped) nothing in it may build a huge value: a repetition (`'x' * 10**9`),
a power, %-formatting and the padding methods and filters (`center`, `ljust`, `format`, ...)
that allocate whatever width they are given are refused, and the output is produced piece by
piece and stopped at `max_output_chars`, so a loop cannot fill the memory either.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, TemplateNotFound
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from app.prompts.renderer import TEMPLATE_DIR

_PADDING_METHODS = frozenset(
    {"ljust", "rjust", "center", "zfill", "expandtabs", "format", "format_map"}
)
_PADDING_FILTERS = ("center", "indent", "wordwrap", "format", "filesizeformat")
MAX_RENDER_SECONDS = 0.5


class _CallerSandbox(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, template_dir: Path, max_value_chars: int) -> None:
        super().__init__(
            loader=FileSystemLoader(str(template_dir)),
            undefined=StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.max_value_chars = max_value_chars
        for name in _PADDING_FILTERS:
            self.filters.pop(name, None)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr in _PADDING_METHODS:
            return False
        return bool(super().is_safe_attribute(obj, attr, value))

    def wrap_str_format(self, value: Any) -> None:
        """No sandboxed str.format / format_map: a width field allocates whatever it is given,
        so they fall to is_safe_attribute, which refuses them."""
        return None

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and _repeated_length(left, right) > self.max_value_chars:
            raise SecurityError("repetition would build a value over the limit")
        if operator == "**" and _power_bits(left, right) > 4096:
            raise SecurityError("power too large")
        if operator == "%" and isinstance(left, str):
            raise SecurityError("%-formatting is not available in request templates")
        return super().call_binop(context, operator, left, right)


def _repeated_length(left: Any, right: Any) -> int:
    """len(sequence * n) for a sequence repetition, else 0."""
    for sequence, times in ((left, right), (right, left)):
        if isinstance(sequence, str | list | tuple) and isinstance(times, int):
            return len(sequence) * times
    return 0


def _power_bits(left: Any, right: Any) -> int:
    """About how many bits int ** int would take, else 0."""
    if isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        return right * abs(left).bit_length()
    return 0


class CallerTemplates:
    def __init__(
        self, max_source_chars: int, max_output_chars: int, template_dir: Path = TEMPLATE_DIR
    ) -> None:
        self.max_source_chars = max_source_chars
        self.max_output_chars = max_output_chars
        self._env = _CallerSandbox(template_dir, max_output_chars)

    def render(self, template: str, variables: dict[str, Any]) -> str:
        """The rendered user message. Raises ValueError with a message for the caller: an
        unknown file, source over the limit, a missing variable, a sandbox refusal, output
        over the limit, or nothing rendered."""
        try:
            if template.endswith(".j2") and "\n" not in template:
                compiled = self._env.get_template(template)
            elif len(template) > self.max_source_chars:
                raise ValueError(
                    f"inline template is {len(template)} characters; "
                    f"the limit is {self.max_source_chars}"
                )
            else:
                compiled = self._env.from_string(template)
            rendered = self._bounded(compiled.generate(**variables))
        except TemplateNotFound:
            raise ValueError(f"template {template!r} is not a file under app/templates/") from None
        except SecurityError as exc:
            raise ValueError(f"template refused by the sandbox: {exc}") from None
        except TemplateError as exc:
            raise ValueError(f"template does not render: {exc}") from None
        except (RecursionError, SyntaxError):  # Jinja's parser and Python's compiler recurse
            raise ValueError("template is nested too deeply (or recurses)") from None
        if not rendered.strip():
            raise ValueError("template renders to an empty message")
        return rendered.strip()

    def _bounded(self, pieces: Any) -> str:
        """The output, piece by piece, within max_output_chars and MAX_RENDER_SECONDS. Loops
        that emit nothing (`range(100000)` inside `range(100000)`) never reach a size check,
        so the render is traced: past its time, the next line it runs raises. Rendering runs
        on the event loop; without this one request could hold it for minutes."""
        deadline = time.monotonic() + MAX_RENDER_SECONDS

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            if time.monotonic() > deadline:
                raise _RenderTooLong
            return trace

        out: list[str] = []
        size = 0
        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            for piece in pieces:
                size += len(piece)
                if size > self.max_output_chars:
                    raise ValueError(
                        f"template renders to more than {self.max_output_chars} characters"
                    )
                out.append(piece)
        except _RenderTooLong:
            raise ValueError(f"template takes more than {MAX_RENDER_SECONDS}s to render") from None
        finally:
            sys.settrace(previous)
        return "".join(out)


class _RenderTooLong(Exception):
    pass
