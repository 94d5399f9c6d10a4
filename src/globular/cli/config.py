"""``globular config``: the reference of every setting, and a template resolved."""

from __future__ import annotations

import click
from rich.markup import escape

from globular.cli.render import output, output_option
from globular.config import Config
from globular.errors import BadInput
from globular.reference import markdown, reference, resolved


@click.group("config", short_help="The settings: reference, or a template's.")
def config_group() -> None:
    """The settings globular reads: all of them, or one template's."""


@config_group.command("reference", short_help="Every setting, with its type and default.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Markdown, as in docs/config.md.")
@output_option
@click.pass_context
def config_reference(ctx: click.Context, as_markdown: bool) -> None:
    """Every section and key, with its type, default and description: the core's, and those of
    every installed provider and plugin (generated from their settings models)."""
    out = output(ctx)
    entries = reference()
    if as_markdown:
        click.echo(markdown(entries), nl=False)
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
    with every default filled in; passwords and secret keys masked.  TEMPLATE may also be
    given as `-c TEMPLATE`, as `start` takes it."""
    if option_template and template and option_template != template:
        raise BadInput(f"two templates named: {template} and -c {option_template}")
    template = option_template or template
    out = output(ctx)
    spec = resolved(Config.load(ctx.find_root().obj["config"]), template)

    def text() -> None:
        rows = [("template", spec.template), ("config file", spec.config_file or "(built-in)")]
        rows += [("cluster_size", str(spec.cluster_size)), ("provider", spec.provider)]
        rows += [(f"  {k}", str(v)) for k, v in spec.provider_settings.items()]
        rows += [("environment", spec.environment.mode or "(the provider's default)")]
        for plugin in spec.plugins:
            rows += [(f"plugin {plugin.name}", plugin.setup_class)]
            rows += [(f"  {k}", str(v)) for k, v in plugin.settings.items()]
        out.grid(rows)

    out.result(spec, text=text)
