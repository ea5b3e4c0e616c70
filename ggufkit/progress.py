"""Progress bars on a terminal, silence in pipes."""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar(total=None, desc: str = "", unit: str = "it", **kwargs) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(),
                dynamic_ncols=True, leave=False, **kwargs)
