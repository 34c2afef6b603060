"""The images file's tag selection (semver ranges as npm and regsync users
write them, regular expressions matching whole tags) and NO_PROXY's grammar
as Go reads it: pure functions, checked against tables."""

from __future__ import annotations

import pytest

from puller.client.proxy import proxy_for
from puller.transfer.mirror.errors import ImagesFileError
from puller.transfer.mirror.images_file import parse_images_text
from puller.transfer.mirror.semver import RangeError, parse_range, parse_version

TAGS = ["0.2.5", "0.3.0", "1.2.3", "v1.2.9", "1.3.0", "1.4.0", "1.4.7", "1.5.0-rc.1", "1.5.0", "2.0.0-rc.1",
        "2.0.1", "latest", "1.2.3.4", "01.2.3"]


@pytest.mark.parametrize("text, picked", [
    (">=1.2 <2", ["1.2.3", "v1.2.9", "1.3.0", "1.4.0", "1.4.7", "1.5.0"]),
    ("^1.2.3", ["1.2.3", "v1.2.9", "1.3.0", "1.4.0", "1.4.7", "1.5.0"]),
    ("^0.2.3", ["0.2.5"]),
    ("~1.4", ["1.4.0", "1.4.7"]),
    ("1.x", ["1.2.3", "v1.2.9", "1.3.0", "1.4.0", "1.4.7", "1.5.0"]),
    ("=1.2.3", ["1.2.3"]),
    ("1.2 || 2.0", ["1.2.3", "v1.2.9", "2.0.1"]),
    ("1.2 - 1.4", ["1.2.3", "v1.2.9", "1.3.0", "1.4.0", "1.4.7"]),
    (">1.4", ["1.5.0", "2.0.1"]),
    ("<=1.2", ["0.2.5", "0.3.0", "1.2.3", "v1.2.9"]),
    (">=1.5.0-rc.0 <1.6", ["1.5.0-rc.1", "1.5.0"]),       # a pre-release only when the range names one
    ("> = 2", ["2.0.1"]),
])
def test_semver_ranges_pick_tags(text, picked):
    semver = parse_range(text)
    assert [t for t in TAGS if (v := parse_version(t)) and semver.matches(v)] == picked


@pytest.mark.parametrize("text", ["", ">=a", "1.x.3", "||", "^"])
def test_bad_semver_ranges(text):
    with pytest.raises(RangeError):
        parse_range(text)


def test_tag_patterns_match_whole_tags():
    selection = parse_images_text("repositories:\n  example.com/app:\n    tags: ['v1', 'rc-[0-9]+']\n")
    spec = selection.repositories[0]
    assert [t for t in ["v1", "v10", "xv1", "rc-1", "rc-12", "rc-x"] if spec.picks(t)] == ["v1", "rc-1", "rc-12"]


@pytest.mark.parametrize("text, line, words", [
    ("images:\n  - ok:1\n  - \"BAD REF\"\n", 3, "invalid reference"),
    ("repositories:\n  r/x:\n    tags: ['(']\n", 3, "tag pattern"),
    ("images: []\nfoo: 1\n", 2, "unknown key 'foo'"),
    ("repositories:\n  r/x:\n    semver: '>=a'\n", 3, "semver range"),
    ("repositories:\n  r/x:v1:\n    tags: [v1]\n", 2, "names no tag"),
    ("repositories:\n  r/x: {}\n", 2, "no tags or semver"),
    ("images:\n  - [nested]\n", 2, "must be a string"),
    ("a/b:1\nb c\n", 2, "invalid reference"),
    ("images:\n  - a\n - b\n", 3, "not valid YAML"),
])
def test_images_file_errors_carry_their_line(text, line, words):
    with pytest.raises(ImagesFileError) as caught:
        parse_images_text(text, "f.yml")
    assert str(caught.value).startswith(f"f.yml:{line}: ") and words in str(caught.value)


@pytest.mark.parametrize("host, port, no_proxy, proxied", [
    ("registry.example", 443, "", True),
    ("registry.example", 443, "example", False),             # a name covers its subdomains
    ("example", 443, ".example", True),                     # a leading dot: subdomains only
    ("a.example", 443, ".example", False),
    ("10.1.2.3", 443, "10.0.0.0/8", False),
    ("10.1.2.3", 443, "10.1.2.3", False),
    ("registry.example", 5000, "registry.example:443", True),
    ("registry.example", 5000, "registry.example:5000", False),
    ("registry.example", 443, "*", False),
    ("127.0.0.1", 5000, "", False),                          # loopback: never
    ("localhost", 5000, "", False),
])
def test_no_proxy(host, port, no_proxy, proxied):
    environ = {"HTTPS_PROXY": "proxy.example:3128", "NO_PROXY": no_proxy}
    assert (proxy_for("https", host, port, environ) is not None) == proxied
    assert proxy_for("http", host, port, environ) is None    # HTTPS_PROXY is for https:// alone
    plain = {"HTTP_PROXY": "proxy.example:3128", "NO_PROXY": no_proxy}
    assert (proxy_for("http", host, port, plain) is not None) == proxied
    assert proxy_for("https", host, port, plain) is None
