"""Which key directives a provider configuration sent through an API may name.

A directive in the provider file is the operator's own choice: `env:ANY_VARIABLE` or
`file:/any/path`. A configuration sent through the provisioning API (/admin, /api/v2/gateways
and whatever comes next) is not: the health check sends the key it names to the provider's base
URL, so an unrestricted directive would let whoever may provision read the service's own secrets
(ADMIN_TOKEN, BOT_STATE_SECRET, any readable file) by pointing a provider at a server they own.

Through the API, `env:` may name only variables starting with PROVISIONING_ENV_PREFIX and
`file:` only files below PROVISIONING_SECRETS_DIR (the resolved path, so neither `..` nor a
symlink leads out). The service's own credentials are refused even where they match: by the
variable's name, and by value (a variable or file holding the same value as one of them). Every
refusal names its rule. The check resolves the key, so a value that passes it is the one probed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.llm.catalog import resolve_key

DEFAULT_ENV_PREFIX = "CXR_PROVIDER_KEY_"
ENV_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_]*")


def secret_digest(value: str) -> str:
    """How a secret's value is remembered for the comparison: never the value itself."""
    return hashlib.sha256(value.strip().encode()).hexdigest()


class DirectiveRefused(ValueError):
    """A directive the API may not use; the message names the rule (and never a value)."""


@dataclass(frozen=True)
class DirectivePolicy:
    env_prefix: str = DEFAULT_ENV_PREFIX  # "" refuses every env: directive
    secrets_dir: Path | None = None  # None refuses every file: directive
    # the service's own secrets: their variable names (upper case) and their values' digests
    reserved_names: frozenset[str] = field(default_factory=frozenset)
    reserved_digests: frozenset[str] = field(default_factory=frozenset)

    def resolve(self, directive: str, *, allow_literal: bool, env: Mapping[str, str]) -> str:
        """The key, if the API may use this directive; DirectiveRefused (the rule) or
        ValueError (the directive does not resolve) otherwise."""
        kind, sep, rest = directive.partition(":")
        if sep and kind == "env":
            self._check_variable(rest)
        elif sep and kind == "file":
            directive = f"file:{self._check_file(rest)}"  # read what was checked
        value = resolve_key(directive, allow_literal=allow_literal, env=env)
        if secret_digest(value) in self.reserved_digests:
            raise DirectiveRefused(
                f"{_shown(kind, rest)} is refused: it holds the value of one of the service's own "
                "credentials, which a configuration sent through the API can never use"
            )
        return value

    def _check_variable(self, name: str) -> None:
        if name.upper() in self.reserved_names:
            raise DirectiveRefused(
                f"env:{name} is refused: it is one of the service's own credentials, which a "
                "configuration sent through the API can never name"
            )
        if not self.env_prefix:
            raise DirectiveRefused(
                "env: directives are refused through the API (PROVISIONING_ENV_PREFIX is empty)"
            )
        if not name.startswith(self.env_prefix):
            raise DirectiveRefused(
                f"env:{name} is refused: through the API, env: may name only variables starting "
                f"with PROVISIONING_ENV_PREFIX ({self.env_prefix})"
            )

    def _check_file(self, path: str) -> Path:
        if self.secrets_dir is None:
            raise DirectiveRefused(
                f"file:{path} is refused: file: directives are accepted through the API only "
                "below PROVISIONING_SECRETS_DIR, which is not set"
            )
        if not path.startswith("/"):
            raise ValueError(f"malformed key directive 'file:{path}': file: needs an absolute path")
        root = self.secrets_dir.resolve()
        try:
            real = Path(path).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, unreadable directory, symlink loop
            real = Path(path).resolve()
        if not real.is_relative_to(root) or real == root:
            raise DirectiveRefused(
                f"file:{path} is refused: through the API, file: may name only files below "
                f"PROVISIONING_SECRETS_DIR ({self.secrets_dir}); its resolved path (symlinks "
                "and '..' followed) is not"
            )
        return real


def _shown(kind: str, rest: str) -> str:
    return f"{kind}:{rest}" if kind in ("env", "file") else f"the {kind}: key"
