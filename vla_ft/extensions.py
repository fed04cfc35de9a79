"""Optional run features that attach to the one loop through :class:`vla_ft.run_setup.Run` hooks.

Each installer looks at the recipe and the runtime and either does nothing or sets hooks
(``run.extras``) / wraps ``run.wrapped``. Keeping them here keeps the loop itself short.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vla_ft.run_setup import Run

INSTALLERS: list = []


def install(run: Run) -> None:
    for installer in INSTALLERS:
        installer(run)
