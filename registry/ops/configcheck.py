"""`dockyard serve --check-config`, and the effective settings in the log.

The check loads the settings exactly as serving would (file, environment,
flags), then the parts that live outside the settings: TLS files, the
htpasswd and policy files, and storage (S3: bucket and credentials;
filesystem: the root exists or can be made). It never serves and never
writes storage beyond the readiness probe's write-read-delete.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from registry.settings import Settings

MASK = "***"
# leaf keys holding a secret itself (a path to a secret file is no secret)
_SECRET_KEY = re.compile(r"secret|password|session_token|access_key_id")


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as a mapping, every secret value replaced by ***."""
    def walk(obj: Any) -> Any:
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = walk(value)
            elif isinstance(value, tuple):
                out[f.name] = [walk(v) if dataclasses.is_dataclass(v) else v for v in value]
                if f.name == "headers":      # "Authorization: Bearer ...": the name, not the value
                    out[f.name] = [f"{h.split(':', 1)[0]}: {MASK}" for h in value]
            elif _SECRET_KEY.search(f.name) and value:
                out[f.name] = MASK
            else:
                out[f.name] = value
        return out

    return walk(settings)


def effective_settings_line(settings: Settings) -> str:
    return "effective settings: " + json.dumps(masked(settings), separators=(",", ":"), sort_keys=True)
