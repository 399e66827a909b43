"""Tests for swarmnode.build.plan: parsing, the exact error messages, and ordering."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swarmnode.build import plan as plan_module
from swarmnode.build.plan import (
    Job,
    Plan,
    PlanError,
    Requires,
    load_plan,
    parse_plan,
    topological_order,
    validate_plan,
)

FULL = """
name = "hello"

[jobs.compile]
cmd = "cc -c hello.c"
inputs = ["src/hello.c", "./src/hello.h"]
outputs = ["*.o"]
requires = { arch = "x86_64", kind = "lxc", tags = ["gcc", "fast"], cores = 4 }
estimate = 2.5
env = { CFLAGS = "-O2", EMPTY = "" }

[jobs.link]
cmd = ["cc", "-o", "hello", "hello.o", ""]
deps = ["compile"]
outputs = ["hello", "logs/**/*.txt"]
"""


def error(text: str, base_dir: Path | None = None) -> str:
    with pytest.raises(PlanError) as caught:
        parse_plan(text, base_dir)
    return str(caught.value)


def test_full_plan_is_parsed_into_typed_fields() -> None:
    plan = parse_plan(FULL)
    assert plan.name == "hello"
    assert list(plan.jobs) == ["compile", "link"]
    compile_, link = plan.jobs["compile"], plan.jobs["link"]
    assert compile_.cmd == "cc -c hello.c"
    assert compile_.inputs == ("src/hello.c", "src/hello.h")  # "./" normalised away
    assert compile_.requires == Requires("x86_64", "lxc", frozenset({"gcc", "fast"}), 4)
    assert compile_.estimate == 2.5
    assert compile_.env == {"CFLAGS": "-O2", "EMPTY": ""}
    assert link.cmd == ("cc", "-o", "hello", "hello.o", "")
    assert link.deps == ("compile",)
    assert link.outputs == ("hello", "logs/**/*.txt")
    assert link.requires == Requires()
    assert link.estimate == 1.0
    assert link.env == {}


def test_defaults_when_only_cmd_is_given() -> None:
    plan = parse_plan('[jobs.a]\ncmd = "true"\n')
    assert plan.name == "build"
    assert plan.jobs["a"] == Job("a", "true")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[jobs.compile-foo]\ncmd = "x"\ndeps = ["baz", "bar"]\n[jobs.baz]\ncmd = "y"\n',
            "jobs.compile-foo.deps[1]: unknown job 'bar' (did you mean 'baz'?)",
        ),
        (
            '[jobs.compile-foo]\ncmd = "x"\ndeps = ["nothing"]\n',
            "jobs.compile-foo.deps[0]: unknown job 'nothing'",
        ),
        (
            '[jobs.x]\ncmd = "x"\nrequires = { cores = "two" }\n',
            'jobs.x.requires.cores: must be an integer >= 1, got "two"',
        ),
        (
            '[jobs.x]\ncmd = "x"\nrequires = { cores = 0 }\n',
            "jobs.x.requires.cores: must be an integer >= 1, got 0",
        ),
        (
            '[jobs.x]\ncmd = "x"\nrequires = { cores = 2.0 }\n',
            "jobs.x.requires.cores: must be an integer >= 1, got 2.0",
        ),
        (
            '[jobs.x]\ncmd = "x"\nrequires = { cores = true }\n',
            "jobs.x.requires.cores: must be an integer >= 1, got true",
        ),
        (
            '[jobs.x]\ncmd = "x"\nrequires = { cores = 5000 }\n',
            "jobs.x.requires.cores: must be at most 4096, got 5000",
        ),
        (
            '[jobs.x]\ncomand = "x"\n',
            "jobs.x: unknown key 'comand' (did you mean 'cmd'?)",
        ),
        (
            '[jobs.x]\ncmd = "x"\ndepends = []\n',
            "jobs.x: unknown key 'depends' (did you mean 'deps'?)",
        ),
        (
            '[jobs.x]\ncmd = "x"\nrequires = { cpus = 2 }\n',
            "jobs.x.requires: unknown key 'cpus' (did you mean 'cores'?)",
        ),
        (
            '[jobs.x]\ncmd = "x"\nrequires = { kind = "kvm" }\n',
            'jobs.x.requires.kind: must be one of bare, vm, lxc, docker, got "kvm"',
        ),
        (
            '[jobs.x]\ncmd = "x"\nrequires = { tags = "gcc" }\n',
            'jobs.x.requires.tags: must be an array of strings, got "gcc"',
        ),
        (
            '[jobs.x]\ncmd = "x"\nrequires = { arch = "" }\n',
            'jobs.x.requires.arch: must be a non-empty string, got ""',
        ),
        ("[jobs.x]\ninputs = []\n", "jobs.x: missing required key 'cmd'"),
        ('[jobs.x]\ncmd = "  "\n', "jobs.x.cmd: must not be empty"),
        ("[jobs.x]\ncmd = []\n", "jobs.x.cmd: must not be an empty array"),
        ('[jobs.x]\ncmd = ["", "a"]\n', "jobs.x.cmd[0]: the program name must not be empty"),
        ('[jobs.x]\ncmd = ["cc", 3]\n', "jobs.x.cmd[1]: must be a string, got 3"),
        (
            "[jobs.x]\ncmd = 3\n",
            "jobs.x.cmd: must be a string (run by sh -c) or an array (an argv), got 3",
        ),
        (
            '[jobs.x]\ncmd = "x"\ninputs = ["../secret"]\n',
            "jobs.x.inputs[0]: must not contain '..' (it would leave the plan directory), "
            'got "../secret"',
        ),
        (
            '[jobs.x]\ncmd = "x"\ninputs = ["a", "src/../../b"]\n',
            "jobs.x.inputs[1]: must not contain '..' (it would leave the plan directory), "
            'got "src/../../b"',
        ),
        (
            '[jobs.x]\ncmd = "x"\ninputs = ["/etc/passwd"]\n',
            'jobs.x.inputs[0]: must be a relative path, got absolute "/etc/passwd"',
        ),
        (
            '[jobs.x]\ncmd = "x"\ninputs = ["a.c", "./a.c"]\n',
            'jobs.x.inputs[1]: duplicate of jobs.x.inputs[0] ("a.c")',
        ),
        (
            '[jobs.x]\ncmd = "x"\noutputs = ["/tmp/*.o"]\n',
            'jobs.x.outputs[0]: must be a relative path, got absolute "/tmp/*.o"',
        ),
        (
            '[jobs.x]\ncmd = "x"\noutputs = ["out/../../*.o"]\n',
            "jobs.x.outputs[0]: must not contain '..' (it would leave the job directory), "
            'got "out/../../*.o"',
        ),
        (
            '[jobs.x]\ncmd = "x"\noutputs = ["."]\n',
            'jobs.x.outputs[0]: must name something inside the job directory, got "."',
        ),
        ('[jobs.x]\ncmd = "x"\noutputs = "*.o"\n', "jobs.x.outputs: must be an array of"),
        ('[jobs.x]\ncmd = "x"\nestimate = 0\n', "jobs.x.estimate: must be a number of seconds"),
        ('[jobs.x]\ncmd = "x"\nestimate = -1.5\n', "jobs.x.estimate: must be a number of"),
        ('[jobs.x]\ncmd = "x"\nestimate = nan\n', "jobs.x.estimate: must be a number of"),
        ('[jobs.x]\ncmd = "x"\nestimate = inf\n', "jobs.x.estimate: must be a number of"),
        (
            '[jobs.x]\ncmd = "x"\nestimate = "5"\n',
            'jobs.x.estimate: must be a number of seconds > 0, got "5"',
        ),
        ('[jobs.x]\ncmd = "x"\nenv = { A = 1 }\n', "jobs.x.env.A: must be a string, got 1"),
        (
            '[jobs.x]\ncmd = "x"\nenv = { "A-B" = "1" }\n',
            "jobs.x.env.A-B: is not a valid environment variable name",
        ),
        ('[jobs.x]\ncmd = "x"\ndeps = ["x"]\n', "jobs.x.deps[0]: a job cannot depend on itself"),
        (
            '[jobs.x]\ncmd = "x"\ndeps = ["y", "y"]\n[jobs.y]\ncmd = "y"\n',
            "jobs.x.deps[1]: duplicate of jobs.x.deps[0] ('y')",
        ),
        (
            '[jobs."a b"]\ncmd = "x"\n',
            'jobs."a b": invalid name "a b": use only letters, digits and . _ + -',
        ),
        ('[jobs."-x"]\ncmd = "x"\n', 'jobs.-x: invalid name "-x"'),
        ('[jobs.".."]\ncmd = "x"\n', 'jobs."..": invalid name ".."'),
        ('[jobs."a/b"]\ncmd = "x"\n', 'jobs."a/b": invalid name "a/b"'),
        (
            '[jobs.gcc-13.2]\ncmd = "x"\n',
            """jobs.gcc-13: unknown key '2' (a job name containing "." must be quoted: """
            """[jobs."gcc-13.2"])""",
        ),
        ('[jobs.x]\ncmd = "x"\n[jobz]\n', "plan: unknown key 'jobz' (did you mean 'jobs'?)"),
        ('name = "my build"\n[jobs.x]\ncmd = "x"\n', 'name: invalid name "my build"'),
        ('name = 3\n[jobs.x]\ncmd = "x"\n', "name: must be a non-empty string, got 3"),
        ("jobs = 3\n", "jobs: must be a table of jobs, got 3"),
        ('jobs = { x = "true" }\n', 'jobs.x: must be a table, got "true"'),
        ("", "plan is empty"),
        ("# nothing but a comment\n", "plan is empty"),
        ('name = "x"\n', "jobs: the plan has no jobs"),
        ("[jobs]\n", "jobs: the plan has no jobs"),
    ],
)
def test_errors_name_the_field(text: str, message: str) -> None:
    assert error(text).startswith(message)


def test_toml_syntax_errors_carry_the_line_number() -> None:
    message = error('[jobs.x]\ncmd = "x"\ndeps = [\n"a"\noutputs = 3\n')
    assert message.startswith("invalid TOML: ")
    assert "line 5" in message


def test_two_job_cycle() -> None:
    text = '[jobs.a]\ncmd = "x"\ndeps = ["b"]\n[jobs.b]\ncmd = "x"\ndeps = ["a"]\n'
    assert error(text) == "dependency cycle: a -> b -> a"


def test_longer_cycle_is_reported_from_its_first_job_by_name() -> None:
    text = (
        '[jobs.top]\ncmd = "x"\ndeps = ["c"]\n'
        '[jobs.c]\ncmd = "x"\ndeps = ["d"]\n'
        '[jobs.d]\ncmd = "x"\ndeps = ["e"]\n'
        '[jobs.e]\ncmd = "x"\ndeps = ["c"]\n'
    )
    assert error(text) == "dependency cycle: c -> d -> e -> c"


def test_deep_chain_needs_no_recursion() -> None:
    n = 5_000
    jobs = {f"j{i}": Job(f"j{i}", "x", deps=(f"j{i - 1}",) if i else ()) for i in range(n)}
    plan = validate_plan(Plan("chain", jobs))
    assert topological_order(plan)[:3] == ["j0", "j1", "j2"]
    jobs["j0"] = Job("j0", "x", deps=(f"j{n - 1}",))
    with pytest.raises(PlanError, match=r"^dependency cycle: j0 -> j4999 -> j4998 -> "):
        validate_plan(Plan("chain", jobs))


def test_topological_order_is_deterministic_and_respects_deps() -> None:
    text = (
        '[jobs.z]\ncmd = "x"\n'
        '[jobs.link]\ncmd = "x"\ndeps = ["b", "a"]\n'
        '[jobs.b]\ncmd = "x"\ndeps = ["z"]\n'
        '[jobs.a]\ncmd = "x"\n'
    )
    assert topological_order(parse_plan(text)) == ["a", "z", "b", "link"]


def test_limits_are_enforced_with_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "MAX_JOBS", 2)
    text = '[jobs.a]\ncmd = "x"\n[jobs.b]\ncmd = "x"\n[jobs.c]\ncmd = "x"\n'
    assert error(text) == "jobs: 3 jobs, more than the limit of 2"
    monkeypatch.setattr(plan_module, "MAX_ITEMS", 2)
    message = error('[jobs.a]\ncmd = "x"\noutputs = ["a", "b", "c"]\n')
    assert message == "jobs.a.outputs: has 3 entries, more than the limit of 2"
    monkeypatch.setattr(plan_module, "MAX_TEXT", 10)
    assert error('[jobs.a]\ncmd = "x"\n').startswith("plan is 19 characters, more than")


def test_long_names_are_refused() -> None:
    name = "j" * 201
    assert error(f'[jobs.{name}]\ncmd = "x"\n').endswith("name is longer than 200 characters")


def test_inputs_must_exist_when_the_directory_is_known(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.c").write_text("int main;\n")
    ok = parse_plan('[jobs.x]\ncmd = "x"\ninputs = ["src/a.c"]\n', tmp_path)
    assert ok.base_dir == tmp_path
    message = error('[jobs.x]\ncmd = "x"\ninputs = ["src/a.c", "src/b.c"]\n', tmp_path)
    assert message == f"jobs.x.inputs[1]: no such file: {tmp_path.resolve()}/src/b.c"
    message = error('[jobs.x]\ncmd = "x"\ninputs = ["src"]\n', tmp_path)
    assert message.startswith('jobs.x.inputs[0]: "src" is not a regular file')


def test_inputs_may_not_escape_through_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    base = tmp_path / "plan"
    base.mkdir()
    os.symlink(outside, base / "link.txt")
    message = error('[jobs.x]\ncmd = "x"\ninputs = ["link.txt"]\n', base)
    assert message.startswith('jobs.x.inputs[0]: "link.txt" leads outside the plan directory')
    (base / "inside.txt").write_text("ok")
    os.symlink(base / "inside.txt", base / "alias.txt")
    assert parse_plan('[jobs.x]\ncmd = "x"\ninputs = ["alias.txt"]\n', base).jobs["x"].inputs


def test_load_plan_reads_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "hello.c").write_text("int main(void) { return 0; }\n")
    path = tmp_path / "my plan.toml"
    path.write_text('[jobs.cc]\ncmd = "cc hello.c"\ninputs = ["hello.c"]\n')
    plan = load_plan(path)
    assert plan.name == "my_plan"  # the stem, made a valid name
    assert plan.base_dir == tmp_path
    path.write_text('name = "named"\n[jobs.cc]\ncmd = "x"\ninputs = ["missing.c"]\n')
    with pytest.raises(PlanError, match=r"^jobs\.cc\.inputs\[0\]: no such file"):
        load_plan(path)


def test_load_plan_reports_unreadable_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="cannot read plan"):
        load_plan(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"name = '\xff'\n")
    with pytest.raises(PlanError, match=r"not UTF-8 text \(byte 8\)"):
        load_plan(bad)


def test_validate_plan_checks_plans_built_in_code() -> None:
    good = Plan("p", {"a": Job("a", ("true",)), "b": Job("b", "x", deps=("a",))})
    assert validate_plan(good) is good
    with pytest.raises(PlanError, match=r"^jobs\.b\.deps\[0\]: unknown job 'c'$"):
        validate_plan(Plan("p", {"b": Job("b", "x", deps=("c",))}))
    with pytest.raises(PlanError, match=r'^jobs\.a: holds a job named "b"$'):
        validate_plan(Plan("p", {"a": Job("b", "x")}))
    with pytest.raises(PlanError, match=r"^jobs\.a\.requires\.cores: must be an integer >= 1"):
        validate_plan(Plan("p", {"a": Job("a", "x", requires=Requires(cores=0))}))
    with pytest.raises(PlanError, match=r"^jobs\.a\.outputs\[0\]: must be a relative path"):
        validate_plan(Plan("p", {"a": Job("a", "x", outputs=("/abs",))}))
    with pytest.raises(PlanError, match=r"^jobs: the plan has no jobs"):
        validate_plan(Plan("p", {}))
