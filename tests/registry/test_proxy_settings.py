"""The `proxy:` settings: YAML < DOCKYARD_* < flags like every section,
one-line errors naming the key, credentials from the file, the environment
or a password file, and the routing rules they set up."""

from __future__ import annotations

import pytest
import yaml

from registry.proxy.routing import Router
from registry.proxy.settings import ProxyConfigError, UpstreamSettings, host_allowed, upstream_credentials
from registry.settings import SettingsError, load_settings
from storage.oci.errors import Denied

HUB = {"prefix": "hub", "url": "https://registry-1.docker.io", "namespace": "docker.io"}
GHCR = {"prefix": "ghcr", "url": "https://ghcr.io", "namespace": "ghcr.io", "repositories": ["acme/*"]}


def load(tmp_path, proxy: dict, environ=None):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"proxy": proxy}))
    return load_settings(str(path), environ=environ or {})


def test_yaml_upstreams_default_and_allow_hosts(tmp_path):
    settings = load(tmp_path, {"upstreams": [HUB, {**GHCR, "revalidate": 60}], "default": "hub",
                               "allow_hosts": ["registry-1.docker.io", "ghcr.io", "*.docker.com"]})
    hub, ghcr = settings.proxy.upstreams
    assert (hub.prefix, hub.url, hub.namespace, hub.revalidate) == ("hub", HUB["url"], "docker.io", 300)
    assert ghcr.revalidate == 60 and ghcr.repositories == ("acme/*",)
    assert settings.proxy.default == "hub"


def test_environment_overrides_lists_as_comma_separated(tmp_path):
    settings = load(tmp_path, {"upstreams": [HUB, GHCR]},
                    {"DOCKYARD_PROXY_DEFAULT": "ghcr",
                     "DOCKYARD_PROXY_ALLOW_HOSTS": "registry-1.docker.io, ghcr.io"})
    assert settings.proxy.default == "ghcr"
    assert settings.proxy.allow_hosts == ("registry-1.docker.io", "ghcr.io")


@pytest.mark.parametrize("proxy, message", [
    ({"upstreams": [{**HUB, "prefix": "Hub!"}]}, r"proxy.upstreams\[0\].prefix"),
    ({"upstreams": [HUB, {**GHCR, "prefix": "hub/sub"}]}, "overlaps"),
    ({"upstreams": [{**HUB, "url": "ftp://x"}]}, r"proxy.upstreams\[0\].url"),
    ({"upstreams": [{**HUB, "url": "https://u:p@host"}]}, "no path, query or user"),
    ({"upstreams": [HUB], "default": "nope"}, "proxy.default"),
    ({"upstreams": [HUB], "allow_hosts": ["ghcr.io"]}, "not in proxy.allow_hosts"),
    ({"upstreams": [HUB, {**GHCR, "namespace": "docker.io"}]}, "names two upstreams"),
    ({"upstreams": [{**HUB, "revalidate": -1}]}, "revalidate"),
    ({"upstreams": "hub"}, "expected a list"),
    ({"upstreams": [{**HUB, "colour": "red"}]}, r"unknown setting proxy.upstreams\[0\].colour"),
])
def test_bad_values_are_one_line_naming_the_key(tmp_path, proxy, message):
    with pytest.raises(SettingsError, match=message) as caught:
        load(tmp_path, proxy)
    assert "\n" not in str(caught.value)


def test_password_from_environment_or_file_and_never_in_repr(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("from-file-pw\n")
    up = UpstreamSettings(prefix="ghcr/acme", url="https://ghcr.io", username="bot", password_file=str(secret))
    assert upstream_credentials(up, {}) == ("bot", "from-file-pw")
    env = {"DOCKYARD_PROXY_UPSTREAM_GHCR_ACME_USERNAME": "env-bot",
           "DOCKYARD_PROXY_UPSTREAM_GHCR_ACME_PASSWORD": "env-pw"}
    assert upstream_credentials(up, env) == ("env-bot", "env-pw")
    inline = UpstreamSettings(prefix="hub", url="https://x.example", username="u", password="inline-pw")
    assert "inline-pw" not in repr(inline)
    missing = UpstreamSettings(prefix="hub", url="https://x.example", username="u",
                               password_file=str(tmp_path / "absent"))
    with pytest.raises(ProxyConfigError, match="cannot read password_file") as caught:
        upstream_credentials(missing, {})
    assert "\n" not in str(caught.value)


def test_routing_docker_hub_names_namespaces_and_globs(tmp_path):
    settings = load(tmp_path, {"upstreams": [HUB, GHCR]})
    router = Router(settings.proxy)
    assert Router(load(tmp_path, {"upstreams": [{**GHCR, "repositories": []}]}).proxy) \
        .for_prefixed("ghcr/tool").remote == "tool"                   # no library/ rule off Docker Hub
    assert router.for_prefixed("hub/debian").remote == "library/debian"
    assert router.for_prefixed("hub/library/debian").local == "hub/library/debian"
    assert router.for_prefixed("hub/user/app").remote == "user/app"
    assert router.for_prefixed("ghcr/acme/tool").remote == "acme/tool"
    assert router.for_prefixed("hubx/debian") is None
    assert router.for_prefixed("team/app") is None
    assert router.by_namespace("DOCKER.IO").prefix == "hub"
    with pytest.raises(Denied):
        router.for_prefixed("ghcr/other/tool")                     # outside repositories: [acme/*]


@pytest.mark.parametrize("host, port, allowed", [
    ("registry-1.docker.io", 443, True), ("production.cloudflare.docker.com", 443, True),
    ("docker.com", 443, False), ("169.254.169.254", 80, False), ("ghcr.io", 8443, False),
    ("ghcr.io", 443, True), ("[::1]", 5000, True),
])
def test_allow_hosts_entries(host, port, allowed):
    entries = ("registry-1.docker.io", "*.docker.com", "ghcr.io:443", "[::1]:5000")
    assert host_allowed(host, port, entries) is allowed


def test_serve_with_an_unreadable_password_file_prints_one_line(tmp_path):
    import subprocess
    import sys
    from tests.support import REPO_ROOT
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"proxy": {"upstreams": [
        {"prefix": "hub", "url": "http://127.0.0.1:9", "username": "u",
         "password_file": str(tmp_path / "absent")}]}}))
    proc = subprocess.run([sys.executable, "-m", "puller", "serve", "--config", str(config),
                           "--storage", str(tmp_path / "root"), "--port", "0"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read password_file" in lines[0], proc.stderr


def test_credential_variables_must_name_a_configured_upstream(tmp_path):
    env = {"DOCKYARD_PROXY_UPSTREAM_HUB_PASSWORD": "pw", "DOCKYARD_PROXY_UPSTREAM_HUB_USERNAME": "u"}
    assert load(tmp_path, {"upstreams": [HUB]}, env).proxy.upstreams[0].prefix == "hub"
    with pytest.raises(SettingsError, match="DOCKYARD_PROXY_UPSTREAM_HBU_PASSWORD"):
        load(tmp_path, {"upstreams": [HUB]}, {"DOCKYARD_PROXY_UPSTREAM_HBU_PASSWORD": "pw"})


def test_effective_settings_line_masks_upstream_passwords(tmp_path):
    from registry.ops.configcheck import effective_settings_line
    settings = load(tmp_path, {"upstreams": [{**HUB, "username": "u", "password": "TOP-secret-9"}]})
    line = effective_settings_line(settings)
    assert "TOP-secret-9" not in line and '"username":"u"' in line
