"""`peoplebase` command line: a thin layer over the library. `peoplebase` alone means `serve`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click
import orjson

from . import __version__
from .settings import SETTINGS, Setting, Settings
from .store import open_store
from .store.base import StoreUnavailable, UnknownProject

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _option(setting: Setting) -> Callable[[Any], Any]:
    kind: Any
    if setting.choices:
        kind = click.Choice(setting.choices)
    else:
        kind = type(setting.default)
    return click.option(
        setting.flag,
        setting.name,
        type=kind,
        default=setting.default,
        envvar=setting.env,
        show_default=True,
        show_envvar=True,
        help=setting.help,
    )


def setting_options(names: list[str] | None = None) -> Callable[[Any], Any]:
    chosen = [s for s in SETTINGS if names is None or s.name in names]

    def decorate(fn: Any) -> Any:
        for setting in reversed(chosen):
            fn = _option(setting)(fn)
        return fn

    return decorate


db_option = setting_options(["db"])


def _open(db: str) -> Any:
    store = open_store(db)
    try:
        store.open()
    except StoreUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    return store


def _emit(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())


@click.group(invoke_without_command=True, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="peoplebase")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Peoplebase: a self-hosted, Mixpanel-compatible user-profile store.

    Run without a command to serve on the SQLite file ./peoplebase.db.
    """
    if ctx.invoked_subcommand is None:
        sub = serve.make_context("serve", [], parent=ctx)
        with sub:
            serve.invoke(sub)


@main.command(context_settings=CONTEXT)
@setting_options()
def serve(**options: Any) -> None:
    """Serve the /engage ingestion endpoint and the query API over HTTP."""
    import uvicorn

    from .app import PeoplebaseApp

    settings = Settings(**options)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = PeoplebaseApp(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=settings.log_level,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=30,
        backlog=2048,
        server_header=False,
    )
    server = uvicorn.Server(config)
    mode = "open" if settings.tokens_open else "closed"
    click.echo(
        f"peoplebase {__version__}: serving {settings.db} on http://{settings.host}:{settings.port} "
        f"(tokens {mode}, synchronous={settings.synchronous})",
        err=True,
    )
    server.run()
    if not server.started:
        sys.exit(1)


@main.command(context_settings=CONTEXT)
@db_option
def migrate(db: str) -> None:
    """Create or upgrade the database schema."""
    store = open_store(db)
    try:
        version = store.migrate()  # type: ignore[attr-defined]
    except Exception as exc:
        raise click.ClickException(f"cannot migrate {db}: {exc}") from exc
    click.echo(f"{db}: schema version {version}")


@main.group(context_settings=CONTEXT)
def projects() -> None:
    """Create, list and manage projects (token → project, with a secret for the read API)."""


def json_flag(fn: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)


@projects.command("create", context_settings=CONTEXT)
@click.option("--token", required=True, help="The project token that SDKs send as $token.")
@click.option("--name", default="", help="A name for people.")
@json_flag
@db_option
def projects_create(token: str, name: str, as_json: bool, db: str) -> None:
    """Create a project and print its id and secret (shown only once)."""
    store = _open(db)
    try:
        project, secret = store.create_project(token, name)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        _emit({**project.as_json(), "secret": secret})
    else:
        click.echo(
            f"token:      {project.token}\nproject id: {project.id}\nname:       {project.name}"
        )
        click.echo(f"secret:     {secret}   (shown once; store it safely)")


@projects.command("list", context_settings=CONTEXT)
@json_flag
@db_option
def projects_list(as_json: bool, db: str) -> None:
    """List the projects."""
    items = _open(db).list_projects()
    if as_json:
        _emit([p.as_json() for p in items])
        return
    if not items:
        click.echo("no projects")
        return
    click.echo(f"{'id':>6}  {'token':<40}  name")
    for p in items:
        click.echo(f"{p.id:>6}  {p.token:<40}  {p.name}")


@projects.command("rotate-secret", context_settings=CONTEXT)
@click.option("--token", required=True, help="The project's token.")
@json_flag
@db_option
def projects_rotate(token: str, as_json: bool, db: str) -> None:
    """Give a project a new secret; the old one stops working."""
    store = _open(db)
    try:
        project, secret = store.rotate_secret(token)
    except UnknownProject as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        _emit({**project.as_json(), "secret": secret})
    else:
        click.echo(f"new secret for {project.token}: {secret}   (shown once)")


@main.group(context_settings=CONTEXT)
def profiles() -> None:
    """Read profiles."""


@profiles.command("get", context_settings=CONTEXT)
@click.option("--project", "token", required=True, help="The project token.")
@click.argument("distinct_id")
@db_option
def profiles_get(token: str, distinct_id: str, db: str) -> None:
    """Print one profile as JSON."""
    store = _open(db)
    project = store.project_by_token(token)
    if project is None:
        raise click.ClickException(f"no project with token {token!r}")
    found = store.get_profiles(project.id, [distinct_id])
    if not found:
        raise click.ClickException(f"no profile {distinct_id!r} in project {token!r}")
    did, props = found[0]
    _emit({"$distinct_id": did, "$properties": props})
