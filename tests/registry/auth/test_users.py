"""Credentials (registry/auth/users.py): htpasswd files of bcrypt hashes
written by the real `htpasswd -B`, verification that takes as long for an
unknown user as for a wrong password, and the failure limiter."""

from __future__ import annotations

import statistics
import time

import bcrypt
import pytest

from registry.auth import users as users_module
from registry.auth.users import CredentialsFileError, FailureLimiter, Htpasswd, load_htpasswd
from tests.support.peers import require_tool, run


def htpasswd(*args: str) -> str:
    return run([require_tool("htpasswd"), *args]).stdout


@pytest.fixture
def real_file(tmp_path):
    """alice (cost 5) and bob (cost 4), written by the real tool."""
    path = tmp_path / "htpasswd"
    htpasswd("-B", "-C", "5", "-b", "-c", str(path), "alice", "s3cret")
    htpasswd("-B", "-C", "4", "-b", str(path), "bob", "hunter2")
    return path


def entry(user: str, password: bytes, cost: int, prefix: bytes = b"2b") -> str:
    return f"{user}:{bcrypt.hashpw(password, bcrypt.gensalt(cost, prefix)).decode()}\n"


# ---- htpasswd -B files -------------------------------------------------------------

def test_a_file_written_by_htpasswd_verifies(real_file):
    creds = load_htpasswd(real_file)
    assert creds.users == {"alice", "bob"} and "alice" in creds and "carol" not in creds
    assert creds.verify("alice", "s3cret") and creds.verify("bob", b"hunter2")
    assert not creds.verify("alice", "s3cret!") and not creds.verify("alice", "hunter2")
    assert not creds.verify("carol", "s3cret")


def test_each_entry_keeps_its_own_cost():
    """bcrypt's cost is read from each hash: cost 4 and cost 8 both verify,
    as do the $2y$ (htpasswd) and $2a$ spellings."""
    creds = Htpasswd.parse(entry("four", b"pw4", 4) + entry("eight", b"pw8", 8, b"2a")
                           + entry("why", b"pwy", 4).replace("$2b$", "$2y$"))
    assert creds.verify("four", "pw4") and creds.verify("eight", "pw8") and creds.verify("why", "pwy")
    assert not creds.verify("eight", "pw4")


def test_comments_and_blank_lines_are_allowed():
    creds = Htpasswd.parse("# managed by ops\n\n" + entry("alice", b"pw", 4) + "   \n# end\n")
    assert creds.users == {"alice"}


def test_long_passwords_match_what_htpasswd_hashed(tmp_path):
    """htpasswd -B (like bcrypt) reads 72 bytes; a password of 100 still logs in."""
    path = tmp_path / "htpasswd"
    htpasswd("-B", "-C", "4", "-b", "-c", str(path), "long", "x" * 100)
    creds = load_htpasswd(path)
    assert creds.verify("long", "x" * 100) and creds.verify("long", "x" * 72)
    assert not creds.verify("long", "x" * 71)


def test_unusual_passwords_are_handled_safely():
    creds = Htpasswd.parse(entry("bin", b"\xff\xfe-latin", 4) + entry("alice", b"pw", 4))
    assert creds.verify("bin", b"\xff\xfe-latin")
    assert creds.verify("bin", b"\xff\xfe-latin".decode("utf-8", "surrogateescape"))
    assert not creds.verify("bin", "\ud800")                 # a lone surrogate is no password
    assert not creds.verify("alice", "pw\0")                # htpasswd cannot hash a NUL
    assert not creds.verify("alice", "pw" * 600)            # over 1024 bytes
    assert not creds.verify("alice", None)                  # type: ignore[arg-type]
    assert not creds.verify(None, "pw")                     # type: ignore[arg-type]


def test_every_attempt_costs_exactly_one_bcrypt_check(monkeypatch):
    """An unknown user, a wrong password, an oversized or unusable one: one
    check each, the unknown user's against a dummy of the usual cost (the
    cost most entries use)."""
    creds = Htpasswd.parse(entry("a", b"pw", 4) + entry("b", b"pw", 5) + entry("c", b"pw", 5))
    seen = []
    real = bcrypt.checkpw
    monkeypatch.setattr(users_module.bcrypt, "checkpw",
                        lambda pw, hashed: seen.append(hashed) or real(pw, hashed))
    for user, password in [("nobody", "pw"), ("a", "wrong"), ("a", "x" * 5000), ("a", "pw\0"),
                           ("nobody", "x" * 5000), (None, "pw")]:
        seen.clear()
        assert not creds.verify(user, password)
        assert len(seen) == 1, (user, len(password))
        if user != "a":
            assert seen[0].startswith(b"$2b$05$")


def test_timing_unknown_user_and_wrong_password_are_comparable():
    """Without the dummy check an unknown user is answered ~1000x faster
    than a wrong password (cost 8: ~15 ms), which tells an attacker which
    names exist."""
    creds = Htpasswd.parse(entry("alice", b"right", 8) + entry("bob", b"right", 8))

    def median(user: str) -> float:
        runs = []
        for _ in range(7):
            start = time.perf_counter()
            assert not creds.verify(user, "wrong")
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    median("alice")                                          # warm up
    ratio = median("mallory") / median("alice")
    assert 0.5 <= ratio <= 2.0, ratio


def test_fingerprint_changes_with_the_password_and_goes_with_the_user(real_file):
    """Refresh tokens and cached credentials are bound to it (docker-registry/
    token.md, refresh tokens): a new password or a removed user revokes them."""
    first = load_htpasswd(real_file)
    alice = first.fingerprint("alice")
    assert alice and len(alice) == 64 and alice != first.fingerprint("bob")
    assert load_htpasswd(real_file).fingerprint("alice") == alice      # stable across loads
    htpasswd("-B", "-C", "4", "-b", str(real_file), "alice", "n3w")
    changed = load_htpasswd(real_file)
    assert changed.fingerprint("alice") not in (None, alice)
    assert changed.fingerprint("bob") == first.fingerprint("bob")
    htpasswd("-D", str(real_file), "bob")
    removed = load_htpasswd(real_file)
    assert removed.fingerprint("bob") is None and "bob" not in removed
    assert first.verify("bob", "hunter2")                     # the old snapshot is unchanged
    assert first.fingerprint("nobody") is None


# ---- refused files ------------------------------------------------------------------

@pytest.mark.parametrize("flag, scheme", [("-s", "SHA-1"), ("-m", "MD5"), ("-d", "crypt"),
                                          ("-p", "plain")])
def test_weak_schemes_are_refused_naming_the_line_never_the_hash(tmp_path, flag, scheme):
    path = tmp_path / "htpasswd"
    htpasswd("-B", "-C", "4", "-b", "-c", str(path), "alice", "pw")
    line = htpasswd(flag, "-b", "-n", "weak", "Secret-pw").strip()
    hashed = line.partition(":")[2]
    path.write_text(path.read_text() + "# a comment\n" + line + "\n")
    with pytest.raises(CredentialsFileError) as caught:
        load_htpasswd(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: ") and "'weak'" in message and scheme in message
    assert hashed not in message and "Secret-pw" not in message and "\n" not in message


BAD_FILES = {
    "no colon": ("alice$2y$05$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0\n",
                 "expected user:bcrypt-hash"),
    "empty user": (":$2y$05$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0\n",
                   "expected user:bcrypt-hash"),
    "truncated bcrypt": ("alice:$2y$05$abcdefghijklmnop\n", "malformed bcrypt"),
    "cost out of range": ("alice:$2y$03$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0\n",
                          "cost 3"),
    "reserved name": ("anonymous:$2y$05$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0\n",
                      "reserved"),
}


@pytest.mark.parametrize("text, expected", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_malformed_lines_are_refused_without_quoting_them(text, expected):
    with pytest.raises(CredentialsFileError) as caught:
        Htpasswd.parse(text, "creds")
    message = str(caught.value)
    hashed = text.strip().partition(":")[2] or text.strip()
    assert message.startswith("creds:1: ") and expected in message
    assert hashed[7:] not in message and "\n" not in message


def test_duplicate_users_are_refused():
    text = entry("alice", b"a", 4) + entry("bob", b"b", 4) + entry("alice", b"c", 4)
    with pytest.raises(CredentialsFileError, match=r"^creds:3: user 'alice' appears twice$"):
        Htpasswd.parse(text, "creds")


def test_unreadable_files_and_non_utf8_names(tmp_path):
    with pytest.raises(CredentialsFileError, match="cannot read"):
        load_htpasswd(tmp_path / "absent")
    with pytest.raises(CredentialsFileError, match=r"^creds:1: the user name is not UTF-8$"):
        Htpasswd.parse(b"\xffx:" + entry("a", b"p", 4).partition(":")[2].encode(), "creds")


# ---- FailureLimiter ------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


def test_first_failures_are_free_then_the_delay_grows(clock):
    limiter = FailureLimiter(max_failures=5, window=60, lockout=300, max_delay=2.0, clock=clock)
    assert limiter.delay_for("1.2.3.4") == 0 and limiter.locked_for("1.2.3.4") == 0
    delays = []
    for _ in range(4):
        limiter.failed("1.2.3.4")
        delays.append(limiter.delay_for("1.2.3.4"))
    assert delays[:2] == [0, 0]
    assert 0 < delays[2] < delays[3] <= 2.0
    assert limiter.locked_for("1.2.3.4") == 0
    assert limiter.delay_for("5.6.7.8") == 0                 # other clients are not slowed


def test_lockout_after_max_failures_and_its_end(clock):
    limiter = FailureLimiter(max_failures=3, window=60, lockout=300, max_delay=2.0, clock=clock)
    for _ in range(3):
        limiter.failed("k")
    assert limiter.locked_for("k") == 300 and limiter.delay_for("k") == 2.0
    clock.now += 100
    limiter.failed("k")                                      # a lockout is not extended
    assert limiter.locked_for("k") == 200
    clock.now += 200
    assert limiter.locked_for("k") == 0
    limiter.failed("k")                                      # a clean slate after it
    assert limiter.delay_for("k") == 0 and limiter.locked_for("k") == 0


def test_failures_older_than_the_window_are_forgotten(clock):
    limiter = FailureLimiter(max_failures=3, window=60, clock=clock)
    limiter.failed("k")
    limiter.failed("k")
    clock.now += 61
    limiter.failed("k")
    assert limiter.locked_for("k") == 0 and limiter.delay_for("k") == 0


def test_success_clears(clock):
    limiter = FailureLimiter(max_failures=3, clock=clock)
    limiter.failed("k")
    limiter.failed("k")
    limiter.succeeded("k")
    limiter.failed("k")
    limiter.failed("k")
    assert limiter.locked_for("k") == 0 and len(limiter) == 1


def test_memory_is_bounded_by_max_clients_oldest_first(clock):
    limiter = FailureLimiter(max_failures=2, max_clients=3, clock=clock)
    for i in range(10):
        limiter.failed(f"10.0.0.{i}")
        assert len(limiter) <= 3
    limiter.failed("10.0.0.9")
    assert limiter.locked_for("10.0.0.9") > 0                # the newest are remembered
    limiter.failed("10.0.0.0")
    assert limiter.locked_for("10.0.0.0") == 0               # the oldest was forgotten
