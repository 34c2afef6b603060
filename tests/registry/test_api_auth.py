"""The registry with auth on, over real HTTP: the token service (token.md,
oauth.md), challenges and scopes (scope.md, "Resource Provider Use"), the
policy checked from the route table, Basic credentials (htpasswd mode),
and the attacks each check is there for.

Users and policy: tests.support.auth (reader pulls team-a/app; the devs
group, builder and deployer, does everything under team-a/ and pushes to
public/; anonymous pulls public/; outsider pulls and pushes scratch/*;
builder lists the catalog).
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from registry.app import create_app
from registry.auth.runtime import AUTH
from registry.settings import AuthSettings, TokenAuthSettings, settings_for_tests
from tests.registry.regapi import OCI_MANIFEST, Registry, error_codes, raw_request
from tests.support.auth import (EXAMPLE_POLICY, USERS, access_of, basic, bearer, claims_of,
                                write_htpasswd, write_policy)
from tests.support.content import sha256_digest

pytestmark = pytest.mark.filesystem_only("auth sits above storage: one driver is enough")

CHALLENGE = re.compile(r'Bearer realm="(?P<realm>[^"]+)",service="(?P<service>[^"]+)"'
                       r'(,scope="(?P<scope>[^"]+)")?(,error="(?P<error>[^"]+)")?$')


@pytest.fixture
def auth_files(tmp_path):
    return (write_htpasswd(tmp_path / "htpasswd", USERS),
            write_policy(tmp_path / "policy.yml", EXAMPLE_POLICY))


def auth_section(tmp_path, auth_files, mode: str = "token", **extra) -> AuthSettings:
    htpasswd, policy = auth_files
    token = TokenAuthSettings(key=str(tmp_path / "keys" / "signing.pem"), **extra.pop("token", {}))
    extra.setdefault("reload_interval", 0)     # the tests re-read the files when they mean to
    return AuthSettings(mode=mode, htpasswd=str(htpasswd), policy=str(policy), token=token, **extra)


class AuthedRegistry(Registry):
    """A Registry that also speaks to the token service."""

    async def token(self, user: str | None, *scopes: str, offline: bool = False,
                    password: str | None = None) -> dict:
        params = [("service", "dockyard"), *(("scope", s) for s in scopes)]
        if offline:
            params.append(("offline_token", "true"))
        headers = {}
        if user is not None:
            headers["Authorization"] = basic(user, USERS[user] if password is None else password)
        resp = await self.client.get("/auth/token", params=params, headers=headers)
        body = await resp.json()
        assert resp.status == 200, body
        return body

    async def bearer(self, user: str | None, *scopes: str) -> dict[str, str]:
        return {"Authorization": bearer((await self.token(user, *scopes))["token"])}


@pytest.fixture
async def make_authed(aiohttp_client, tmp_path, auth_files):
    async def make(mode: str = "token", **extra) -> AuthedRegistry:
        settings = settings_for_tests(tmp_path / "storage", auth=auth_section(tmp_path, auth_files, mode, **extra))
        client = await aiohttp_client(create_app(settings))
        return AuthedRegistry(client)
    return make


@pytest.fixture
async def reg(make_authed):
    return await make_authed()


async def push_image(reg: AuthedRegistry, repo: str, user: str = "builder", tag: str = "latest") -> tuple[str, str]:
    """(manifest digest, layer digest) of a one-layer image pushed with a push token."""
    headers = await reg.bearer(user, f"repository:{repo}:pull,push")
    layer = f"layer of {repo}".encode()
    config = b"{}"
    for blob in (layer, config):
        resp = await reg.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256_digest(blob)},
                              data=blob, headers=headers)
        assert resp.status == 201, await resp.text()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha256_digest(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": sha256_digest(layer), "size": len(layer)}]}).encode()
    resp = await reg.put(f"/v2/{repo}/manifests/{tag}", data=manifest,
                         headers={**headers, "Content-Type": OCI_MANIFEST})
    assert resp.status == 201, await resp.text()
    return resp.headers["Docker-Content-Digest"], sha256_digest(layer)


def challenge_of(resp) -> dict:
    match = CHALLENGE.match(resp.headers.get("WWW-Authenticate", ""))
    assert match, resp.headers.get("WWW-Authenticate")
    return match.groupdict()


async def refused(resp, status: int, code: str) -> dict:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert error_codes(body) == [code]
    return body


# ---- challenges (token.md "How to authenticate"; scope.md "Resource Provider Use") ----

async def test_unauthenticated_requests_get_a_bearer_challenge_naming_realm_service_and_scope(reg):
    resp = await reg.get("/v2/")
    await refused(resp, 401, "UNAUTHORIZED")
    found = challenge_of(resp)
    assert found["realm"] == f"http://{reg.client.server.host}:{reg.client.server.port}/auth/token"
    assert found["service"] == "dockyard" and found["scope"] is None

    resp = await reg.get("/v2/team-a/app/manifests/latest")
    await refused(resp, 401, "UNAUTHORIZED")
    assert challenge_of(resp)["scope"] == "repository:team-a/app:pull"

    resp = await reg.post("/v2/team-a/app/blobs/uploads/")
    await refused(resp, 401, "UNAUTHORIZED")
    assert challenge_of(resp)["scope"] == "repository:team-a/app:pull,push"

    resp = await reg.delete(f"/v2/team-a/app/manifests/{sha256_digest(b'x')}")
    assert challenge_of(resp)["scope"] == "repository:team-a/app:delete"


async def test_a_valid_token_opens_the_base_endpoint(reg):
    resp = await reg.get("/v2/", headers=await reg.bearer("reader"))
    assert resp.status == 200


# ---- the token service (token.md "Requesting a Token", oauth.md) ---------------

async def test_the_token_grants_the_intersection_of_what_was_asked_and_the_policy(reg):
    asked = ("repository:team-a/app:pull,push", "repository:team-b/app:pull", "registry:catalog:*")
    reader = await reg.token("reader", *asked)
    assert access_of(reader["token"]) == {("repository", "team-a/app"): {"pull"},
                                          ("repository", "team-b/app"): set(),
                                          ("registry", "catalog"): set()}
    builder = await reg.token("builder", *asked)
    assert access_of(builder["token"]) == {("repository", "team-a/app"): {"pull", "push"},
                                           ("repository", "team-b/app"): set(),
                                           ("registry", "catalog"): {"*"}}
    anonymous = await reg.token(None, "repository:public/tools:pull,push", "repository:team-a/app:pull")
    assert access_of(anonymous["token"]) == {("repository", "public/tools"): {"pull"},
                                             ("repository", "team-a/app"): set()}
    claims = claims_of(builder["token"])
    assert claims["sub"] == "builder" and claims["aud"] == "dockyard" and claims["iss"] == "dockyard"
    assert claims_of(anonymous["token"])["sub"] == ""
    for body in (reader, builder, anonymous):
        assert body["token"] == body["access_token"]
        assert body["expires_in"] >= 60
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["issued_at"])
        assert "refresh_token" not in body
    assert builder["scope"].split() == ["repository:team-a/app:pull,push", "registry:catalog:*"]


async def test_the_jwks_publishes_the_key_tokens_name(reg):
    token = (await reg.token("reader", "repository:team-a/app:pull"))["token"]
    import base64

    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    resp = await reg.get("/auth/jwks")
    assert resp.status == 200
    keys = (await resp.json())["keys"]
    assert header["alg"] == "ES256"
    assert [k["kid"] for k in keys] == [header["kid"]]
    assert all("d" not in k for k in keys), "a private key member in the JWKS"


async def test_wrong_password_and_unknown_user_get_the_same_answer(reg):
    answers = []
    for user, password in (("reader", "wrong"), ("nobody", "wrong")):
        resp = await reg.get("/auth/token", params={"service": "dockyard", "scope": "repository:team-a/app:pull"},
                             headers={"Authorization": basic(user, password)})
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Basic ")
        answers.append(await resp.read())
    assert answers[0] == answers[1]
    assert b"wrong" not in answers[0]


async def test_a_token_for_another_service_is_not_issued(reg):
    resp = await reg.get("/auth/token", params={"service": "elsewhere", "scope": "repository:team-a/app:pull"},
                         headers={"Authorization": basic("reader", USERS["reader"])})
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_request"


async def test_a_token_request_for_too_many_scopes_is_refused(reg):
    form = {"grant_type": "password", "username": "builder", "password": USERS["builder"],
            "service": "dockyard", "scope": " ".join(f"repository:team-a/r{i}:pull" for i in range(65))}
    resp = await reg.post("/auth/token", data=form)
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
    resp = await reg.post("/auth/token", data={**form, "scope": form["scope"].rsplit(" ", 1)[0]})
    assert resp.status == 200 and len(access_of((await resp.json())["access_token"])) == 64


async def test_oauth2_password_and_refresh_grants(reg):
    form = {"grant_type": "password", "username": "builder", "password": USERS["builder"],
            "service": "dockyard", "client_id": "test", "access_type": "offline",
            "scope": "repository:team-a/app:pull,push repository:team-a/other:pull"}
    resp = await reg.post("/auth/token", data=form)
    body = await resp.json()
    assert resp.status == 200, body
    assert access_of(body["access_token"]) == {("repository", "team-a/app"): {"pull", "push"},
                                               ("repository", "team-a/other"): {"pull"}}
    refresh = body["refresh_token"]
    assert resp.headers["Cache-Control"] == "no-store"

    resp = await reg.post("/auth/token", data={"grant_type": "refresh_token", "refresh_token": refresh,
                                               "service": "dockyard", "client_id": "test",
                                               "scope": "repository:team-a/app:pull"})
    again = await resp.json()
    assert resp.status == 200, again
    assert again["refresh_token"] == refresh          # oauth.md: the same one back
    assert access_of(again["access_token"]) == {("repository", "team-a/app"): {"pull"}}
    assert claims_of(again["access_token"])["sub"] == "builder"

    # without access_type=offline: no refresh token
    resp = await reg.post("/auth/token", data={**form, "access_type": "online"})
    assert "refresh_token" not in await resp.json()

    resp = await reg.post("/auth/token", data={**form, "password": "wrong"})
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_grant"
    assert resp.headers["WWW-Authenticate"].startswith("Basic realm=")

    resp = await reg.post("/auth/token", data={"grant_type": "refresh_token", "service": "dockyard",
                                               "refresh_token": body["access_token"]})
    assert resp.status == 401, "an access token was taken as a refresh token"

    # scope.md "Refresh Tokens": never good with a resource provider
    resp = await reg.get("/v2/", headers={"Authorization": bearer(refresh)})
    await refused(resp, 401, "UNAUTHORIZED")
    assert challenge_of(resp)["error"] == "invalid_token"


async def test_get_with_offline_token_returns_a_refresh_token_for_users_only(reg):
    body = await reg.token("reader", "repository:team-a/app:pull", offline=True)
    assert body["refresh_token"]
    assert "refresh_token" not in await reg.token(None, "repository:public/x:pull", offline=True)


# ---- scope (scope.md "Resource Provider Use") ----------------------------------

async def test_a_pull_token_cannot_push_delete_or_drive_an_upload(reg):
    digest, layer = await push_image(reg, "team-a/app")
    pull = await reg.bearer("reader", "repository:team-a/app:pull,push,delete")  # reader gets pull
    resp = await reg.get("/v2/team-a/app/manifests/latest", headers={**pull, "Accept": OCI_MANIFEST})
    assert resp.status == 200

    # the policy refuses reader: 403 DENIED, nothing to gain from another token
    resp = await reg.put("/v2/team-a/app/manifests/other", data=b"{}",
                         headers={**pull, "Content-Type": OCI_MANIFEST})
    await refused(resp, 403, "DENIED")
    resp = await reg.delete(f"/v2/team-a/app/manifests/{digest}", headers=pull)
    await refused(resp, 403, "DENIED")
    resp = await reg.delete(f"/v2/team-a/app/blobs/{layer}", headers=pull)
    await refused(resp, 403, "DENIED")
    resp = await reg.post("/v2/team-a/app/blobs/uploads/", headers=pull)
    await refused(resp, 403, "DENIED")

    # an upload builder started cannot be fed or finished with reader's token
    push = await reg.bearer("builder", "repository:team-a/app:pull,push")
    resp = await reg.post("/v2/team-a/app/blobs/uploads/", headers=push)
    assert resp.status == 202
    location = resp.headers["Location"]
    resp = await reg.patch(location, data=b"poison", headers={**pull, "Content-Type": "application/octet-stream"})
    await refused(resp, 403, "DENIED")
    resp = await reg.put(location, params={"digest": sha256_digest(b"poison")}, data=b"poison", headers=pull)
    await refused(resp, 403, "DENIED")
    resp = await reg.delete(location, headers=pull)
    await refused(resp, 403, "DENIED")
    resp = await reg.put(location, params={"digest": sha256_digest(b"mine")}, data=b"mine", headers=push)
    assert resp.status == 201, "the session was damaged by a refused request"
    assert (await reg.head(f"/v2/team-a/app/blobs/{sha256_digest(b'poison')}", headers=push)).status == 404

    # builder may delete, but a token without delete says so: ask again
    resp = await reg.delete(f"/v2/team-a/app/manifests/{digest}", headers=push)
    await refused(resp, 401, "UNAUTHORIZED")
    found = challenge_of(resp)
    assert found["error"] == "insufficient_scope" and found["scope"] == "repository:team-a/app:delete"
    delete = await reg.bearer("deployer", "repository:team-a/app:delete")
    assert (await reg.delete(f"/v2/team-a/app/manifests/{digest}", headers=delete)).status == 202


async def test_a_token_for_one_repository_does_not_open_another(reg):
    await push_image(reg, "team-a/app")
    await push_image(reg, "team-a/other")
    only_app = await reg.bearer("builder", "repository:team-a/app:pull")
    resp = await reg.get("/v2/team-a/other/manifests/latest", headers=only_app)
    await refused(resp, 401, "UNAUTHORIZED")
    assert challenge_of(resp) == {"realm": challenge_of(resp)["realm"], "service": "dockyard",
                                  "scope": "repository:team-a/other:pull", "error": "insufficient_scope"}
    resp = await reg.get("/v2/team-a/other/tags/list", headers=only_app)
    await refused(resp, 401, "UNAUTHORIZED")


async def test_a_mount_without_pull_on_the_source_is_an_ordinary_upload(reg):
    """Zot CVE-2024-39897: a mount must not reveal or copy a blob the caller
    may not read; it falls back to a 202 upload session."""
    _, layer = await push_image(reg, "team-a/app")
    outsider = await reg.bearer("outsider", "repository:scratch/x:pull,push", "repository:team-a/app:pull")
    for params in ({"mount": layer, "from": "team-a/app"}, {"mount": layer}):
        resp = await reg.post("/v2/scratch/x/blobs/uploads/", params=params, headers=outsider)
        assert resp.status == 202, await resp.text()
        assert "/blobs/uploads/" in resp.headers["Location"]
    assert (await reg.head(f"/v2/scratch/x/blobs/{layer}", headers=outsider)).status == 404
    # control: the same mount by someone who may pull the source is a 201
    builder = await reg.bearer("builder", "repository:public/x:pull,push", "repository:team-a/app:pull")
    resp = await reg.post("/v2/public/x/blobs/uploads/", params={"mount": layer, "from": "team-a/app"},
                          headers=builder)
    assert resp.status == 201
    # the challenge of a mount names both scopes; a token without the
    # source's pull that the policy would grant is asked to come back with it
    resp = await reg.post("/v2/public/y/blobs/uploads/", params={"mount": layer, "from": "team-a/app"})
    assert challenge_of(resp)["scope"] == "repository:public/y:pull,push repository:team-a/app:pull"
    narrow = await reg.bearer("builder", "repository:public/y:pull,push")
    resp = await reg.post("/v2/public/y/blobs/uploads/", params={"mount": layer, "from": "team-a/app"},
                          headers=narrow)
    await refused(resp, 401, "UNAUTHORIZED")
    assert challenge_of(resp)["error"] == "insufficient_scope"


async def test_the_catalog_needs_its_scope_and_lists_only_what_the_caller_may_pull(reg):
    """Harbor CVE-2020-29662: /v2/_catalog/ listed everything unauthenticated."""
    for repo in ("team-a/app", "public/tools"):
        await push_image(reg, repo)
    await push_image(reg, "scratch/x", user="outsider")
    builder = await reg.bearer("builder", "registry:catalog:*")
    resp = await reg.get("/v2/_catalog", headers=builder)
    assert resp.status == 200
    assert (await resp.json())["repositories"] == ["public/tools", "team-a/app"]

    resp = await reg.get("/v2/_catalog", headers=await reg.bearer("reader", "registry:catalog:*"))
    await refused(resp, 403, "DENIED")
    resp = await reg.get("/v2/_catalog", headers=await reg.bearer("builder", "repository:team-a/app:pull"))
    await refused(resp, 401, "UNAUTHORIZED")
    assert challenge_of(resp)["scope"] == "registry:catalog:*"
    for path in ("/v2/_catalog", "/v2/_catalog/", "/v2/%5Fcatalog", "/v2/%5fcatalog/", "/v2//_catalog",
                 "/v2/x/../_catalog", "/v2/./_catalog", "/v2/_catalog%2F", "/v2/_catalog?n=10"):
        status, _, body = await raw_request(reg.client, "GET", path)
        assert status in (401, 404), (path, status)
        assert b"team-a" not in body and b"scratch" not in body, path


async def test_tags_and_referrers_follow_the_pull_permission(reg):
    digest, _ = await push_image(reg, "team-a/app")
    outsider = await reg.bearer("outsider", "repository:team-a/app:pull")
    for path in ("/v2/team-a/app/tags/list", f"/v2/team-a/app/referrers/{digest}"):
        await refused(await reg.get(path, headers=outsider), 403, "DENIED")
        resp = await reg.get(path, headers=await reg.bearer("reader", "repository:team-a/app:pull"))
        assert resp.status == 200, path


async def test_anonymous_pulls_public_repositories_and_cannot_push(reg):
    await push_image(reg, "public/tools")
    anonymous = await reg.bearer(None, "repository:public/tools:pull,push")
    resp = await reg.get("/v2/public/tools/manifests/latest", headers={**anonymous, "Accept": OCI_MANIFEST})
    assert resp.status == 200
    resp = await reg.post("/v2/public/tools/blobs/uploads/", headers=anonymous)
    await refused(resp, 401, "UNAUTHORIZED")       # credentials might help
    assert challenge_of(resp)["error"] == "insufficient_scope"


# ---- malformed credentials (each must be refused with the challenge) --------------

async def test_malformed_authorization_headers_are_refused(reg):
    token = (await reg.token("reader", "repository:team-a/app:pull"))["token"]
    await push_image(reg, "team-a/app")
    path = "/v2/team-a/app/tags/list"
    ok = await reg.get(path, headers={"Authorization": bearer(token)})
    assert ok.status == 200
    for header in (f"Bearer: {token}", f"Bearer  {token}", f"Bearer {token}x", "Bearer garbage",
                   f"Token {token}", f"bearer{token}", basic("reader", USERS["reader"]), "Bearer "):
        resp = await reg.get(path, headers={"Authorization": header})
        await refused(resp, 401, "UNAUTHORIZED")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer realm="), header
    tampered = token.split(".")
    tampered[1] = tampered[1][:-2] + ("AA" if tampered[1][-2:] != "AA" else "BB")
    resp = await reg.get(path, headers={"Authorization": bearer(".".join(tampered))})
    await refused(resp, 401, "UNAUTHORIZED")
    assert challenge_of(resp)["error"] == "invalid_token"
    status, headers, body = await raw_request(
        reg.client, "GET", path, headers=[("Authorization", bearer(token)), ("Authorization", bearer(token))])
    assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"


# ---- revocation: the current files decide (Zot CVE-2025-23208) -----------------------

async def test_a_user_taken_out_of_a_group_loses_access_at_once(reg, tmp_path):
    await push_image(reg, "team-a/app")
    token = await reg.bearer("builder", "repository:team-a/app:pull,push", "registry:catalog:*")
    assert (await reg.get("/v2/team-a/app/tags/list", headers=token)).status == 200
    policy = json.loads(json.dumps(EXAMPLE_POLICY))
    policy["groups"]["devs"] = ["deployer"]
    policy["catalog"] = []
    write_policy(tmp_path / "policy.yml", policy)
    assert await reg.client.app[AUTH].directory.refresh(force=True)
    await refused(await reg.get("/v2/team-a/app/tags/list", headers=token), 403, "DENIED")
    await refused(await reg.post("/v2/team-a/app/blobs/uploads/", headers=token), 403, "DENIED")
    await refused(await reg.get("/v2/_catalog", headers=token), 403, "DENIED")


async def test_a_removed_user_loses_tokens_and_refresh_tokens(reg, tmp_path):
    body = await reg.token("deployer", "repository:team-a/app:pull", offline=True)
    users = {k: v for k, v in USERS.items() if k != "deployer"}
    write_htpasswd(tmp_path / "htpasswd", users)
    assert await reg.client.app[AUTH].directory.refresh(force=True)
    resp = await reg.get("/v2/", headers={"Authorization": bearer(body["token"])})
    await refused(resp, 401, "UNAUTHORIZED")
    assert challenge_of(resp)["error"] == "invalid_token"
    resp = await reg.post("/auth/token", data={"grant_type": "refresh_token", "service": "dockyard",
                                               "refresh_token": body["refresh_token"]})
    assert resp.status == 401 and (await resp.json())["error"] == "invalid_grant"


async def test_a_changed_password_revokes_the_refresh_token(reg, tmp_path):
    body = await reg.token("reader", offline=True)
    write_htpasswd(tmp_path / "htpasswd", {**USERS, "reader": "a-new-password"})
    assert await reg.client.app[AUTH].directory.refresh(force=True)
    resp = await reg.post("/auth/token", data={"grant_type": "refresh_token", "service": "dockyard",
                                               "refresh_token": body["refresh_token"]})
    assert resp.status == 401


# ---- repeated failures ---------------------------------------------------------------

async def test_repeated_failures_are_slowed_and_then_refused_for_a_while(make_authed):
    reg = await make_authed(max_failures=3, failure_window=60, lockout=60)
    statuses = []
    for _ in range(3):
        resp = await reg.get("/auth/token", params={"service": "dockyard"},
                             headers={"Authorization": basic("reader", "guess")})
        statuses.append(resp.status)
    assert statuses == [401, 401, 401]
    # locked out: even the right password is refused now, without a bcrypt check
    resp = await reg.get("/auth/token", params={"service": "dockyard"},
                         headers={"Authorization": basic("reader", USERS["reader"])})
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) > 0


# ---- htpasswd mode (Basic on every request) ---------------------------------------------

@pytest.fixture
async def basic_reg(make_authed):
    return await make_authed("htpasswd")


async def test_basic_mode_challenges_and_checks_credentials(basic_reg):
    reg = basic_reg
    resp = await reg.get("/v2/")
    await refused(resp, 401, "UNAUTHORIZED")
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="Dockyard",charset="UTF-8"'
    assert (await reg.get("/v2/", headers={"Authorization": basic("reader", USERS["reader"])})).status == 200
    wrong = await reg.get("/v2/", headers={"Authorization": basic("reader", "nope")})
    unknown = await reg.get("/v2/", headers={"Authorization": basic("nobody", "nope")})
    await refused(wrong, 401, "UNAUTHORIZED")
    await refused(unknown, 401, "UNAUTHORIZED")
    assert await wrong.read() == await unknown.read()
    # a known password, remembered, stops working once the file changes it
    assert (await reg.get("/v2/", headers={"Authorization": basic("reader", USERS["reader"])})).status == 200


async def test_basic_mode_applies_the_policy_per_route(basic_reg):
    reg = basic_reg
    builder = {"Authorization": basic("builder", USERS["builder"])}
    reader = {"Authorization": basic("reader", USERS["reader"])}
    data = b"public bytes"
    resp = await reg.post("/v2/public/tools/blobs/uploads/", params={"digest": sha256_digest(data)},
                          data=data, headers=builder)
    assert resp.status == 201
    # anonymous pulls public without any credentials; anonymous push: 401
    assert (await reg.get(f"/v2/public/tools/blobs/{sha256_digest(data)}")).status == 200
    resp = await reg.post("/v2/public/tools/blobs/uploads/")
    await refused(resp, 401, "UNAUTHORIZED")
    assert resp.headers["WWW-Authenticate"].startswith("Basic ")
    # a known user the policy refuses: 403
    await refused(await reg.post("/v2/team-a/app/blobs/uploads/", headers=reader), 403, "DENIED")
    await refused(await reg.get("/v2/_catalog", headers=reader), 403, "DENIED")
    resp = await reg.get("/v2/_catalog", headers=builder)
    assert (await resp.json())["repositories"] == ["public/tools"]


async def test_basic_mode_forgets_a_changed_password_at_once(basic_reg, tmp_path):
    reg = basic_reg
    header = {"Authorization": basic("reader", USERS["reader"])}
    assert (await reg.get("/v2/", headers=header)).status == 200     # now remembered
    write_htpasswd(tmp_path / "htpasswd", {**USERS, "reader": "changed"})
    assert await reg.client.app[AUTH].directory.refresh(force=True)
    await refused(await reg.get("/v2/", headers=header), 401, "UNAUTHORIZED")


async def test_auth_none_is_open(make_registry):
    reg = await make_registry()
    assert (await reg.get("/v2/")).status == 200
    assert "WWW-Authenticate" not in (await reg.get("/v2/_catalog")).headers
    resp = await reg.get("/auth/token")
    assert resp.status == 404


async def test_the_file_watcher_notices_a_policy_change(make_authed, tmp_path):
    reg = await make_authed(reload_interval=1)
    token = await reg.bearer("builder", "repository:team-a/app:pull")
    await push_image(reg, "team-a/app")
    assert (await reg.get("/v2/team-a/app/tags/list", headers=token)).status == 200
    policy = json.loads(json.dumps(EXAMPLE_POLICY))
    policy["groups"]["devs"] = ["deployer"]
    write_policy(tmp_path / "policy.yml", policy)
    for _ in range(40):
        await asyncio.sleep(0.1)
        if (await reg.get("/v2/team-a/app/tags/list", headers=token)).status == 403:
            break
    else:
        pytest.fail("the policy change was not noticed within 4 s")


# ---- behind another token server (auth.token.issue false) ---------------------------------

async def test_tokens_of_an_external_issuer_are_trusted_by_its_certificate_bundle(aiohttp_client, tmp_path):
    from tests.support.tokens import TokenServer, serve_token_server

    async with serve_token_server(tmp_path) as tokens:
        token = TokenAuthSettings(issue=False, realm=tokens.realm, issuer=TokenServer.ISSUER,
                                  service=TokenServer.SERVICE, trusted_keys=str(tokens.issuer.bundle))
        settings = settings_for_tests(tmp_path / "storage", auth=AuthSettings(mode="token", token=token))
        reg = Registry(await aiohttp_client(create_app(settings)))
        resp = await reg.get("/v2/team-b/app/tags/list")
        assert challenge_of(resp)["realm"] == tokens.realm
        assert challenge_of(resp)["service"] == TokenServer.SERVICE
        assert (await reg.get("/auth/token")).status == 404, "no built-in issuer when issue is false"
        granted = tokens.issuer.issue("alice", [{"type": "repository", "name": "team-b/app",
                                                 "actions": ["pull", "push"]}])
        headers = {"Authorization": bearer(granted)}
        data = b"external"
        resp = await reg.post("/v2/team-b/app/blobs/uploads/", params={"digest": sha256_digest(data)},
                              data=data, headers=headers)
        assert resp.status == 201
        # what that issuer did not grant stays closed, and another signer is not trusted
        resp = await reg.get("/v2/team-c/app/tags/list", headers=headers)
        assert challenge_of(resp)["error"] == "insufficient_scope"
        from tests.support.tokens import TokenIssuer

        (tmp_path / "stranger").mkdir()
        stranger = TokenIssuer(tmp_path / "stranger", service=TokenServer.SERVICE, issuer=TokenServer.ISSUER)
        forged = stranger.issue("alice", [{"type": "repository", "name": "team-b/app", "actions": ["pull"]}])
        resp = await reg.get(f"/v2/team-b/app/blobs/{sha256_digest(data)}", headers={"Authorization": bearer(forged)})
        assert challenge_of(resp)["error"] == "invalid_token"


async def test_tokens_of_an_external_issuer_are_trusted_by_its_jwks_url(aiohttp_client, tmp_path):
    import jwt
    from aiohttp import web
    from cryptography.hazmat.primitives.asymmetric import ec

    from registry.auth.keys import public_jwk, verification_key

    key = ec.generate_private_key(ec.SECP256R1())
    trusted = verification_key(key.public_key())
    async def jwks(request):
        return web.json_response({"keys": [public_jwk(key.public_key(), "issuer-key-1", "ES256")]})

    jwks_app = web.Application()
    jwks_app.router.add_get("/jwks", jwks)
    jwks_server = await aiohttp_client(jwks_app)
    url = f"http://{jwks_server.server.host}:{jwks_server.server.port}/jwks"
    token = TokenAuthSettings(issue=False, realm="https://auth.example.test/token", issuer="corp",
                              service="registry", jwks_url=url)
    settings = settings_for_tests(tmp_path / "storage", auth=AuthSettings(mode="token", token=token))
    reg = Registry(await aiohttp_client(create_app(settings)))
    now = int(time.time())
    claims = {"iss": "corp", "sub": "ci", "aud": "registry", "exp": now + 300, "nbf": now, "iat": now,
              "jti": "j1", "access": [{"type": "repository", "name": "corp/app", "actions": ["pull"]}]}
    for kid in ("issuer-key-1", trusted.kid):
        signed = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
        resp = await reg.get("/v2/corp/app/tags/list", headers={"Authorization": bearer(signed)})
        await refused(resp, 404, "NAME_UNKNOWN")      # in: the repository does not exist
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(claims, other, algorithm="ES256", headers={"kid": "issuer-key-1"})
    resp = await reg.get("/v2/corp/app/tags/list", headers={"Authorization": bearer(forged)})
    assert challenge_of(resp)["error"] == "invalid_token"
