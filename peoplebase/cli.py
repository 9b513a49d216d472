"""`peoplebase` command line: a thin layer over the library. `peoplebase` alone means `serve`."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, cast

import click
import orjson

from . import __version__
from .clientip import InvalidTrustedProxies
from .collector import settle_server
from .geo_providers import GeoDatabaseError
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


def server_config(app: Any, settings: Settings) -> Any:
    """The HTTP server configuration `serve` uses (also used by the benchmarks' HTTP floor)."""
    import uvicorn

    from .httpguard import guarded_protocol

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=guarded_protocol(settings.request_timeout)
        if settings.request_timeout > 0
        else "httptools",
        lifespan="on",
        access_log=False,
        log_level=settings.log_level,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=30,
        backlog=2048,
        server_header=False,
        # The client address comes from the socket peer, or from forwarding headers only
        # through `trusted_proxies` (peoplebase/clientip.py), never from uvicorn's own rewrite.
        proxy_headers=False,
    )


@main.command(context_settings=CONTEXT)
@setting_options()
def serve(**options: Any) -> None:
    """Serve the /engage ingestion endpoint and the query API over HTTP."""
    import uvicorn

    from .app import PeoplebaseApp

    settings = Settings(**options)
    if settings.max_log_entries < 0:
        raise click.BadParameter("must be 0 (no limit) or more", param_hint="--max-log-entries")
    if settings.log_cache < 0:
        raise click.BadParameter("must be 0 (off) or more", param_hint="--log-cache")
    if settings.write_behind < 0:
        raise click.BadParameter("must be 0 (write-through) or more", param_hint="--write-behind")
    if settings.held_profiles < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--held-profiles")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        app = PeoplebaseApp(settings)
    except (GeoDatabaseError, InvalidTrustedProxies) as exc:
        raise click.ClickException(str(exc)) from exc
    server = uvicorn.Server(server_config(app, settings))
    mode = "open" if settings.tokens_open else "closed"
    click.echo(
        f"peoplebase {__version__}: starting on {settings.db}, serving http://{settings.host}:{settings.port} "
        f"(tokens {mode}, synchronous={settings.synchronous})",
        err=True,
    )
    # uvicorn re-raises SIGTERM/SIGINT once its graceful shutdown is done, which would end the
    # process with the signal's status; a completed graceful shutdown exits 0 instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_quietly)
    settle_server()  # the process's own garbage-collection schedule (collector.py)
    server.run()
    if not server.started:
        sys.exit(1)


def _exit_quietly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


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
    fresh = getattr(store, "fresh", None)
    if fresh is not None:  # a server on the file may hold its newest updates in the journal
        fresh()
    found = store.get_profiles(project.id, [distinct_id])
    if not found:
        raise click.ClickException(f"no profile {distinct_id!r} in project {token!r}")
    did, props = found[0]
    _emit({"$distinct_id": did, "$properties": props})


def _project(store: Any, token: str) -> Any:
    project = store.project_by_token(token)
    if project is None:
        raise click.ClickException(f"no project with token {token!r}")
    return project


@main.group(context_settings=CONTEXT)
def accounts() -> None:
    """Service accounts for the read API: `user:secret` plus project_id (HTTP Basic)."""


@accounts.command("create", context_settings=CONTEXT)
@click.option(
    "--project", "tokens", multiple=True, required=True, help="A project token (repeatable)."
)
@click.option("--name", default="", help="A name for people.")
@json_flag
@db_option
def accounts_create(tokens: tuple[str, ...], name: str, as_json: bool, db: str) -> None:
    """Create a service account for these projects; prints its user name and secret once."""
    store = _open(db)
    pids = [_project(store, t).id for t in tokens]
    account, secret = store.create_service_account(name, pids)
    if as_json:
        _emit({**account.as_json(), "secret": secret})
        return
    click.echo(f"username:    {account.username}\nprojects:    {', '.join(map(str, pids))}")
    click.echo(f"secret:      {secret}   (shown once; store it safely)")
    click.echo(
        f"use as:      curl -u '{account.username}:SECRET' '.../api/query/engage?project_id={pids[0]}'"
    )


@accounts.command("list", context_settings=CONTEXT)
@json_flag
@db_option
def accounts_list(as_json: bool, db: str) -> None:
    """List the service accounts (never their secrets)."""
    items = _open(db).list_service_accounts()
    if as_json:
        _emit([a.as_json() for a in items])
        return
    if not items:
        click.echo("no service accounts")
        return
    for a in items:
        click.echo(f"{a.username:<50}  projects {','.join(map(str, a.project_ids))}  {a.name}")


@main.command("export", context_settings=CONTEXT)
@click.option("--project", "token", required=True, help="The project token.")
@click.option("--where", default="", help='A where expression, e.g. properties["plan"] == "pro".')
@click.option(
    "--format", "fmt", type=click.Choice(["ndjson", "csv"]), default="ndjson", show_default=True
)
@click.option(
    "--output-properties",
    default="",
    help='Only these properties: a JSON list, e.g. ["$email","plan"].',
)
@click.option("-o", "--output", default="-", help="Output file ('-': standard output).")
@db_option
def export_cmd(
    token: str, where: str, fmt: str, output_properties: str, output: str, db: str
) -> None:
    """Export the project's profiles (all, or those matching --where) as NDJSON or CSV."""
    from .query.export import export_to
    from .query.where import WhereSyntaxError, parse

    store = _open(db)
    project = _project(store, token)
    try:
        node = parse(where) if where.strip() else None
    except WhereSyntaxError as exc:
        raise click.ClickException(str(exc)) from exc
    columns = None
    if output_properties:
        try:
            columns = [str(c) for c in orjson.loads(output_properties)]
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise click.ClickException("--output-properties must be a JSON list") from exc
    length = store.count_profiles(project.id)  # with --where, an upper bound
    out = click.open_file(output, "wb")
    with (
        out,
        cast(
            Any,
            click.progressbar(length=length, label="exporting", file=sys.stderr, show_pos=True),
        ) as bar,
    ):
        count = export_to(out, store, project.id, node, fmt, columns, progress=bar.update)
    click.echo(f"exported {count} profiles", err=True)


@main.command("import", context_settings=CONTEXT)
@click.option("--project", "token", required=True, help="The project token to import into.")
@click.option(
    "--rejected",
    default="",
    help="File for the rejected lines with their reasons (default: FILE.rejected.ndjson).",
)
@json_flag
@db_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=False))
def import_cmd(token: str, rejected: str, as_json: bool, db: str, file: str) -> None:
    """Import NDJSON: /engage update records, or profile-export lines
    ({"$distinct_id", "$properties"}). Re-running an import changes nothing for export lines
    and records with $time; records without $time are applied again (docs/query.md)."""
    import os

    from .importer import import_lines

    store = _open(db)
    _project(store, token)
    rejected_path = rejected or file + ".rejected.ndjson"
    with (
        open(file, "rb") as source,
        open(rejected_path, "wb") as bad,
        cast(
            Any,
            click.progressbar(length=os.path.getsize(file), label="importing", file=sys.stderr),
        ) as bar,
    ):
        summary = import_lines(store, token, source, bad, progress=bar.update)
    if not summary.rejected:
        os.unlink(rejected_path)
    if as_json:
        _emit({**summary.as_json(), "rejected_file": rejected_path if summary.rejected else None})
        return
    click.echo(
        f"accepted {summary.accepted} (of which {summary.unchanged} changed nothing), "
        f"rejected {summary.rejected}"
    )
    if summary.rejected:
        click.echo(f"rejected lines and reasons: {rejected_path}")
