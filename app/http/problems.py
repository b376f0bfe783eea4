"""Every problem of a payload or provider configuration, each at its path, as one JSON answer:
the admin API, tutorial 000's provider registration and tutorial 002's gateways answer alike
(as `python -m app check-config` lists a file's problems)."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.llm.catalog import Problem


class ProblemOut(BaseModel):
    path: str
    message: str

    @classmethod
    def of(cls, problem: Problem) -> ProblemOut:
        return cls(path=problem.path, message=problem.message)


class ProblemsResponse(BaseModel):
    """422 (invalid), 424 (a provider failed its health check), 500 (an apply failed): what is
    wrong, and every problem with its path."""

    detail: str
    problems: list[ProblemOut]


def problems_response(status: int, detail: str, problems: list[Problem]) -> JSONResponse:
    body = ProblemsResponse(detail=detail, problems=[ProblemOut.of(p) for p in problems])
    return JSONResponse(body.model_dump(), status_code=status)
