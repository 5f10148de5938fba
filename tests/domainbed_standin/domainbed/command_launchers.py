"""Stand-in of DomainBed's command launchers: `local` and `dummy` in `REGISTRY`."""

import subprocess


def local_launcher(commands):
    """Run the commands one after the other on this machine."""
    for cmd in commands:
        subprocess.call(cmd, shell=True)


def dummy_launcher(commands):
    """Print the commands without running them."""
    for cmd in commands:
        print(f"Dummy launcher: {cmd}")


REGISTRY = {"local": local_launcher, "dummy": dummy_launcher}
