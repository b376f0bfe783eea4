"""Where a service process starts: the token encoding is loaded before the app's modules.

Loading o200k_base reads its ranks into a ~25 MiB Python dict that lives only while tiktoken
builds its own tables. Loaded first, that memory is reused by the modules imported next; loaded
after them (in the lifespan), it is a peak of its own on top of them: 131 against 156 MiB
measured (docs/PERFORMANCE.md). So `python -m app serve` and each of its uvicorn workers load it
here, then import the app. The lifespan's preload then finds it loaded (and loads any other
encoding the configured models need).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.core.settings import Settings
from app.core.settings_loading import load_settings
from app.llm import tokens

if TYPE_CHECKING:
    from fastapi import FastAPI


def load_tokenizer_first(settings: Settings) -> None:
    if settings.token_counting == "exact":
        tokens.preload([settings.llm_model])


def worker_app() -> FastAPI:
    """One worker's app (uvicorn's factory with WORKERS > 1): the encoding, then the app."""
    settings = load_settings()
    load_tokenizer_first(settings)
    from app.serving import worker_app as build_worker_app  # after the encoding: see above

    return build_worker_app(settings)
