"""Users, policies and credentials for tests of an authenticated registry.

    users = write_htpasswd(tmp_path / "htpasswd", USERS)       # bcrypt, cost 4: fast
    policy = write_policy(tmp_path / "policy.yml", EXAMPLE_POLICY)

EXAMPLE_POLICY is the policy of the auth issue: `reader` pulls team-a/app,
the `devs` group (builder, deployer) does everything under team-a/ and
pushes to public/, anonymous pulls public/, `outsider` pulls and pushes
scratch/NAME only, builder lists the catalog.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Mapping

USERS = {"reader": "reader-secret-1", "builder": "builder-secret-2", "deployer": "deployer-secret-3",
         "outsider": "outsider-secret-4"}

EXAMPLE_POLICY = {
    "groups": {"devs": ["builder", "deployer"]},
    "rules": [
        {"repositories": ["team-a/app"], "users": ["reader"], "actions": ["pull"]},
        {"repositories": ["team-a/**"], "groups": ["devs"], "actions": ["pull", "push", "delete"]},
        {"repositories": ["public/**"], "users": ["anonymous"], "actions": ["pull"]},
        {"repositories": ["public/**"], "groups": ["devs"], "actions": ["push"]},
        {"repositories": ["scratch/*"], "users": ["outsider"], "actions": ["pull", "push"]},
    ],
    "catalog": ["builder"],
}


def write_htpasswd(path: str | Path, users: Mapping[str, str], *, cost: int = 4) -> Path:
    """An htpasswd file of bcrypt entries ($2y$, as `htpasswd -B` writes)."""
    import bcrypt

    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()
        lines.append(f"{user}:{'$2y$' + hashed[4:]}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_policy(path: str | Path, policy: Mapping) -> Path:
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(dict(policy), sort_keys=False))
    return path


def basic(user: str, password: str) -> str:
    """An Authorization header value for Basic credentials."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def bearer(token: str) -> str:
    return f"Bearer {token}"


def claims_of(token: str) -> dict:
    """A JWT's payload, unverified (to look at what a token service granted)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def access_of(token: str) -> dict[tuple[str, str], set[str]]:
    """{(type, name): actions} of a token's access claim."""
    return {(entry["type"], entry["name"]): set(entry["actions"]) for entry in claims_of(token)["access"]}
