"""``shipyard deploy`` and ``shipyard rollout status|promote|rollback``: clients of the gateway's admin API."""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from typer.core import TyperGroup

from shipyard.cli.app import ConfigOption, app, fail, settings_from
from shipyard.ops.k8s import write_manifests


class _DeployGroup(TyperGroup):
    """``shipyard deploy TARGET ...`` rolls a version out (the ``start`` subcommand, implied); the group's other
    subcommands write operator files (``shipyard deploy nginx-config``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


deploy_app = typer.Typer(
    cls=_DeployGroup,
    help="Roll a new version out (`shipyard deploy TARGET`), or write operator files (nginx-config, k8s-manifests).",
    no_args_is_help=True,
)
app.add_typer(deploy_app, name="deploy")

rollout_app = typer.Typer(help="The current rollout on a gateway: status, promote, rollback.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")

GatewayOption = Annotated[str, typer.Option("--gateway", help="Gateway URL.")]
AdminKeyOption = Annotated[
    str | None,
    typer.Option("--admin-key", envvar="SHIPYARD_ADMIN_KEY", help="Admin key (default: data_dir/admin_key)."),
]
FINAL = {"done", "failed", "rolled_back"}


def _admin_key(admin_key: str | None, config: Any) -> str:
    if admin_key:
        return admin_key
    key_file = settings_from(config).admin_key_file
    if key_file.is_file():
        return key_file.read_text().strip()
    raise fail(f"no admin key: pass --admin-key, set SHIPYARD_ADMIN_KEY, or run on the gateway host ({key_file})")


def _call(method: str, gateway: str, path: str, key: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        response = httpx.request(
            method, gateway.rstrip("/") + path, json=body, timeout=30, headers={"Authorization": f"Bearer {key}"}
        )
    except httpx.HTTPError as exc:
        raise fail(f"cannot reach the gateway at {gateway}: {exc}") from None
    try:
        payload: dict[str, Any] = response.json()
    except ValueError:
        raise fail(f"gateway answered {response.status_code} with a non-JSON body") from None
    if response.status_code >= 400:
        raise fail(f"{payload.get('error', {}).get('message', response.text)} (HTTP {response.status_code})")
    return payload


ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="The fleet model to act on (needed when the gateway serves several)."),
]


def _query(model: str | None) -> str:
    return f"?{urllib.parse.urlencode({'model': model})}" if model else ""


def _line(rollout: dict[str, Any]) -> str:
    spans = ", ".join(f"{phase} {seconds:.2f}s" for phase, seconds in rollout["durations_s"].items())
    facts = " ".join(f"{k}={v}" for k, v in rollout["facts"].items())
    strategy = rollout.get("strategy", "")
    return f"rollout {rollout['id']} [{rollout['phase']}] {rollout['version']} ({strategy}): {spans}" + (
        f" | {facts}" if facts else ""
    )


@deploy_app.command("start")
def deploy(
    target: Annotated[
        str,
        typer.Argument(
            help="Model folder, registered NAME[:VERSION], http(s) URL of a running server, or LoRA adapter folder."
        ),
    ],
    gateway: GatewayOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    version: Annotated[str | None, typer.Option(help="Version name (default: the folder's name).")] = None,
    canary: Annotated[float | None, typer.Option(help="Send this percent of traffic to the new version first.")] = None,
    gate: Annotated[str | None, typer.Option(help="Quality gate, e.g. intent:min_acc=0.8[,n=32].")] = None,
    lora: Annotated[bool, typer.Option(help="TARGET is a LoRA adapter for the served base: hot-load it.")] = False,
    strategy: Annotated[
        str,
        typer.Option(
            help="auto: reload the weights in place when they fit the running engines, else blue-green; "
            "inplace; or blue-green."
        ),
    ] = "auto",
    model: ModelOption = None,
    wait: Annotated[bool, typer.Option(help="Follow the rollout until it is done, failed or in canary.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to follow it.")] = 900,
    config: ConfigOption = None,
) -> None:
    """Roll a new version out with no downtime (in place, blue-green, canary, or LoRA hot-load)."""
    key = _admin_key(admin_key, config)
    body = {
        "target": target,
        "version": version,
        "canary_percent": canary,
        "gate": gate,
        "lora": lora,
        "strategy": strategy,
        **({"model": model} if model else {}),
    }
    rollout = _call("POST", gateway, "/admin/rollouts", key, body)
    typer.echo(
        f"rollout {rollout['id']} accepted{' for ' + model if model else ''}: {target} as version {rollout['version']} "
        f"-> deployment {rollout['new_deployment']}, {rollout['strategy']}: {rollout['strategy_reason']}"
    )
    if not wait:
        return
    deadline, seen = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        rollout = _call("GET", gateway, f"/admin/rollouts/current{_query(model)}", key)
        if rollout["phase"] != seen:
            seen = rollout["phase"]
            typer.echo(_line(rollout))
        if seen in FINAL or seen == "canary":
            break
        time.sleep(0.1)
    if rollout["phase"] == "failed":
        raise fail(f"rollout failed, the previous version keeps serving: {rollout['error']}")
    if rollout["phase"] == "canary":
        typer.echo(f"canary at {rollout['canary_percent']}%: `shipyard rollout promote` or `shipyard rollout rollback`")
    elif rollout["phase"] not in FINAL:
        raise fail(f"rollout still {rollout['phase']} after {timeout:.0f}s; follow it with `shipyard rollout status`")


@rollout_app.command("status")
def status(
    gateway: GatewayOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
    model: ModelOption = None,
    config: ConfigOption = None,
) -> None:
    """Each model's deployments, their weights and replicas (with their devices), and its current rollout."""
    described = _call("GET", gateway, f"/admin/deployments{_query(model)}", _admin_key(admin_key, config))
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    fleet = described["models"] if "models" in described else {described.get("model") or "": described}
    for name, one in fleet.items():
        indent = "  " if len(fleet) > 1 else ""
        if len(fleet) > 1:
            typer.echo(f"model {name}:")
        _print_model(one, indent)


def _print_model(described: dict[str, Any], indent: str) -> None:
    for name, deployment in described["deployments"].items():
        typer.echo(f"{indent}{name}: weight {deployment['weight']:.2f}")
        for r in deployment["replicas"]:
            state = "ready" if r["ready"] else f"NOT READY ({r['error']})"
            place = (
                f" gpus={r['devices']}" if r.get("devices") else f" cpus={r['cpu_bind']}" if r.get("cpu_bind") else ""
            ) + (f" host={r['host']}" if r.get("host") else "")
            rotation = f" [{r['rotation']}]" if r.get("rotation") else ""
            typer.echo(
                f"{indent}  {r['name']} {r['url']} version={r['version']} {state}{rotation} "
                f"in_flight={r['in_flight']} restarts={r['restarts']}{place}"
            )
    for alias, target in described["aliases"].items():
        typer.echo(f"{indent}alias {alias} -> {target}")
    if described["rollout"]:
        typer.echo(indent + _line(described["rollout"]))
    if described.get("scale") and described["scale"]["mode"] != "fixed":
        typer.echo(indent + _scale_line(described["scale"]))


def _scale_line(scale: dict[str, Any]) -> str:
    """``scale [auto] 2 -> 2 replicas (1 serving, 1 starting): waiting at 1.80x its target``."""
    counts = ", ".join(f"{n} {state}" for state, n in scale["replicas"].items() if n)
    pending = f" | pending: {scale['pending']}" if scale.get("pending") else ""
    have = sum(n for state, n in scale["replicas"].items() if state != "draining")
    counts = counts or "none"
    return f"scale [{scale['mode']}] {have} -> {scale['desired']} replicas ({counts}): {scale['reason']}{pending}"


@app.command("scale")
def scale(
    replicas: Annotated[
        int | None, typer.Option("--replicas", "-n", min=0, max=16, help="Hold this many replicas (by hand).")
    ] = None,
    auto: Annotated[bool, typer.Option("--auto", help="Hand the count back to the model's autoscaler.")] = False,
    gateway: GatewayOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Set a model's replica count by hand (`--replicas N`), or hand it back to its autoscaler (`--auto`); with
    neither, show how it is scaled. The gateway's control plane carries it out under the model's lease."""
    key = _admin_key(admin_key, config)
    if replicas is not None and auto:
        raise fail("give --replicas N or --auto, not both")
    if replicas is None and not auto:
        shown = _call("GET", gateway, f"/admin/scale{_query(model)}", key)
    else:
        body: dict[str, Any] = {"replicas": replicas} if replicas is not None else {"auto": True}
        shown = _call("POST", gateway, "/admin/scale", key, {**body, **({"model": model} if model else {})})
    if as_json:
        typer.echo(json.dumps(shown, indent=2))
        return
    fleet = shown["models"] if "models" in shown else {model or "": shown}
    for name, one in fleet.items():
        typer.echo((f"{name}: " if name else "") + _scale_line(one))


@rollout_app.command("promote")
def promote(
    gateway: GatewayOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    model: ModelOption = None,
    config: ConfigOption = None,
) -> None:
    """Send all traffic to the canary and retire the old version."""
    path = f"/admin/rollouts/current/promote{_query(model)}"
    typer.echo(_line(_call("POST", gateway, path, _admin_key(admin_key, config))))


@rollout_app.command("rollback")
def rollback(
    gateway: GatewayOption = "http://127.0.0.1:8080",
    admin_key: AdminKeyOption = None,
    model: ModelOption = None,
    config: ConfigOption = None,
) -> None:
    """Return all traffic to the previous version in one step (while it is still running), or reload the
    previous weights after an in-place update."""
    path = f"/admin/rollouts/current/rollback{_query(model)}"
    typer.echo(_line(_call("POST", gateway, path, _admin_key(admin_key, config))))


@deploy_app.command("nginx-config")
def nginx_config(
    server_name: Annotated[str, typer.Option(help="Public host name, e.g. llm.example.com.")],
    gateway: Annotated[
        list[str] | None, typer.Option("--gateway", help="Gateway replica host:port (repeatable).")
    ] = None,
    ui: Annotated[str | None, typer.Option(help="Chat page host:port, served under /ui/.")] = None,
    cert: Annotated[str, typer.Option(help="TLS certificate path on the nginx host.")] = "/etc/nginx/tls/tls.crt",
    key: Annotated[str, typer.Option(help="TLS key path on the nginx host.")] = "/etc/nginx/tls/tls.key",
    no_tls: Annotated[bool, typer.Option("--no-tls", help="Plain HTTP on :80 (TLS ends elsewhere).")] = False,
    http_port: Annotated[int, typer.Option(help="Plain-HTTP port (the one served with --no-tls).")] = 80,
    max_body: Annotated[str, typer.Option(help="client_max_body_size.")] = "2m",
    read_timeout: Annotated[int, typer.Option(help="Seconds a generation may take (proxy_read_timeout).")] = 600,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Write an nginx config: TLS termination, streaming-friendly (buffering off), gateway upstreams."""
    from shipyard.ops import NginxConfig, render_nginx

    try:
        config = NginxConfig(
            server_name=server_name,
            gateways=tuple(gateway or ["127.0.0.1:8080"]),
            ui=ui,
            tls_certificate=None if no_tls else cert,
            tls_certificate_key=None if no_tls else key,
            max_body=max_body,
            read_timeout_s=read_timeout,
            http_port=http_port,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    text = render_nginx(config)
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc}") from None
    typer.echo(f"wrote {out}", err=True)


@deploy_app.command("k8s-manifests")
def k8s_manifests(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the manifests into.")],
    config: ConfigOption = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster", help="ray: a KubeRay RayCluster the gateways place the engines on (default: Deployments)"
        ),
    ] = None,
) -> None:
    """Write Kubernetes manifests for the fleet of the settings (``models:``): engines per model, gateways, Redis."""
    settings = settings_from(config)
    try:
        written = write_manifests(settings, out, cluster)
    except (ValueError, OSError) as exc:
        raise fail(f"cannot write the manifests: {exc}") from None
    typer.echo(f"wrote {len(written)} files to {out} (apply with: kubectl apply -k {out})")
