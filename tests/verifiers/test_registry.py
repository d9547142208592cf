"""The verifier table: names, options, lazy imports, the reserved 'code' entry, averify."""

from __future__ import annotations

import sys

import pytest

from areal_agents.errors import ConfigError
from areal_agents.verifiers import VERIFIERS, Verdict, Verifier, averify, get, register, resolve
from areal_agents.verifiers.exact import ExactVerifier
from areal_agents.verifiers.numeric import NumericVerifier

CODE_ENTRY = "areal_agents.verifiers.code:CodeVerifier"


@pytest.fixture
def table(monkeypatch):
    """The verifier table, restored after the test."""
    monkeypatch.setattr("areal_agents.verifiers.registry.VERIFIERS", dict(VERIFIERS))
    from areal_agents.verifiers import registry

    return registry.VERIFIERS


def test_builtin_names():
    assert set(VERIFIERS) >= {"math", "exact", "regex", "numeric", "json_schema", "code"}


@pytest.mark.parametrize(
    ("name", "options", "response", "answer"),
    [
        ("exact", {}, "Paris", "paris"),
        ("regex", {"pattern": r"Answer: (\d+)"}, "Answer: 4", "4"),
        ("numeric", {"rel_tol": 0.01}, "99.5", 100),
        ("math", {}, r"\boxed{\frac{1}{2}}", "0.5"),
        ("json_schema", {}, '{"a": 1}', {"type": "object"}),
    ],
)
def test_get_builds_each_builtin(name, options, response, answer):
    if name in ("math", "json_schema"):
        pytest.importorskip({"math": "math_verify", "json_schema": "jsonschema"}[name])
    verifier = get(name, **options)
    assert isinstance(verifier, Verifier)
    assert verifier.verify(response, answer).score == 1.0


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ConfigError, match=r"no verifier named 'numerc'; did you mean 'numeric'\?"):
        get("numerc")


def test_unknown_option_lists_the_options():
    with pytest.raises(
        ConfigError,
        match=r"verifier 'numeric' takes no option 'tol' \(its options: abs_tol, rel_tol, pick\)",
    ):
        get("numeric", tol=0.1)


def test_code_entry_is_reserved_and_absent_module_is_a_clear_error(table, monkeypatch):
    table["code"] = CODE_ENTRY
    monkeypatch.setitem(sys.modules, "areal_agents.verifiers.code", None)  # as if absent
    with pytest.raises(
        ConfigError,
        match=r"verifier 'code' needs the module areal_agents.verifiers.code, which is not installed",
    ):
        get("code")


def test_a_module_may_register_itself_on_import(table, tmp_path, monkeypatch):
    (tmp_path / "aa_fake_verifier.py").write_text(
        "from areal_agents.verifiers import register, Verdict\n"
        "class Always:\n"
        "    def verify(self, response, answer):\n"
        "        return Verdict(1.0, 'always right')\n"
        "register('fake', Always, replace=True)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    table["fake"] = "aa_fake_verifier:NotDefinedHere"
    assert get("fake").verify("x", "y") == Verdict(1.0, "always right")


def test_missing_attribute_names_the_fix(table, tmp_path, monkeypatch):
    (tmp_path / "aa_empty_verifier.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    table["empty"] = "aa_empty_verifier:EmptyVerifier"
    with pytest.raises(ConfigError, match=r"aa_empty_verifier defines no 'EmptyVerifier'"):
        get("empty")


def test_register_refuses_to_replace_silently(table):
    register("numeric_again", NumericVerifier)
    register("numeric_again", NumericVerifier)  # the same entry again is fine
    with pytest.raises(ConfigError, match="a verifier named 'numeric' is already registered"):
        register("numeric", ExactVerifier)
    register("numeric", ExactVerifier, replace=True)
    assert table["numeric"] is ExactVerifier


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ModuleNotFoundError) as info:
        get("math")
    assert str(info.value) == (
        "the 'math' verifier needs math_verify, which is not installed: "
        'pip install "areal-agents[math]"'
    )


def test_resolve_objects_and_names():
    numeric = NumericVerifier()
    assert resolve(numeric) is numeric
    assert isinstance(resolve("numeric", {"abs_tol": 0.5}), NumericVerifier)
    with pytest.raises(
        ConfigError, match=r"verifier_kwargs \['abs_tol'\] were given with a verifier object"
    ):
        resolve(numeric, {"abs_tol": 0.5})
    with pytest.raises(
        ConfigError, match="or an object with verify\\(response, answer\\) -> Verdict, got int"
    ):
        resolve(12)


def test_verdict_checks_its_score():
    with pytest.raises(ValueError, match=r"Verdict.score must be in \[0, 1\], got 1.5"):
        Verdict(1.5, "too good")
    assert Verdict(0.5, "half").correct is False


async def test_averify_awaits_async_verifiers_and_calls_sync_ones():
    class Slow:
        def verify(self, response, answer):
            raise AssertionError("the async method should be used")

        async def averify(self, response, answer):
            return Verdict(1.0, "checked asynchronously")

    assert await averify(Slow(), "x", "y") == Verdict(1.0, "checked asynchronously")
    assert (await averify(NumericVerifier(), "2", 2)).score == 1.0
