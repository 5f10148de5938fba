"""Test double for `domainbed.command_launchers`: `REGISTRY` with `local` and `dummy`."""

import subprocess


def run_here(commands):
    """Each command in turn, in a shell on this machine."""
    for command in commands:
        subprocess.call(command, shell=True)


def print_only(commands):
    """The commands, printed and not run."""
    for command in commands:
        print(f"would run: {command}")


REGISTRY = {"local": run_here, "dummy": print_only}
