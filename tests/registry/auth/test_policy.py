"""The access policy (registry/auth/policy.py): who may pull, push, delete
and list the catalog (docker-registry/scope.md, "Resource Scope Grammar",
"Resource Actions"; `registry:catalog:*`)."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from registry.auth import policy as policy_module
from registry.auth.policy import Policy, PolicyError, load_policy

ALL = frozenset({"pull", "push", "delete"})
NOTHING = frozenset()

EXAMPLE = """\
groups:
  devs: [builder, deployer]
rules:
  - repositories: ["team-a/app"]
    users: [reader]
    actions: [pull]
  - repositories: ["team-a/**"]
    groups: [devs]
    actions: [pull, push, delete]
  - repositories: ["public/**"]
    users: [anonymous]
    actions: [pull]
catalog: [builder]
"""


def write_policy(tmp_path, text: str, name: str = "policy.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def rules(*entries, **top) -> Policy:
    """A policy of rules (repositories, actions, users=..., groups=...)."""
    return Policy.from_mapping({"rules": [
        {"repositories": list(repos), "actions": list(actions), **who}
        for repos, actions, who in entries], **top})


@pytest.fixture
def example(tmp_path) -> Policy:
    return load_policy(write_policy(tmp_path, EXAMPLE))


# ---- the example policy ----------------------------------------------------------

def test_reader_pulls_team_a_app_and_cannot_push_it(example):
    assert example.actions_for("reader", "team-a/app") == {"pull"}
    assert example.actions_for("reader", "team-a/other") == NOTHING


def test_builder_pushes_below_team_a_at_any_depth(example):
    assert example.actions_for("builder", "team-a/x/y") == ALL
    assert example.actions_for("builder", "team-a/app") == ALL


def test_deployer_deletes_through_the_group(example):
    assert "delete" in example.actions_for("deployer", "team-a/app")


def test_anonymous_pulls_public_only(example):
    assert example.actions_for(None, "public/a/b") == {"pull"}
    assert example.actions_for(None, "team-a/app") == NOTHING
    assert example.actions_for(None, "public") == NOTHING     # `public/**` is below public/


def test_a_logged_in_user_pulls_public(example):
    """An authenticated user may do at least what a request without
    credentials may, even one no rule names."""
    assert example.actions_for("stranger", "public/a") == {"pull"}
    assert example.actions_for("builder", "public/a") == {"pull"}


def test_nobody_named_means_no_access(example):
    assert example.actions_for("stranger", "team-a/app") == NOTHING
    assert example.actions_for("builder", "elsewhere/app") == NOTHING


def test_groups_of(example):
    assert example.groups_of("builder") == {"devs"}
    assert example.groups_of("reader") == NOTHING
    assert example.groups_of(None) == NOTHING


# ---- patterns ------------------------------------------------------------------

def test_single_star_stays_inside_one_component():
    policy = rules((["team-a/*"], ["pull"], {"users": ["u"]}))
    assert policy.actions_for("u", "team-a/x") == {"pull"}
    assert policy.actions_for("u", "team-a/x/y") == NOTHING
    assert policy.actions_for("u", "team-a") == NOTHING


def test_double_star_crosses_components():
    policy = rules((["team-a/**"], ["pull"], {"users": ["u"]}), (["**/cache"], ["push"], {"users": ["u"]}))
    assert policy.actions_for("u", "team-a/x/y/z") == {"pull"}
    assert policy.actions_for("u", "a/b/cache") == {"push"}
    assert policy.actions_for("u", "team-a") == NOTHING


def test_patterns_match_the_whole_name():
    policy = rules((["team-a/app"], ["pull"], {"users": ["u"]}), (["x.y"], ["pull"], {"users": ["u"]}))
    assert policy.actions_for("u", "team-a/app2") == NOTHING
    assert policy.actions_for("u", "my/team-a/app") == NOTHING
    assert policy.actions_for("u", "team-a/app\n") == NOTHING
    assert policy.actions_for("u", "xzy") == NOTHING         # '.' is literal


def test_star_action_is_all_three():
    assert rules((["**"], ["*"], {"users": ["u"]})).actions_for("u", "a/b") == ALL


# ---- deciding ------------------------------------------------------------------

def test_most_specific_pattern_decides_in_the_documented_order():
    """`team-a/app` > `team-a/*` > `team-a/**` > `**`."""
    policy = rules((["**"], ["pull"], {"users": ["u"]}),
                   (["team-a/**"], ["push"], {"users": ["u"]}),
                   (["team-a/*"], ["delete"], {"users": ["u"]}),
                   (["team-a/app"], ["pull", "push"], {"users": ["u"]}))
    assert policy.actions_for("u", "team-a/app") == {"pull", "push"}
    assert policy.actions_for("u", "team-a/other") == {"delete"}
    assert policy.actions_for("u", "team-a/x/y") == {"push"}
    assert policy.actions_for("u", "other/z") == {"pull"}


def test_specificity_tie_breakers():
    """More literal characters, then fewer `**`, then fewer `*`."""
    policy = rules((["team-a/*"], ["pull"], {"users": ["u"]}),
                   (["team-a/ap*"], ["push"], {"users": ["u"]}),
                   (["**/app"], ["pull"], {"users": ["v"]}),
                   (["*/app"], ["delete"], {"users": ["v"]}),
                   (["a*b*"], ["pull"], {"users": ["w"]}),
                   (["a*b"], ["push"], {"users": ["w"]}))
    assert policy.actions_for("u", "team-a/app") == {"push"}
    assert policy.actions_for("v", "x/app") == {"delete"}
    assert policy.actions_for("v", "x/y/app") == {"pull"}
    assert policy.actions_for("w", "axb") == {"push"}


def test_equally_specific_rules_add_up():
    same_pattern = rules((["team-a/**"], ["pull"], {"users": ["u"]}),
                         (["team-a/**"], ["push"], {"groups": ["g"]}),
                         groups={"g": ["u"]})
    assert same_pattern.actions_for("u", "team-a/x") == {"pull", "push"}
    # different patterns of equal specificity (2 literals, one `*`)
    tied = rules((["a/*"], ["pull"], {"users": ["u"]}), (["*/a"], ["delete"], {"users": ["u"]}))
    assert tied.actions_for("u", "a/a") == {"pull", "delete"}
    assert tied.actions_for("u", "a/b") == {"pull"}


def test_a_more_specific_rule_reduces_a_broader_grant():
    """Documented consequence: a user in devs AND named in the team-a/app
    rule may only pull team-a/app."""
    text = EXAMPLE.replace("users: [reader]", "users: [reader, builder]")
    policy = Policy.from_mapping(yaml.safe_load(text))
    assert policy.actions_for("builder", "team-a/app") == {"pull"}
    assert policy.actions_for("builder", "team-a/other") == ALL
    assert policy.actions_for("deployer", "team-a/app") == ALL


def test_rules_that_do_not_name_the_user_do_not_count():
    """reader is not in devs: the broad rule neither adds nor decides."""
    policy = rules((["team-a/**"], ["*"], {"groups": ["devs"]}),
                   (["team-a/app"], ["pull"], {"users": ["reader"]}), groups={"devs": ["builder"]})
    assert policy.actions_for("reader", "team-a/app") == {"pull"}
    assert policy.actions_for("reader", "team-a/x") == NOTHING


def test_authenticated_names_every_user_but_not_anonymous():
    policy = rules((["**"], ["pull"], {"users": ["authenticated"]}))
    assert policy.actions_for("anyone", "a/b") == {"pull"}
    assert policy.actions_for(None, "a/b") == NOTHING


def test_anonymous_rules_are_a_floor_for_users_not_a_competing_rule():
    """Making public/** pullable by anyone takes nothing from a user
    granted more there by a broader rule, and a user's own narrower rule
    cannot take away what anonymous gets (they could just log out)."""
    policy = rules((["**"], ["pull", "push"], {"users": ["authenticated"]}),
                   (["public/**"], ["pull"], {"users": ["anonymous"]}),
                   (["public/special"], ["push"], {"users": ["alice"]}))
    assert policy.actions_for("bob", "public/a") == {"pull", "push"}
    assert policy.actions_for("alice", "public/special") == {"pull", "push"}
    assert policy.actions_for(None, "public/special") == {"pull"}
    narrow = rules((["public/**"], ["pull"], {"users": ["anonymous"]}),
                   (["public/special"], ["delete"], {"users": ["alice"]}))
    assert narrow.actions_for("alice", "public/special") == {"pull", "delete"}


# ---- catalog -------------------------------------------------------------------

def test_catalog_membership_by_user_group_and_authenticated(example):
    assert example.may_list_catalog("builder")
    assert not example.may_list_catalog("deployer")
    assert not example.may_list_catalog(None)
    by_group = rules((["x"], ["pull"], {"users": ["u"]}), groups={"ops": ["olga"]}, catalog=["ops"])
    assert by_group.may_list_catalog("olga") and not by_group.may_list_catalog("u")
    everyone = rules((["x"], ["pull"], {"users": ["u"]}), catalog=["authenticated"])
    assert everyone.may_list_catalog("whoever") and not everyone.may_list_catalog(None)
    nobody = rules((["x"], ["pull"], {"users": ["u"]}))
    assert not nobody.may_list_catalog("u")


# ---- reloading, default, memo --------------------------------------------------

def test_a_user_removed_from_a_group_loses_access_in_the_reloaded_policy(tmp_path):
    """Zot CVE-2025-23208: removed group memberships were kept (appended,
    never replaced). Here a reload is a new snapshot with a fresh memo."""
    text = EXAMPLE.replace("catalog: [builder]", "catalog: [devs]")
    path = write_policy(tmp_path, text)
    before = load_policy(path)
    assert before.actions_for("builder", "team-a/app") == ALL      # memoised now
    assert before.may_list_catalog("builder")
    path.write_text(text.replace("devs: [builder, deployer]", "devs: [deployer]"))
    after = load_policy(path)
    assert after.actions_for("builder", "team-a/app") == NOTHING
    assert after.groups_of("builder") == NOTHING
    assert not after.may_list_catalog("builder")
    assert after.actions_for("deployer", "team-a/app") == ALL
    assert before.actions_for("builder", "team-a/app") == ALL      # the old snapshot is unchanged


def test_default_policy_every_user_everything_anonymous_nothing():
    policy = Policy.default()
    assert policy.actions_for("anyone", "a/b/c") == ALL
    assert policy.may_list_catalog("anyone")
    assert policy.actions_for(None, "a/b/c") == NOTHING
    assert not policy.may_list_catalog(None)


def test_memo_is_bounded_and_consistent(example):
    for i in range(policy_module._MEMO_SIZE + 50):
        example.actions_for("builder", f"team-a/r{i}")
    assert len(example._memo) <= policy_module._MEMO_SIZE
    assert example.actions_for("builder", "team-a/r0") == ALL
    assert example.actions_for("reader", "team-a/app") == {"pull"}


# ---- validation ----------------------------------------------------------------

RULE = {"repositories": ["a/**"], "users": ["u"], "actions": ["pull"]}

INVALID = {
    "not a mapping": (["rules"], "must be a mapping"),
    "missing rules": ({"groups": {}}, "missing `rules`"),
    "unknown top key": ({"rules": [], "rule": []}, "unknown key 'rule'"),
    "rules not a list": ({"rules": RULE}, "rules: must be a list"),
    "rule not a mapping": ({"rules": ["a/**"]}, "rules[0]: must be a mapping"),
    "unknown rule key": ({"rules": [{**RULE, "action": ["push"]}]}, "unknown key 'action'"),
    "no repositories": ({"rules": [{"users": ["u"], "actions": ["pull"]}]}, "no `repositories`"),
    "empty repositories": ({"rules": [{**RULE, "repositories": []}]}, "is empty"),
    "repositories a string": ({"rules": [{**RULE, "repositories": "a/**"}]}, "list of non-empty"),
    "no actions": ({"rules": [{"repositories": ["a"], "users": ["u"]}]}, "no `actions`"),
    "empty actions": ({"rules": [{**RULE, "actions": []}]}, "is empty"),
    "unknown action": ({"rules": [{**RULE, "actions": ["pul"]}]}, "unknown action 'pul'"),
    "users a string": ({"rules": [{**RULE, "users": "u"}]}, "rules[0].users: must be a list"),
    "users not strings": ({"rules": [{**RULE, "users": [True]}]}, "rules[0].users"),
    "groups not strings": ({"rules": [{**RULE, "groups": [1]}], "groups": {}}, "rules[0].groups"),
    "names nobody": ({"rules": [{"repositories": ["a"], "actions": ["pull"]}]}, "names no users"),
    "undefined group": ({"rules": [{**RULE, "groups": ["ops"]}]}, "group 'ops' is not defined"),
    "groups not a mapping": ({"rules": [], "groups": ["devs"]}, "groups: must map"),
    "members not a list": ({"rules": [], "groups": {"devs": "u"}}, "groups.devs"),
    "group named anonymous": ({"rules": [], "groups": {"anonymous": ["u"]}}, "built-in name"),
    "builtin as member": ({"rules": [], "groups": {"g": ["authenticated"]}}, "is built in"),
    "catalog not a list": ({"rules": [], "catalog": "u"}, "catalog: must be a list"),
    "empty pattern": ({"rules": [{**RULE, "repositories": [""]}]}, "list of non-empty"),
    "uppercase pattern": ({"rules": [{**RULE, "repositories": ["Team/app"]}]}, "not a repository pattern"),
    "tag in pattern": ({"rules": [{**RULE, "repositories": ["a/app:1"]}]}, "not a repository pattern"),
    "space in pattern": ({"rules": [{**RULE, "repositories": ["a app"]}]}, "not a repository pattern"),
    "triple star": ({"rules": [{**RULE, "repositories": ["a/***"]}]}, "'***'"),
    "empty component": ({"rules": [{**RULE, "repositories": ["a//b"]}]}, "empty path component"),
    "trailing slash": ({"rules": [{**RULE, "repositories": ["a/"]}]}, "empty path component"),
}


@pytest.mark.parametrize("data, expected", INVALID.values(), ids=INVALID.keys())
def test_every_validation_error_is_one_line_naming_the_source(data, expected):
    with pytest.raises(PolicyError) as caught:
        Policy.from_mapping(data, source="/etc/dockyard/policy.yaml")
    message = str(caught.value)
    assert message.startswith("/etc/dockyard/policy.yaml: ")
    assert expected in message and "\n" not in message


@pytest.mark.parametrize("text, expected", [
    ("rules: []\nrules: []\n", "line 2: invalid YAML: key 'rules' appears twice"),
    ("rules: [\n", "invalid YAML"),
    ("", "missing `rules`"),
    ("rules:\n  - repositories: [a]\n    users: [yes]\n    actions: [pull]\n", "rules[0].users"),
])
def test_file_errors_name_the_file(tmp_path, text, expected):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}: ") and expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "absent.yaml")
