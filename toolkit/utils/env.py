"""On/off switches read from the environment (``TOOLKIT_CPU_KERNEL``, ``TOOLKIT_ONEDNN_LINEAR``)."""
from __future__ import annotations

import os
from typing import Optional

from toolkit.errors import ConfigError

OFF_VALUES = ("0", "false", "off", "no")
ON_VALUES = ("", "1", "true", "on", "yes", "auto")


def switched_off(name: str) -> Optional[str]:
    """``"NAME=value"`` when the environment turns the switch ``name`` off, None when it is unset
    or on; a ConfigError naming the variable for any other value (a typo must not silently
    leave a fast path on, or off)."""
    value = os.environ.get(name, "").strip().lower()
    if value in OFF_VALUES:
        return f"{name}={value}"
    if value in ON_VALUES:
        return None
    raise ConfigError(name, f"environment variable set to {os.environ[name]!r}; use one of "
                            f"{', '.join(v for v in ON_VALUES if v)} to keep it on or {', '.join(OFF_VALUES)} "
                            f"to turn it off")
