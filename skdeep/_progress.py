"""Progress bars: tqdm's, which a notebook shows as a widget and a terminal as a bar."""

from __future__ import annotations


def progress_bar(total: int, description: str, enabled: bool = True, initial: int = 0):
    """Return a tqdm bar counting images (a disabled one does nothing).

    ``tqdm.auto`` picks the notebook widget where one can be drawn, else the terminal
    bar on stderr; either shows images per second.
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit="img",
        disable=not enabled,
        dynamic_ncols=True,
        leave=True,
    )
