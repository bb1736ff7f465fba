"""The admin API: rollouts and deployments, behind admin keys that are distinct from user keys."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from shipyard.control.commands import RolloutCommand, RolloutRejected
from shipyard.control.plane import ControlPlane
from shipyard.control.scaler import ScaleRejected
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
    model: str | None = Field(default=None, min_length=1, description="the fleet model to update")


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    replicas: int | None = Field(default=None, ge=0, le=16, description="the count to hold, set by hand")
    auto: bool = Field(default=False, description="hand the count back to the model's autoscaler")
    model: str | None = Field(default=None, min_length=1, description="the fleet model to scale")


def install_admin_routes(
    app: FastAPI,
    proxy: Proxy,
    keys: KeyChecker,
    controls: Mapping[str, ControlPlane],
    resolve: Callable[[str], tuple[str, str | None]] | None = None,
) -> None:
    """``controls``: the control plane of each model of the fleet. ``resolve``: a registry reference
    ``NAME[:VERSION]`` -> (folder, version) for rollout targets.

    Each route acts on one model: the one named by ``model`` (the rollout's body field, or ``?model=`` on the
    others), or the only one of a fleet of one. ``GET /admin/deployments`` without a model on a fleet of
    several describes them all (``{"models": {name: ...}}``)."""

    def plane(model: str | None) -> ControlPlane:
        if model is None:
            if len(controls) == 1:
                return next(iter(controls.values()))
            raise OpenAIError(
                400,
                f"several models are served ({', '.join(controls)}); name the one to change in 'model'",
                param="model",
                code="model_required",
            )
        if model not in controls:
            raise OpenAIError(
                404,
                f"no model {model!r} in this fleet; models: {', '.join(controls)}",
                param="model",
                code="model_not_found",
            )
        return controls[model]

    def authorize(request: Request) -> str:
        """The admin's identity for the audit log: ``admin:<key name>``, never the key."""
        return "admin:" + keys.check(request.headers.get("authorization"))

    def rejected(exc: RolloutRejected) -> OpenAIError:
        return OpenAIError(exc.status, str(exc), code="rollout_rejected")

    @app.get("/admin/deployments")
    async def deployments(request: Request, model: str | None = None) -> dict[str, Any]:
        authorize(request)
        if model is None and len(controls) > 1:
            return {"models": {name: c.describe() for name, c in controls.items()}}
        return plane(model).describe()

    @app.post("/admin/rollouts", status_code=202)
    async def start_rollout(request: Request) -> JSONResponse:
        admin = authorize(request)
        parsed = validate(RolloutRequest, parse_json_object(await proxy.read_body(request)))
        control = plane(parsed.model)
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

    @app.get("/admin/scale")
    async def scale_status(request: Request, model: str | None = None) -> dict[str, Any]:
        authorize(request)
        if model is None and len(controls) > 1:
            return {"models": {name: c.scale_status() for name, c in controls.items()}}
        return plane(model).scale_status()

    @app.post("/admin/scale")
    async def scale(request: Request) -> dict[str, Any]:
        admin = authorize(request)
        parsed = validate(ScaleRequest, parse_json_object(await proxy.read_body(request)))
        if (parsed.replicas is None) == (not parsed.auto):
            raise OpenAIError(400, "give either 'replicas' (a count to hold) or 'auto': true", code="scale_rejected")
        try:
            return await plane(parsed.model).scale(parsed.replicas, admin)
        except ScaleRejected as exc:
            raise OpenAIError(exc.status, str(exc), code="scale_rejected") from None

    @app.get("/admin/rollouts")
    async def list_rollouts(request: Request, model: str | None = None) -> dict[str, Any]:
        authorize(request)
        if model is None and len(controls) > 1:
            return {"rollouts": [r for c in controls.values() for r in c.history()]}
        return {"rollouts": plane(model).history()}

    @app.get("/admin/rollouts/current")
    async def current_rollout(request: Request, model: str | None = None) -> dict[str, Any]:
        authorize(request)
        control = plane(model)
        if control.current is None:
            raise OpenAIError(404, "no rollout has been requested on this gateway", code="no_rollout")
        return control.current.to_dict()

    @app.post("/admin/rollouts/current/promote")
    async def promote(request: Request, model: str | None = None) -> dict[str, Any]:
        admin = authorize(request)
        try:
            return (await plane(model).promote(admin)).to_dict()
        except RolloutRejected as exc:
            raise rejected(exc) from None

    @app.post("/admin/rollouts/current/rollback")
    async def rollback(request: Request, model: str | None = None) -> dict[str, Any]:
        admin = authorize(request)
        try:
            return (await plane(model).rollback(admin)).to_dict()
        except RolloutRejected as exc:
            raise rejected(exc) from None
