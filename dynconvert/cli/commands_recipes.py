"""``dynconvert recipes``: list the shipped recipes and show one."""

from __future__ import annotations

from typing import Annotated

import typer

from dynconvert.cli import render
from dynconvert.cli.errors import known_errors
from dynconvert.cli.options import JsonOpt, SetOpt


def recipes_list(json: JsonOpt = False) -> None:
    """List the shipped recipes: name, model, FLOPs target, steps, batch, description.

    [bold]Examples[/bold]

      dynconvert recipes list

      dynconvert recipes list --json
    """
    from dynconvert.recipes import recipe_summary, shipped_recipes

    rows = [recipe_summary(name) for name in shipped_recipes()]
    if json:
        render.print_json(rows)
        return
    t = render.table("Recipes (dynconvert recipes show NAME)", "name", "model", "target>",
                     "steps>", "batch>", "description")  # fmt: skip
    for r in rows:
        t.add_row(r["name"], str(r["model"]), f"{r['target_flops']:g}", f"{r['steps']:,}",
                  str(r["batch_size"]), r["description"])  # fmt: skip
    render.out().print(t)


def recipes_show(
    name: Annotated[
        str, typer.Argument(help="A shipped recipe name or a YAML file.", show_default=False)
    ],
    resolved: Annotated[
        bool,
        typer.Option("--resolved", help="Print every field after checking, defaults included."),
    ] = False,
    set_: SetOpt = None,
    json: JsonOpt = False,
) -> None:
    """Print a recipe: its YAML file with the comments that document each field.

    With --resolved (or --set, or --json), the checked recipe with every field, including the
    convert and calibration defaults the file leaves out.

    [bold]Examples[/bold]

      dynconvert recipes show dit-xl-imagenet256

      dynconvert recipes show digits --resolved --set calibration.steps=1000

      dynconvert recipes show my-recipe.yaml --json
    """
    import yaml

    from dynconvert.recipes import load_recipe, recipe_path

    recipe = load_recipe(name, list(set_ or []))  # checks it, even when printing the file
    if not (resolved or set_ or json):
        typer.echo(recipe_path(name).read_text(), nl=False)
        return
    data = recipe.to_dict()
    data["convert"] = recipe.convert_config().to_dict()
    cal = recipe.calibration_config().to_dict()
    for key in ("target", "output_dir", "resume"):
        cal.pop(key, None)
    data["calibration"] = cal
    if json:
        render.print_json(data)
    else:
        typer.echo(yaml.safe_dump(data, sort_keys=False, width=100), nl=False)


def make_recipes_app() -> typer.Typer:
    """The ``recipes`` command group."""
    app = typer.Typer(
        help="List and show the shipped recipes (checked settings of a whole convert run).\n\n"
        "[bold]Examples[/bold]\n\n  dynconvert recipes list\n\n  dynconvert recipes show digits",
        rich_markup_mode="rich",
        no_args_is_help=True,
    )
    app.command("list")(known_errors(recipes_list))
    app.command("show")(known_errors(recipes_show))
    return app
