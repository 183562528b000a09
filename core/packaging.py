"""The distribution's optional parts (extras) and the guard against shadowed top-level packages.

progressbot installs three top-level packages, ``core``, ``adapters`` and ``bot`` (the project's layout).
pip does not notice when two distributions install files into the same package, so another distribution
with a ``core`` or ``bot`` package silently overwrites ours, or ours overwrites it. :func:`shadowing`
detects that from the installed distributions' metadata, for the CLI to say so at start-up.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from .errors import ProgressbotError

DISTRIBUTION = "progressbot"

#: The top-level packages the distribution installs.
TOP_LEVEL_PACKAGES = ("core", "adapters", "bot")

#: Each extra and the modules it provides (what ``pip install 'progressbot[extra]'`` brings).
EXTRAS: dict[str, tuple[str, ...]] = {
    "matrix": ("nio",),
    "discord": ("discord",),
    "postgres": ("psycopg",),
}


class MissingExtra(ProgressbotError, ImportError):
    """A configured feature needs an extra that is not installed."""

    def __init__(self, extra: str, feature: str) -> None:
        self.extra = extra
        super().__init__(
            f"{feature} needs the optional dependencies of progressbot[{extra}]; "
            f"install them with: pip install 'progressbot[{extra}]'"
        )


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtra` unless every module of ``extra`` can be imported."""
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(extra, feature)


def shadowing() -> dict[str, list[str]]:
    """``{package: [other distributions]}`` for our top-level packages that other distributions also install.

    Empty when nothing else claims them (also when progressbot runs from a source tree, not installed).
    """
    owners = importlib.metadata.packages_distributions()
    found: dict[str, list[str]] = {}
    for package in TOP_LEVEL_PACKAGES:
        others = sorted({d for d in owners.get(package, []) if _canonical(d) != DISTRIBUTION})
        if others:
            found[package] = others
    return found


def shadowing_message(found: dict[str, list[str]]) -> str:
    """The start-up refusal for :func:`shadowing`'s answer: what clashes and what to do."""
    lines = [
        "progressbot cannot start: other installed distributions also provide its top-level packages,",
        "so their files and progressbot's overwrite each other:",
    ]
    lines += [f"  '{package}' is also installed by {', '.join(dists)}" for package, dists in found.items()]
    lines.append("Install progressbot in its own virtual environment (python -m venv), or uninstall those.")
    return "\n".join(lines)


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


__all__ = ["EXTRAS", "MissingExtra", "require_extra", "shadowing", "shadowing_message"]
