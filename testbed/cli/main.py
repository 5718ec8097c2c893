"""The `testbed` command: one command group per file in this package."""

from __future__ import annotations

import typer

from testbed.cli import controller, demo, doctor, lab, link, plan, profile, remote, run, status, train
from testbed.cli.errors import friendly_errors
from testbed.lifecycle import unwind_on_signals

app = typer.Typer(
    help="Hardware-in-the-loop testbed for U-shaped split learning and split inference at the 6G edge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("demo")(friendly_errors(demo.demo))
app.command("doctor")(friendly_errors(doctor.doctor))
app.command("plan")(friendly_errors(plan.plan))
app.command("profile")(friendly_errors(profile.profile))
app.command("train")(friendly_errors(train.train))
app.command("status")(friendly_errors(status.status))
app.command("run")(friendly_errors(run.run))
app.add_typer(lab.app, name="lab")
app.add_typer(link.app, name="link")
app.add_typer(remote.app, name="remote")
app.add_typer(controller.app, name="controller")


def main() -> None:
    # SIGTERM and SIGINT unwind as KeyboardInterrupt, so every command's cleanup (stopping its processes) runs.
    unwind_on_signals()
    app()


if __name__ == "__main__":
    main()
