"""``globular config`` (the reference of every setting, a template resolved) and ``globular env``
(node environments)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.markup import escape

from globular.cli.group import Later, load_config, run
from globular.cli.render import output, output_option
from globular.errors import BadInput
from globular.paths import globular_home
from globular.results import counted

if TYPE_CHECKING:
    from globular import operations, reference, wheelhouse
else:  # imported by the commands that use them, when they run
    wheelhouse = Later("globular.wheelhouse")
    operations, reference = Later("globular.operations"), Later("globular.reference")


@click.group("config", short_help="The settings: reference, or a template's.")
def config_group() -> None:
    """The settings globular reads: all of them, or one template's."""


@config_group.command("reference", short_help="Every setting, with its type and default.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Markdown, as in docs/reference/config.md.")
@output_option
@click.pass_context
def config_reference(ctx: click.Context, as_markdown: bool) -> None:
    """Every section and key, with its type, default and description: the core's, and those of
    every installed provider and plugin (generated from their settings models)."""
    out = output(ctx)
    entries = reference.reference()
    if as_markdown:
        click.echo(reference.markdown(entries), nl=False)
        return

    def text() -> None:
        table = out.table("section", "key", "type", "default", "description")
        for e in entries:
            table.add_row(escape(e.section), e.key, escape(e.type), escape(e.default), escape(e.description))
        out.print(table)

    out.result({"settings": entries}, text=text)


@config_group.command("show", short_help="A template as globular reads it.")
@click.option(
    "-c",
    "--cluster-template",
    "option_template",
    metavar="TEMPLATE",
    help="[cluster TEMPLATE] to show (as `start -c`).",
)
@click.argument("template", required=False)
@output_option
@click.pass_context
def config_show(ctx: click.Context, option_template: str | None, template: str | None) -> None:
    """TEMPLATE (default: default_template) as globular reads it: after `extends`, validated,
    every key with the value the cluster will use (defaults and what the provider or a plugin
    decides filled in, in units: 1 GB, 10 s, 30m) and where it comes from: set in the template,
    inherited from another through `extends`, another section ([aws info], [key NAME]), or
    the default.  Passwords and secret keys are masked.  TEMPLATE may also be given as
    `-c TEMPLATE`, as `start` takes it.  With --output json: the resolved template, and its
    `settings` as these lines."""
    if option_template and template and option_template != template:
        raise BadInput(f"two templates named: {template} and -c {option_template}")
    template = option_template or template
    out = output(ctx)
    config = load_config(ctx)
    spec = config.cluster_spec(template)
    lines = reference.template_settings(config, spec)

    def text() -> None:
        out.grid([("template", spec.template), ("config file", spec.config_file or "(built-in)")])
        table = out.table("section", "key", "value", "source")
        section = None
        for line in lines:
            table.add_row(
                escape(line.section) if line.section != section else "",
                line.key,
                escape(line.value),
                escape(line.source),
            )
            section = line.section
        out.print(table)

    out.result({**reference.resolved(spec).model_dump(mode="json"), "settings": lines}, text=text)


@click.group(short_help="Node environments: prune them.")
def env() -> None:
    """Node environments: the venvs globular builds on the hosts (environment = managed)."""


@env.command("prune", short_help="Remove node environments from the hosts.")
@click.option(
    "-c", "--cluster-template", "template", help="[cluster TEMPLATE] whose hosts to clean (default: default_template)."
)
@click.option("--wheels", is_flag=True, help="Also empty this machine's wheelhouse cache (~/.globular/wheels).")
@output_option
@click.pass_context
def env_prune(ctx: click.Context, template: str | None, wheels: bool) -> None:
    """Remove the node environments from the hosts of a template.

    Environments that a running cluster of this machine uses are kept.  The next
    start builds what it needs again (from the wheelhouse cache here, offline).
    """
    out = output(ctx)
    spec = load_config(ctx).cluster_spec(template)
    with out.reporter() as reporter:
        removed = run(operations.prune_environments(spec, reporter=reporter))
    cache = globular_home() / "wheels"
    count = wheelhouse.clear_wheel_cache(cache) if wheels else None

    def text() -> None:
        for node, names in removed.items():
            listed = f" ({', '.join(names)})" if names else ""
            out.say(f"{escape(node)}: {counted(len(names), 'environment')} removed{escape(listed)}")
        if count is not None:
            out.say(f"this machine: {counted(count, 'wheelhouse')} removed from {escape(str(cache))}")

    out.result({"removed": removed, "wheelhouses_removed": count}, text=text)
