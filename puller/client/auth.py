"""Registry authentication: challenges, scopes, credentials, realm policy.

- `parse_challenges(header)`: RFC 7235 WWW-Authenticate parsing (several
  challenges per header, quoted values with commas and escapes).
- `Scope`: "repository:NAME:ACTIONS". NAME may itself contain ':' (a
  repository under "host:port/..."), so the type is split at the first ':'
  and the actions at the last one - never naively.
- Credentials come from Docker's config (`$DOCKER_CONFIG/config.json` or
  `~/.docker/config.json`): `auths[host].auth` (base64 "user:pass") or
  `identitytoken`, `credsStore` and `credHelpers` through
  `docker-credential-<helper> get|store|erase`. A user who ran `docker login`
  is already logged in here, and `dockyard login` writes what docker reads:
  `{"auth": base64("user:pass")}`, or with an identity token (an OAuth2
  refresh token a token server issued at login) `{"auth": base64("user:"),
  "identitytoken": "..."}` - no password; through a helper, the secret
  (user name `<token>` for an identity token) goes to the helper and the
  entry in config.json stays empty. The repr of Credentials shows neither
  password nor token.
- `check_realm(realm, host, registry_base)`: where a token request, which
  carries the credentials, may go (HTTPS; plain HTTP only to a plain
  loopback registry's own host).

The bearer-token flow itself (fetching, caching) is puller.client.tokens.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from puller.client.reference import DOCKER_HUB, DOCKER_HUB_API, is_loopback
from puller.errors import AuthError, CredentialError, one_line

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"

# -- challenges -------------------------------------------------------------------

@dataclass(frozen=True)
class Challenge:
    scheme: str                      # lower-case: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _read_token(text: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(text) and text[i] not in " \t,=\"":
        i += 1
    return text[start:i], i


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    # text[i] == '"'
    i += 1
    out = []
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    return "".join(out), i  # unterminated: take what is there


def parse_challenges(header: str) -> list[Challenge]:
    """Parse one WWW-Authenticate header value into its challenges."""
    challenges: list[Challenge] = []
    i, n = 0, len(header)
    current: Challenge | None = None
    while i < n:
        i = _skip_ws(header, i)
        if i < n and header[i] == ",":
            i += 1
            continue
        token, j = _read_token(header, i)
        if not token:
            i = j + 1
            continue
        k = _skip_ws(header, j)
        if k < n and header[k] == "=" and current is not None:
            # auth-param of the current challenge
            k = _skip_ws(header, k + 1)
            if k < n and header[k] == '"':
                value, k = _read_quoted(header, k)
            else:
                value, k = _read_token(header, k)
                # token68 padding like "abc==" is not a param; tolerate it
            current.params[token.lower()] = value
            i = k
            continue
        if k < n and header[k] == "=" and current is None:
            i = k + 1
            continue
        # a new scheme
        current = Challenge(token.lower(), {})
        challenges.append(current)
        i = k
    return challenges


def challenges_from_headers(values: list[str]) -> list[Challenge]:
    out: list[Challenge] = []
    for value in values:
        out.extend(parse_challenges(value))
    return out


# -- scopes -----------------------------------------------------------------------

@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Scope":
        kind, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not sep or not sep2 or not kind or not name:
            raise ValueError(f"invalid scope {text!r}")
        return cls(kind, name, tuple(a for a in actions.split(",") if a))

    @classmethod
    def repository(cls, name: str, *actions: str) -> "Scope":
        return cls("repository", name, tuple(actions))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


def parse_scope_list(text: str) -> list[Scope]:
    out = []
    for part in (text or "").split():
        try:
            out.append(Scope.parse(part))
        except ValueError:
            continue
    return out


def merge_scopes(scopes: list[Scope]) -> list[Scope]:
    """Union of actions per resource, keeping first-seen order (so the push
    scope asked first stays first)."""
    merged: dict[tuple[str, str], list[str]] = {}
    for scope in scopes:
        actions = merged.setdefault((scope.type, scope.name), [])
        for action in scope.actions:
            if action not in actions:
                actions.append(action)
    return [Scope(kind, name, tuple(actions)) for (kind, name), actions in merged.items()]


# -- credentials ------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)     # OAuth2 refresh token

    @property
    def anonymous(self) -> bool:
        return not (self.username or self.password or self.identity_token)

    def basic_header(self) -> str:
        raw = f"{self.username or ''}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()


ANONYMOUS = Credentials()


def docker_config_dir() -> pathlib.Path:
    env = os.environ.get("DOCKER_CONFIG")
    return pathlib.Path(env) if env else pathlib.Path(os.path.expanduser("~")) / ".docker"


def config_key(registry: str) -> str:
    """The key Docker uses in config.json for a registry."""
    if registry in (DOCKER_HUB, DOCKER_HUB_API, "index.docker.io"):
        return DOCKER_HUB_AUTH_KEY
    return registry


def _normalise_key(key: str) -> str:
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.split("/", 1)[0]


class DockerConfig:
    """Docker's client config file, read and written the way docker does."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.dir = pathlib.Path(directory) if directory else docker_config_dir()
        self.path = self.dir / "config.json"

    def load(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise CredentialError(f"{self.path} is not valid JSON: {exc}") from exc
        except OSError as exc:
            raise CredentialError(one_line(exc)) from exc

    def save(self, data: dict) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".config.json.")
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent="\t")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise CredentialError(one_line(exc)) from exc

    def helper_for(self, registry: str, data: dict | None = None) -> str | None:
        data = self.load() if data is None else data
        helpers = data.get("credHelpers") or {}
        key = config_key(registry)
        for candidate in (key, registry, _normalise_key(key)):
            if candidate in helpers:
                return helpers[candidate]
        return data.get("credsStore") or None

    def get(self, registry: str) -> Credentials:
        data = self.load()
        key = config_key(registry)
        helper = self.helper_for(registry, data)
        if helper:
            creds = _helper_get(helper, key)
            if creds is not None:
                return creds
        auths = data.get("auths") or {}
        entry = auths.get(key)
        if entry is None:
            wanted = _normalise_key(key)
            for name, value in auths.items():
                if _normalise_key(name) == wanted:
                    entry = value
                    break
        if not entry:
            return ANONYMOUS
        username, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"]).decode()
            except (ValueError, UnicodeDecodeError) as exc:
                raise CredentialError(f"invalid auth entry for {key} in {self.path}") from exc
            username, _, password = decoded.partition(":")
        return Credentials(username or None, password or None, entry.get("identitytoken") or None)

    def store(self, registry: str, creds: Credentials) -> str:
        """Save credentials; returns where they went (for the message)."""
        data = self.load()
        key = config_key(registry)
        helper = self.helper_for(registry, data)
        if helper:
            secret = creds.identity_token or creds.password or ""
            username = "<token>" if creds.identity_token else (creds.username or "")
            _helper_run(helper, "store", json.dumps({"ServerURL": key, "Username": username, "Secret": secret}))
            data.setdefault("auths", {})[key] = {}
            self.save(data)
            return f"credential helper docker-credential-{helper}"
        entry = {}
        if creds.username or creds.password:        # as docker's encodeAuth: nothing for neither
            entry["auth"] = base64.b64encode(f"{creds.username or ''}:{creds.password or ''}".encode()).decode()
        if creds.identity_token:
            entry["identitytoken"] = creds.identity_token
        data.setdefault("auths", {})[key] = entry
        self.save(data)
        return str(self.path)

    def erase(self, registry: str) -> bool:
        """Forget the registry's credentials: every entry of `auths` naming
        it (`host`, `https://host/v1/`, ...), whatever it holds (a password,
        an identity token), and what a credential helper keeps under any of
        those keys. True when something was removed. A helper that fails
        (other than "not found") is a CredentialError, raised after the
        entries in config.json are gone: the secret may still be in the helper."""
        data = self.load()
        key = config_key(registry)
        auths = data.get("auths") or {}
        names = [name for name in auths if name == key or _normalise_key(name) == _normalise_key(key)]
        found = bool(names)
        failure: CredentialError | None = None
        for name in dict.fromkeys([key, *names]):
            helper = self.helper_for(name, data)
            if not helper:
                continue
            try:
                _helper_run(helper, "erase", name)
                found = True
            except CredentialError as exc:
                if not _not_found(exc):
                    failure = failure or exc
        for name in names:
            del auths[name]
        if names:
            self.save(data)
        if failure is not None:
            raise CredentialError(f"could not erase the credentials of {registry} from the credential helper: "
                                  f"{failure}")
        return found


def _helper_run(helper: str, action: str, stdin: str) -> str:
    program = f"docker-credential-{helper}"
    if shutil.which(program) is None:
        raise CredentialError(f"credential helper {program} not found on PATH")
    try:
        proc = subprocess.run([program, action], input=stdin.encode(), capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CredentialError(f"{program} {action}: {one_line(exc)}") from exc
    if proc.returncode != 0:
        message = (proc.stdout or proc.stderr).decode(errors="replace").strip()
        raise CredentialError(f"{program} {action}: {message or 'failed'}")
    return proc.stdout.decode()


def _not_found(exc: CredentialError) -> bool:
    # docker-credential-helpers' ErrCredentialsNotFound: "credentials not found in native keychain"
    return "credentials not found" in str(exc).lower()


def _helper_get(helper: str, key: str) -> Credentials | None:
    try:
        out = _helper_run(helper, "get", key)
    except CredentialError as exc:
        if _not_found(exc):
            return None
        raise
    try:
        data = json.loads(out)
    except ValueError as exc:
        raise CredentialError(f"docker-credential-{helper} get: invalid output") from exc
    username, secret = data.get("Username") or "", data.get("Secret") or ""
    if username == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username or None, secret or None)


# -- token realms -------------------------------------------------------------------

def check_realm(realm: str, host: str, registry_base: str) -> None:
    """Where a token request, which carries the user's credentials, may go:
    any HTTPS URL; plain HTTP only to the registry's own host name or
    address, and only when that registry itself is plain HTTP on loopback (a
    local registry with its token server beside it). Another host - even
    another loopback address, or `localhost` for 127.0.0.1 - would be sent
    the password in cleartext."""
    try:
        parts = urlsplit(realm)
        realm_host = (parts.hostname or "").lower()
        parts.port
    except ValueError as exc:
        raise AuthError(f"refusing token realm {realm!r}: not a valid URL") from exc
    if parts.scheme == "https" and realm_host:
        return
    if parts.scheme != "http" or not realm_host:
        raise AuthError(f"refusing token realm {realm}: not an HTTPS URL")
    registry = urlsplit(registry_base)
    registry_host = (registry.hostname or "").lower()
    if registry.scheme != "http" or not is_loopback(host):
        raise AuthError(f"refusing token realm {realm}: not HTTPS")
    if realm_host != registry_host:
        raise AuthError(f"refusing token realm {realm}: not HTTPS, and not the registry's own host "
                        f"{registry_host} (credentials go over plain HTTP to nowhere else)")
