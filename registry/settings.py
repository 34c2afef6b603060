"""Registry settings: typed, frozen, loaded in three layers.

    defaults  <  YAML file (--config FILE)  <  DOCKYARD_* environment  <  CLI flags

Environment variables name a key by its path, upper-cased and joined by
underscores, under the prefix DOCKYARD_:

    http.host                   DOCKYARD_HTTP_HOST
    http.port                   DOCKYARD_HTTP_PORT
    http.workers                DOCKYARD_HTTP_WORKERS
    http.relative_urls          DOCKYARD_HTTP_RELATIVE_URLS
    http.access_log             DOCKYARD_HTTP_ACCESS_LOG
    http.send_timeout           DOCKYARD_HTTP_SEND_TIMEOUT
    http.body_timeout           DOCKYARD_HTTP_BODY_TIMEOUT
    storage.driver              DOCKYARD_STORAGE_DRIVER
    storage.root                DOCKYARD_STORAGE_ROOT
    storage.redirect            DOCKYARD_STORAGE_REDIRECT
    storage.filesystem.fsync    DOCKYARD_STORAGE_FILESYSTEM_FSYNC
    storage.delete_enabled      DOCKYARD_STORAGE_DELETE_ENABLED
    storage.pull_cache_seconds  DOCKYARD_STORAGE_PULL_CACHE_SECONDS
    storage.s3.bucket           DOCKYARD_STORAGE_S3_BUCKET   (and every s3.* key)
    limits.max_manifest_bytes   DOCKYARD_LIMITS_MAX_MANIFEST_BYTES
    limits.catalog_max_entries  DOCKYARD_LIMITS_CATALOG_MAX_ENTRIES
    limits.referrers_max_entries  DOCKYARD_LIMITS_REFERRERS_MAX_ENTRIES
    uploads.max_age             DOCKYARD_UPLOADS_MAX_AGE
    uploads.purge_interval      DOCKYARD_UPLOADS_PURGE_INTERVAL
    validation.allow_sparse_manifests  DOCKYARD_VALIDATION_ALLOW_SPARSE_MANIFESTS
    tls.cert                    DOCKYARD_TLS_CERT
    tls.key                     DOCKYARD_TLS_KEY
    tls.client_ca               DOCKYARD_TLS_CLIENT_CA
    tls.reload_interval         DOCKYARD_TLS_RELOAD_INTERVAL
    tls.ciphersuites            DOCKYARD_TLS_CIPHERSUITES
    auth.mode                   DOCKYARD_AUTH_MODE
    auth.htpasswd               DOCKYARD_AUTH_HTPASSWD       (and every auth.* key)
    auth.token.realm            DOCKYARD_AUTH_TOKEN_REALM    (and every auth.token.* key)
    proxy.default               DOCKYARD_PROXY_DEFAULT
    proxy.allow_hosts           DOCKYARD_PROXY_ALLOW_HOSTS   (comma-separated)
    proxy.upstreams[].username  DOCKYARD_PROXY_UPSTREAM_<PREFIX>_USERNAME (and _PASSWORD)
    log.level                   DOCKYARD_LOG_LEVEL
    log.format                  DOCKYARD_LOG_FORMAT
    metrics.enabled             DOCKYARD_METRICS_ENABLED     (and every metrics.* key)
    events.format               DOCKYARD_EVENTS_FORMAT       (and every scalar events.* key;
                                events.endpoints is a list: YAML only)
    gc.interval                 DOCKYARD_GC_INTERVAL
    gc.grace                    DOCKYARD_GC_GRACE
    gc.untagged                 DOCKYARD_GC_UNTAGGED
    gc.referrers                DOCKYARD_GC_REFERRERS
    lifecycle.read_only         DOCKYARD_LIFECYCLE_READ_ONLY
    lifecycle.immutable_tags    DOCKYARD_LIFECYCLE_IMMUTABLE_TAGS

A list of strings in a variable is comma-separated (DOCKYARD_EVENTS_ALLOW=10.0.0.0/8,hooks).

`deploy/config.example.yml` documents every key. Any problem (unknown key,
unknown DOCKYARD_* variable, wrong type, bad value) is a `SettingsError`
with a one-line message; with `lenient=True` unknown keys and variables are
passed to `warn` instead and ignored.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from registry.proxy.settings import (CREDENTIALS_ENV_PREFIX, ProxyConfigError, ProxySettings,
                                     check_credentials_env, check_proxy)
from storage.blobs import StoreLimits
from storage.config import (FilesystemSettings, S3Settings, StorageConfigError,
                            StorageSettings, default_storage_root)

ENV_PREFIX = "DOCKYARD_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
# DOCKYARD_* variables that are not server settings: the client's and the
# test suite's. Every other DOCKYARD_* name must be a settings key.
NOT_SETTINGS_VARIABLES = ("DOCKYARD_UNPACK_CACHE", "DOCKYARD_ROOTLESS", "DOCKYARD_BENCH_",
                          "DOCKYARD_TEST_", "DOCKYARD_REQUIRE_INTEROP", "DOCKYARD_INTEROP_")


class SettingsError(ValueError):
    """A configuration problem, described in one line."""


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 1               # processes sharing the port (SO_REUSEPORT)
    relative_urls: bool = True     # Location headers as paths (docker, skopeo, podman accept them)
    access_log: bool = False
    # Seconds a blob body may make no progress (the client reads nothing)
    # before its connection is dropped.
    send_timeout: int = 60
    # Seconds a request body may stop arriving (between two reads) before
    # the request ends and its connection is closed; an upload keeps what came.
    body_timeout: int = 60


@dataclass(frozen=True)
class LimitsSettings:
    max_manifest_bytes: int = 4 * 1024 * 1024
    catalog_max_entries: int = 1000
    referrers_max_entries: int = 1000   # most descriptors in one referrers page


@dataclass(frozen=True)
class UploadsSettings:
    # Upload sessions older than this many seconds are deleted (a client
    # that gave up without DELETE), checked every purge_interval seconds
    # (0: never). Distribution's defaults: 168h and 24h.
    max_age: int = 7 * 24 * 3600
    purge_interval: int = 24 * 3600


@dataclass(frozen=True)
class ValidationSettings:
    # Accept manifests whose layers or index children are not (yet) in the
    # repository ("sparse" images, e.g. one platform of a multi-arch index).
    # Off: such a push is refused with MANIFEST_BLOB_UNKNOWN, as Distribution does.
    allow_sparse_manifests: bool = False


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"           # text | json (one JSON object a line, with the request ID)


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True           # Prometheus text at /metrics
    # host:port of a listener of its own for /metrics (and the probes);
    # empty: /metrics on the main listener.
    addr: str = ""
    # A file holding a secret /metrics then requires as "Authorization: Bearer <secret>".
    token_file: str = ""


@dataclass(frozen=True)
class TlsSettings:
    cert: str = ""                 # PEM certificate chain; with key, serve HTTPS
    key: str = ""                  # PEM private key
    client_ca: str = ""            # PEM CA bundle: every client must show a certificate it signed
    # Seconds between looks at cert and key for renewed files (ACME and
    # cert-manager rotate them); 0: never. A renewal needs no restart.
    reload_interval: int = 30
    # TLS 1.3 cipher suites in the server's order of preference (it picks,
    # not the client). AES-128-GCM first, as Go's crypto/tls (CNCF
    # Distribution) picks it: curl and OpenSSL clients list AES-256 first,
    # which cost ~7% of a TLS blob GET's throughput here. Empty: OpenSSL's
    # defaults, the client's preference.
    ciphersuites: str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


TLS13_CIPHERSUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
                      "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256")
AUTH_MODES = ("none", "htpasswd", "token")
SIGNING_ALGORITHMS = ("ES256", "RS256", "EdDSA")


@dataclass(frozen=True)
class TokenAuthSettings:
    # Absolute URL of the token endpoint clients are sent to. Empty: this
    # server's own /auth/token, on the scheme and host the client used.
    realm: str = ""
    service: str = "dockyard"      # the audience (`aud`) tokens are for
    issuer: str = "dockyard"       # the `iss` of tokens (ours, and what a token must carry)
    # Run the built-in token service (users from auth.htpasswd, access from
    # auth.policy). false: only verify tokens of the issuer at auth.token.realm.
    issue: bool = True
    key: str = ""                  # PEM signing key; empty: <storage root>/auth/signing-key.pem, made on first start
    algorithm: str = "ES256"       # of a generated key: ES256, RS256 or EdDSA
    lifetime: int = 300            # seconds an issued access token lives (never under 60)
    refresh_lifetime: int = 90 * 24 * 3600   # seconds a refresh (identity) token lives
    # Tokens claiming a longer life than this are refused, whoever signed them.
    max_lifetime: int = 3600
    # More keys whose tokens are accepted, comma-separated files: PEM public
    # keys, certificate bundles, JWKS documents (a rotated-out key, an external issuer).
    trusted_keys: str = ""
    jwks_url: str = ""             # an external issuer's JWKS, fetched at start and every jwks_refresh seconds
    jwks_refresh: int = 300


@dataclass(frozen=True)
class AuthSettings:
    mode: str = "none"             # none | htpasswd (Basic) | token (Bearer, built-in issuer)
    htpasswd: str = ""             # bcrypt entries, as `htpasswd -B` writes them
    policy: str = ""               # YAML access policy; empty: every user may do everything
    # Seconds between looks at the htpasswd and policy files for changes
    # (SIGHUP re-reads at once); a removed user loses access on the next look.
    reload_interval: int = 1
    basic_realm: str = "Dockyard"
    # Failed logins from one address: slowed down, then refused for lockout seconds.
    max_failures: int = 10
    failure_window: int = 60
    lockout: int = 300
    token: TokenAuthSettings = field(default_factory=TokenAuthSettings)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


EVENT_FORMATS = ("cloudevents", "distribution")
EVENT_ACTIONS = ("push", "pull", "delete", "tag")


@dataclass(frozen=True)
class EventEndpointSettings:
    url: str = ""                              # http(s) URL events are POSTed to
    headers: tuple[str, ...] = ()              # "Name: value" lines sent with each event
    repositories: tuple[str, ...] = ()         # repository globs ("team-a/*"); empty: every repository
    actions: tuple[str, ...] = ()              # of EVENT_ACTIONS; empty: every action
    timeout: int = 5                           # seconds one delivery may take


@dataclass(frozen=True)
class EventsSettings:
    format: str = "cloudevents"                # cloudevents | distribution (its notification envelope)
    endpoints: tuple[EventEndpointSettings, ...] = ()
    # Hosts and networks (CIDR) an endpoint may be on although private,
    # loopback, link-local or a cloud metadata address; nothing else of those.
    allow: tuple[str, ...] = ()
    backoff: int = 1                           # seconds before the first retry, doubled each failure
    backoff_max: int = 300                     # most seconds between retries
    poll_interval: int = 1                     # seconds between looks at the outbox


GC_REFERRER_MODES = ("keep", "follow-subject")


@dataclass(frozen=True)
class GcSettings:
    # Seconds between garbage collection passes inside `serve` (0: none;
    # `dockyard gc` runs one). Every worker and replica may run them: one
    # pass at a time holds the storage's GC lock, the others skip their turn.
    interval: int = 0
    # Seconds anything written or linked stays safe from collection, and a
    # recorded candidate waits before it is swept. 0 only when no push runs.
    grace: int = 6 * 3600
    # Collect manifests that no tag, kept index or kept referrer reaches.
    untagged: bool = False
    # keep: referrers (signatures, SBOMs) are never collected as untagged;
    # follow-subject: a referrer goes with its subject.
    referrers: str = "keep"


@dataclass(frozen=True)
class LifecycleSettings:
    # Refuse every write (405 UNSUPPORTED); pulls go on.
    read_only: bool = False
    # Comma-separated "<repository glob>:<tag glob>" rules: a matching tag
    # is pushed once and never moved or deleted (DENIED). Example: "prod/*:v*".
    immutable_tags: str = ""


@dataclass(frozen=True)
class Settings:
    http: HttpSettings = field(default_factory=HttpSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    uploads: UploadsSettings = field(default_factory=UploadsSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    log: LogSettings = field(default_factory=LogSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)   # pull-through cache (registry/proxy)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    gc: GcSettings = field(default_factory=GcSettings)
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)

    def store_limits(self) -> StoreLimits:
        """The content store's limits from these settings."""
        return StoreLimits(max_manifest_bytes=self.limits.max_manifest_bytes,
                           allow_sparse_manifests=self.validation.allow_sparse_manifests,
                           pull_cache_seconds=self.storage.pull_cache_seconds)

    def validate(self) -> "Settings":
        if not 0 <= self.http.port <= 65535:
            raise SettingsError(f"http.port must be 0..65535, got {self.http.port}")
        if not 1 <= self.http.workers <= 256:
            raise SettingsError(f"http.workers must be 1..256, got {self.http.workers}")
        if self.http.send_timeout < 1:
            raise SettingsError(f"http.send_timeout must be at least 1 second, got {self.http.send_timeout}")
        if self.http.body_timeout < 1:
            raise SettingsError(f"http.body_timeout must be at least 1 second, got {self.http.body_timeout}")
        if bool(self.tls.cert) != bool(self.tls.key):
            raise SettingsError("tls.cert and tls.key must be set together")
        if self.tls.client_ca and not self.tls.cert:
            raise SettingsError("tls.client_ca needs tls.cert and tls.key")
        if self.tls.reload_interval < 0:
            raise SettingsError("tls.reload_interval must be 0 (never) or more seconds")
        unknown = [c for c in self.tls.ciphersuites.split(":") if c and c not in TLS13_CIPHERSUITES]
        if unknown:
            raise SettingsError(f"tls.ciphersuites: not a TLS 1.3 cipher suite: {', '.join(unknown)} "
                                f"(known: {', '.join(TLS13_CIPHERSUITES)})")
        self._validate_auth()
        try:
            check_proxy(self.proxy)
        except ProxyConfigError as exc:
            raise SettingsError(str(exc)) from None
        try:
            self.storage.check()
        except StorageConfigError as exc:
            raise SettingsError(str(exc)) from None
        if self.limits.max_manifest_bytes < 1024:
            raise SettingsError("limits.max_manifest_bytes must be at least 1024")
        if self.limits.catalog_max_entries < 1:
            raise SettingsError("limits.catalog_max_entries must be at least 1")
        if self.limits.referrers_max_entries < 1:
            raise SettingsError("limits.referrers_max_entries must be at least 1")
        if self.uploads.max_age < 1:
            raise SettingsError("uploads.max_age must be at least 1 second")
        if self.uploads.purge_interval < 0:
            raise SettingsError("uploads.purge_interval must be 0 (off) or more seconds")
        if self.gc.interval < 0 or self.gc.grace < 0:
            raise SettingsError("gc.interval and gc.grace must be 0 or more seconds")
        if self.gc.referrers not in GC_REFERRER_MODES:
            raise SettingsError(f"gc.referrers must be one of {', '.join(GC_REFERRER_MODES)}, "
                                f"got {self.gc.referrers!r}")
        from registry.lifecycle.rules import ImmutableTags, RuleError
        try:
            ImmutableTags.parse(self.lifecycle.immutable_tags)
        except RuleError as exc:
            raise SettingsError(str(exc)) from None
        if self.log.level not in LOG_LEVELS:
            raise SettingsError(f"log.level must be one of {', '.join(LOG_LEVELS)}, got {self.log.level!r}")
        if self.log.format not in LOG_FORMATS:
            raise SettingsError(f"log.format must be one of {', '.join(LOG_FORMATS)}, got {self.log.format!r}")
        if self.metrics.addr:
            host, sep, port = self.metrics.addr.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise SettingsError(f"metrics.addr must be host:port, got {self.metrics.addr!r}")
        self._validate_events()
        return self

    def _validate_events(self) -> None:
        events = self.events
        if events.format not in EVENT_FORMATS:
            raise SettingsError(f"events.format must be one of {', '.join(EVENT_FORMATS)}, got {events.format!r}")
        if events.backoff < 1 or events.backoff_max < events.backoff or events.poll_interval < 1:
            raise SettingsError("events.backoff and events.poll_interval must be at least 1 second, "
                                "events.backoff_max at least events.backoff")
        for n, endpoint in enumerate(events.endpoints):
            key = f"events.endpoints[{n}]"
            if not endpoint.url.startswith(("http://", "https://")):
                raise SettingsError(f"{key}.url must be an http(s) URL, got {endpoint.url!r}")
            bad = [a for a in endpoint.actions if a not in EVENT_ACTIONS]
            if bad:
                raise SettingsError(f"{key}.actions: {bad[0]!r} is not one of {', '.join(EVENT_ACTIONS)}")
            bad = [h for h in endpoint.headers if ":" not in h or not h.split(":", 1)[0].strip()]
            if bad:
                raise SettingsError(f"{key}.headers: expected \"Name: value\", got {bad[0]!r}")
            if endpoint.timeout < 1:
                raise SettingsError(f"{key}.timeout must be at least 1 second")

    def _validate_auth(self) -> None:
        auth, token = self.auth, self.auth.token
        if auth.mode not in AUTH_MODES:
            raise SettingsError(f"auth.mode must be one of {', '.join(AUTH_MODES)}, got {auth.mode!r}")
        if auth.mode == "htpasswd" and not auth.htpasswd:
            raise SettingsError("auth.mode htpasswd needs auth.htpasswd (a file of bcrypt entries)")
        if auth.reload_interval < 0:
            raise SettingsError("auth.reload_interval must be 0 (only on SIGHUP) or more seconds")
        if auth.max_failures < 1 or auth.failure_window < 1 or auth.lockout < 0:
            raise SettingsError("auth.max_failures and auth.failure_window must be at least 1, auth.lockout 0 or more")
        if token.algorithm not in SIGNING_ALGORITHMS:
            raise SettingsError(f"auth.token.algorithm must be one of {', '.join(SIGNING_ALGORITHMS)}, "
                                f"got {token.algorithm!r}")
        if token.lifetime < 60:
            raise SettingsError("auth.token.lifetime must be at least 60 seconds (token.md: never less)")
        if token.max_lifetime < token.lifetime:
            raise SettingsError("auth.token.max_lifetime must be at least auth.token.lifetime")
        if token.refresh_lifetime < 60:
            raise SettingsError("auth.token.refresh_lifetime must be at least 60 seconds")
        if token.jwks_refresh < 10:
            raise SettingsError("auth.token.jwks_refresh must be at least 10 seconds")
        if auth.mode == "token" and not token.issue:
            if not token.realm:
                raise SettingsError("auth.token.issue false needs auth.token.realm (the external issuer's URL)")
            if not (token.trusted_keys or token.jwks_url):
                raise SettingsError("auth.token.issue false needs auth.token.trusted_keys or auth.token.jwks_url")
        for name, url in (("realm", token.realm), ("jwks_url", token.jwks_url)):
            if url and not url.startswith(("https://", "http://")):
                raise SettingsError(f"auth.token.{name} must be an http(s) URL, got {url!r}")

    def signing_key_path(self) -> str:
        """Where the built-in issuer's key is (or will be made)."""
        if self.auth.token.key:
            return self.auth.token.key
        return os.path.join(self.storage.root or default_storage_root(), "auth", "signing-key.pem")


# ---- loading ----------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, kind: Any, key: str) -> Any:
    """Coerce a YAML/env value to the field's type, or SettingsError."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{key}: expected true/false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise SettingsError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(str(value).strip(), 10) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{key}: expected an integer, got {value!r}") from None
    if typing.get_origin(kind) is tuple:        # tuple[X, ...]: a YAML list (env: comma-separated)
        item = typing.get_args(kind)[0]
        if isinstance(value, str) and not dataclasses.is_dataclass(item):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if value is None:
            return ()
        if not isinstance(value, list):
            raise SettingsError(f"{key}: expected a list, got {type(value).__name__}")
        if dataclasses.is_dataclass(item):
            return tuple(_build(item, entry or {}, f"{key}[{n}].") for n, entry in enumerate(value))
        return tuple(_convert(entry, item, f"{key}[{n}]") for n, entry in enumerate(value))
    if kind is str:
        if isinstance(value, (dict, list)):
            raise SettingsError(f"{key}: expected a string, got {type(value).__name__}")
        return "" if value is None else str(value)
    raise SettingsError(f"{key}: unsupported setting type")  # pragma: no cover


def _build(cls: type, data: Mapping[str, Any], prefix: str,
           warn: "typing.Callable[[str], None] | None" = None) -> Any:
    if not isinstance(data, Mapping):
        raise SettingsError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - known)
    if unknown and warn is None:
        raise SettingsError(f"unknown setting {prefix}{unknown[0]}")
    for name in unknown:
        warn(f"unknown setting {prefix}{name} ignored")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in known:
            continue
        kind = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value or {}, key + ".", warn)
        else:
            kwargs[name] = _convert(value, kind, key)
    return cls(**kwargs)


def _merge(base: dict, override: Mapping) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(cls: type, environ: Mapping[str, str], prefix: str = ENV_PREFIX) -> dict:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = _field_types(cls)[f.name]
        name = f"{prefix}{f.name.upper()}"
        if dataclasses.is_dataclass(kind):
            nested = _env_overrides(kind, environ, name + "_")
            if nested:
                out[f.name] = nested
        elif name in environ and not _is_list_of_sections(kind):
            out[f.name] = environ[name]
    return out


def env_names(cls: type = None, prefix: str = ENV_PREFIX) -> set[str]:
    """Every DOCKYARD_* variable the settings dataclasses define."""
    cls = cls or Settings
    names: set[str] = set()
    for f in dataclasses.fields(cls):
        kind = _field_types(cls)[f.name]
        name = f"{prefix}{f.name.upper()}"
        if dataclasses.is_dataclass(kind):
            names |= env_names(kind, name + "_")
        elif not _is_list_of_sections(kind):
            names.add(name)
    return names


def _is_list_of_sections(kind: Any) -> bool:
    return typing.get_origin(kind) is tuple and dataclasses.is_dataclass(typing.get_args(kind)[0])


def _check_env_names(environ: Mapping[str, str], warn: "typing.Callable[[str], None] | None") -> None:
    known = env_names()
    for name in sorted(environ):
        if (name.startswith(ENV_PREFIX) and name not in known
                and not name.startswith(NOT_SETTINGS_VARIABLES)
                and not name.startswith(CREDENTIALS_ENV_PREFIX)):   # checked once the upstreams are known
            if warn is None:
                raise SettingsError(f"unknown environment variable {name} (not a setting; "
                                    f"see deploy/config.example.yml)")
            warn(f"unknown environment variable {name} ignored")


def load_yaml(path: str | os.PathLike) -> dict:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        reason = " ".join(str(getattr(exc, "problem", None) or "").split())
        raise SettingsError(f"config file {path}{where}: invalid YAML"
                            + (f": {reason}" if reason else "")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: expected a mapping at the top level")
    return data


def load_settings(config_file: str | None = None, environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None, *, lenient: bool = False,
                  warn: "typing.Callable[[str], None] | None" = None) -> Settings:
    """defaults < config file < environment < overrides ({"http": {"port": 1}, ...}).

    Unknown keys and DOCKYARD_* variables are a SettingsError, or with
    `lenient` a message to `warn` (default: dropped)."""
    environ = os.environ if environ is None else environ
    if lenient and warn is None:
        warn = lambda message: None  # noqa: E731
    elif not lenient:
        warn = None
    _check_env_names(environ, warn)
    data: dict = {}
    if config_file:
        data = _merge(data, load_yaml(config_file))
    data = _merge(data, _env_overrides(Settings, environ))
    if overrides:
        data = _merge(data, overrides)
    settings = _build(Settings, data, "", warn).validate()
    try:
        check_credentials_env(settings.proxy, environ)
    except ProxyConfigError as exc:
        if warn is None:
            raise SettingsError(str(exc)) from None
        warn(f"{exc}: ignored")
    return settings


def settings_for_tests(root: str | os.PathLike, **sections: Any) -> Settings:
    """Settings with storage under root; keyword args replace whole sections."""
    base = Settings(storage=StorageSettings(root=str(root)))
    return dataclasses.replace(base, **sections).validate()
