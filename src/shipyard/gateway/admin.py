"""The admin API: rollouts and deployments, behind admin keys that are distinct from user keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from shipyard.control.commands import RolloutCommand, RolloutRejected
from shipyard.control.plane import ControlPlane
from shipyard.gateway.auth import KeyChecker
from shipyard.gateway.errors import OpenAIError
from shipyard.gateway.proxy import Proxy
from shipyard.gateway.schemas import parse_json_object, validate


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    target: str = Field(min_length=1, description="model folder, http(s) URL of a running server, or LoRA folder")
    version: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    canary_percent: float | None = None
    gate: str | None = None
    lora: bool = False
    strategy: Literal["auto", "inplace", "blue-green"] = "auto"


def install_admin_routes(
    app: FastAPI,
    proxy: Proxy,
    keys: KeyChecker,
    control: ControlPlane,
    resolve: Callable[[str], tuple[str, str | None]] | None = None,
) -> None:
    """``resolve``: a registry reference ``NAME[:VERSION]`` -> (folder, version) for rollout targets."""

    def authorize(request: Request) -> str:
        """The admin's identity for the audit log: ``admin:<key name>``, never the key."""
        return "admin:" + keys.check(request.headers.get("authorization"))

    def rejected(exc: RolloutRejected) -> OpenAIError:
        return OpenAIError(exc.status, str(exc), code="rollout_rejected")

    @app.get("/admin/deployments")
    async def deployments(request: Request) -> dict[str, Any]:
        authorize(request)
        return control.describe()

    @app.post("/admin/rollouts", status_code=202)
    async def start_rollout(request: Request) -> JSONResponse:
        admin = authorize(request)
        parsed = validate(RolloutRequest, parse_json_object(await proxy.read_body(request)))
        target, version = parsed.target, parsed.version
        if resolve is not None and not parsed.lora:
            try:
                target, registered = resolve(parsed.target)
            except ValueError as exc:
                raise OpenAIError(400, str(exc), param="target", code="rollout_rejected") from None
            version = version or registered
        try:
            rollout = await control.request(
                RolloutCommand(
                    target,
                    version=version,
                    canary_percent=parsed.canary_percent,
                    gate=parsed.gate,
                    lora=parsed.lora,
                    who=admin,
                    strategy=parsed.strategy,
                )
            )
        except RolloutRejected as exc:
            control.audit.record(admin, "rollout_rejected", target=parsed.target, reason=str(exc))
            raise rejected(exc) from None
        return JSONResponse(rollout.to_dict(), status_code=202)

    @app.get("/admin/rollouts")
    async def list_rollouts(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"rollouts": control.history()}

    @app.get("/admin/rollouts/current")
    async def current_rollout(request: Request) -> dict[str, Any]:
        authorize(request)
        if control.current is None:
            raise OpenAIError(404, "no rollout has been requested on this gateway", code="no_rollout")
        return control.current.to_dict()

    @app.post("/admin/rollouts/current/promote")
    async def promote(request: Request) -> dict[str, Any]:
        admin = authorize(request)
        try:
            return (await control.promote(admin)).to_dict()
        except RolloutRejected as exc:
            raise rejected(exc) from None

    @app.post("/admin/rollouts/current/rollback")
    async def rollback(request: Request) -> dict[str, Any]:
        admin = authorize(request)
        try:
            return (await control.rollback(admin)).to_dict()
        except RolloutRejected as exc:
            raise rejected(exc) from None
