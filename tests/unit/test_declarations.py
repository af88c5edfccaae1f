from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from agent import declarations as d
from agent.errors import ConfigError
from agent.model import Limits, Network

from ..seed import seed_file

DATA = Path(__file__).parent.parent / "data"
SECRETS = Path("/srv/ci-secrets")


def parse(tmp_path: Path, text: str, name: str = "t.yml") -> d.FileDeclarations:
    path = tmp_path / name
    path.write_text(text)
    return d.parse_file(path, default_owner="local", secrets_base=SECRETS)


def test_our_copy_of_the_experiment_config_is_unchanged() -> None:
    seed = seed_file("experiments/01-rsync-publish/config.yml")
    assert (DATA / "experiment-01/rsync-publish.yml").read_bytes() == seed.read_bytes()


EXPERIMENT_API = "https://gitea.efforting.tech/api/v1"


def test_the_experiment_config_loads_as_a_task() -> None:
    decl = d.parse_file(DATA / "experiment-01/rsync-publish.yml", default_owner="local",
                        secrets_base=SECRETS, gitea_api=EXPERIMENT_API)
    task = decl.tasks["rsync-publish"]
    assert task.owner == "mikael-lovqvist" and task.image == "ci-rsync"
    assert task.deploy_targets == ("/srv/sites.efforting.tech",)
    (repo,) = task.repositories
    assert repo.mount_name == "websperiments" and repo.mutable
    assert repo.key == "websperiments-deploy"
    assert repo.entry == {"repo_url": "git@git.efforting.tech:mikael-lovqvist/websperiments.git",
                          "revision": "main", "mutable": True, "key": "websperiments-deploy",
                          "submodules": False}
    assert decl.warnings == []


def test_the_experiments_gitea_api_base_is_agent_yml_s_gitea_api() -> None:
    """It maps onto gitea.api: unset there, a warning says what to set;
    another API is refused at its line, since the token goes only to gitea.api."""
    path = DATA / "experiment-01/rsync-publish.yml"
    (warning,) = d.parse_file(path, default_owner="local", secrets_base=SECRETS).warnings
    assert warning.startswith(f"{path}:7: gitea_api_base {EXPERIMENT_API} is not used")
    assert f"set gitea.api: {EXPERIMENT_API} in agent.yml" in warning
    with pytest.raises(ConfigError) as e:
        d.parse_file(path, default_owner="local", secrets_base=SECRETS,
                     gitea_api="https://elsewhere.example/api/v1")
    assert e.value.line == 7 and "not this agent's Gitea API" in e.value.message


def test_general_form(tmp_path: Path) -> None:
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker/Dockerfile").write_text("FROM scratch\n")
    decl = parse(tmp_path, """
owner: alice
images:
  builder: {dockerfile: docker/Dockerfile, context: docker}
tasks:
  build:
    image: builder
    command: make -j2
    env: {CARGO_TERM_COLOR: always}
    network: none
    time_limit: 15m
    caches: [{name: cargo, path: /root/.cargo, quota: 2GiB, shared: true}]
    stages:
      - {name: a, command: ["true"]}
      - {name: b, image: efci/base:bookworm}
""")
    task = decl.tasks["build"]
    assert task.owner == "alice" and task.command == ("/bin/sh", "-c", "make -j2")
    assert task.network is Network.NONE and task.time_limit == 900
    assert task.caches[0].quota == 2 << 30 and [s.name for s in task.stages] == ["a", "b"]
    assert decl.images["builder"].dockerfile == tmp_path / "docker/Dockerfile"


@pytest.mark.parametrize(("body", "field", "words"), [
    ("tasks:\n  a/b: {image: x}\n", "tasks.a/b", "task name"),
    ("tasks:\n  ..: {image: x}\n", "tasks...", "task name"),
    ("tasks:\n  'a b': {image: x}\n", "tasks.a b", "task name"),
    ("tasks:\n  'a;rm -rf': {image: x}\n", "tasks.a;rm -rf", "task name"),
    ("tasks:\n  '$(id)': {image: x}\n", "tasks.$(id)", "task name"),
    ("tasks:\n  t: {image: x, network: host}\n", "tasks.t.network", "host networking"),
    ("tasks:\n  t: {image: '-v /:/host'}\n", "tasks.t.image", "docker image reference"),
    ("tasks:\n  t: {image: x, command: []}\n", "tasks.t.command", "empty"),
    ("tasks:\n  t: {image: x, env: {'A=B': c}}\n", "tasks.t.env.A=B", "environment variable"),
    ("tasks:\n  t: {image: x, privileged: true}\n", "tasks.t.privileged", "unknown key"),
    ("tasks:\n  t: {image: x, time_limit: soon}\n", "tasks.t.time_limit", "duration"),
    ("tasks:\n  t: {image: x, secrets: [../../etc]}\n", "tasks.t.secrets[0]", "not a name"),
    ("tasks:\n  t:\n    image: x\n    checkout:\n      repositories:\n        - {repo_url: "
     "'git@h:r.git', revision: '--upload-pack=touch /tmp/pwned', mutable: true, key: k}\n",
     "tasks.t.checkout.repositories[0].revision", "begins with '-'"),
    ("tasks:\n  t:\n    image: x\n    checkout:\n      repositories:\n        - {repo_url: "
     "'git@h:r.git', revision: main, key: k}\n",
     "tasks.t.checkout.repositories[0].revision", "mutable: true"),
    ("tasks:\n  t:\n    image: x\n    checkout:\n      repositories:\n        - {repo_url: "
     "'ext::sh -c touch% /tmp/pwned', revision: main, mutable: true, key: k}\n",
     "tasks.t.checkout.repositories[0].repo_url", "ext::"),
    ("tasks:\n  t:\n    image: x\n    checkout:\n      repositories:\n        - {repo_url: "
     "'git@h:r.git', revision: main, mutable: yes, key: k}\n",
     "tasks.t.checkout.repositories[0].mutable", "true or false"),
    ("tasks:\n  t:\n    image: x\n    checkout:\n      repositories:\n        - {repo_url: "
     "'git@h:r.git', revision: main, mutable: true, key: k, name: ../etc}\n",
     "tasks.t.checkout.repositories[0].name", "not a name"),
    ("images:\n  i: {dockerfile: ../../etc/shadow}\n", "images.i.dockerfile", "inside"),
    ("images:\n  i: {dockerfile: nowhere/Dockerfile}\n", "images.i.dockerfile", "not a file"),
    ("images:\n  i: {inline: 'FROM x', context: nowhere}\n", "images.i.context",
     "not a directory"),
    *((f"tasks:\n  t:\n    image: x\n    checkout:\n      repositories:\n        - {{repo_url: "
       f"'{url}', revision: main, mutable: true, key: k}}\n",
       "tasks.t.checkout.repositories[0].repo_url", "not an ssh repository URL")
      for url in ("-oProxyCommand=x:r.git", "ssh://-oProxyCommand=x/r.git",
                  "ssh://git@h:99999/r.git", "ssh://git@h:0/r.git", "ssh://git@h:port/r.git",
                  "-oProxyCommand=x@h:r.git", "ssh://-o@h/r.git", "https://h/r.git")),
    ("images:\n  i: {context: .}\n", "images.i", "exactly one"),
    ("task: {image: x}\ntasks: {}\n", "task", "one task"),
    ("owner: a\nuser: b\n", "user", "not both"),
    *((f"tasks:\n  t:\n    image: x\n    caches: [{{name: {name!r}, path: /c}}]\n",
       "tasks.t.caches[0].name", "not a name") for name in ("a/b", "..", "a\x00b", "-rf")),
    *((f"tasks:\n  t:\n    image: x\n    caches: [{{name: c, path: {path}}}]\n",
       "tasks.t.caches[0].path", "would shadow")
      for path in ("/src", "/src/x", "/deploy", "/run/secrets", "/run/efci/p", "/run")),
    *((f"tasks:\n  t:\n    image: x\n    caches: [{{name: c, path: /c, quota: {q}}}]\n",
       "tasks.t.caches[0].quota", "size") for q in ("0", "-1GiB", "lots", "1.5GiB")),
    ("tasks:\n  t:\n    image: x\n    caches: [{name: c, path: /c, promote: on-success}]\n",
     "tasks.t.caches[0].promote", "layered"),
    ("tasks:\n  t:\n    image: x\n    caches: [{name: c, path: /c}, {name: c, path: /d}]\n",
     "tasks.t.caches[1].name", "already used"),
    ("tasks:\n  t:\n    image: x\n    caches: [{name: c, path: /c}, {name: d, path: /c}]\n",
     "tasks.t.caches[1].path", "already mounted"),
    *((f"tasks:\n  t:\n    image: x\n    stages: [{{name: {name!r}}}]\n",
       "tasks.t.stages[0].name", "not a name") for name in ("a/b", "..", "-x", "a b")),
    ("tasks:\n  t:\n    image: x\n    stages: [{name: a}, {name: a}]\n",
     "tasks.t.stages[1].name", "declared twice"),
    ("tasks:\n  t:\n    image: x\n    stages: [{name: a, allow_failure: yes}]\n",
     "tasks.t.stages[0].allow_failure", "true or false"),
])
def test_bad_declarations(tmp_path: Path, body: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(tmp_path, body)
    assert e.value.file == str(tmp_path / "t.yml") and e.value.line > 0
    assert e.value.field == field and words in e.value.message, e.value.message


def test_single_task_file_name_must_be_a_task_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file name"):
        parse(tmp_path, "task: {image: x}\n", name="bad name.yml")


def test_foreign_secrets_base_is_a_warning(tmp_path: Path) -> None:
    decl = parse(tmp_path, "secrets_base: /elsewhere\ntask: {image: x}\n", name="one.yml")
    assert "one" in decl.tasks and "ignored" in decl.warnings[0]


def _parsed(tmp_path: Path) -> dict[str, d.FileDeclarations | ConfigError]:
    return d.parse_all(tmp_path, default_owner="local", secrets_base=SECRETS)


def test_assemble_keeps_last_good_version_of_a_broken_file(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text("tasks:\n  one: {image: efci/base:bookworm}\n")
    (tmp_path / "b.yml").write_text("tasks:\n  two: {image: efci/base:bookworm}\n")
    first = d.assemble(_parsed(tmp_path), existing_images={"efci/base:bookworm"}, previous=None)
    assert set(first.tasks) == {"one", "two"} and not first.errors

    (tmp_path / "a.yml").write_text("tasks:\n  one: {image: [broken\n")
    (tmp_path / "b.yml").write_text("tasks:\n  two: {image: efci/base:bookworm}\n"
                                    "  three: {image: efci/base:bookworm}\n")
    second = d.assemble(_parsed(tmp_path), existing_images={"efci/base:bookworm"},
                        previous=first)
    assert set(second.tasks) == {"one", "two", "three"}  # a.yml: last good; b.yml: new
    assert "YAML syntax" in second.errors[str(tmp_path / "a.yml")]


def test_assemble_refuses_missing_images_and_duplicate_tasks(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text("tasks:\n  one: {image: nowhere:1}\n")
    (tmp_path / "b.yml").write_text("tasks:\n  two: {image: efci/base:bookworm}\n")
    (tmp_path / "c.yml").write_text("tasks:\n  two: {image: efci/base:bookworm}\n")
    parsed = _parsed(tmp_path)
    assert d.image_refs(parsed, None) == {"nowhere:1", "efci/base:bookworm"}
    result = d.assemble(parsed, existing_images={"efci/base:bookworm"}, previous=None)
    assert set(result.tasks) == {"two"}
    assert "neither declared" in result.errors[str(tmp_path / "a.yml")]
    assert "already declared" in result.errors[str(tmp_path / "c.yml")]


def test_a_declared_image_satisfies_a_task(tmp_path: Path) -> None:
    shutil.copy(DATA / "experiment-01/rsync-publish.yml", tmp_path)
    (tmp_path / "images.yml").write_text("images:\n  ci-rsync: {inline: 'FROM x'}\n")
    result = d.assemble(_parsed(tmp_path), existing_images=set(), previous=None)
    assert set(result.tasks) == {"rsync-publish"} and not result.errors


def test_a_control_character_is_refused_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse(tmp_path, "tasks:\n  t:\n    image: x\n    env: {A: \"a\x01b\"}\n")
    assert e.value.line == 4 and "U+0001" in e.value.message


def test_an_escape_sequence_in_a_key_is_not_echoed_raw(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        parse(tmp_path, 'tasks:\n  t:\n    image: x\n    "\\e]0;PWNED\\a": 1\n')
    assert "\x1b" not in e.value.message and "\x07" not in e.value.message
    assert "\\x1b]0;PWNED\\x07" in e.value.message


def test_what_is_not_a_declaration_file_is_refused_or_warned_about(tmp_path: Path) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("root:*:20228:0:99999:7:::\n")
    (conf / "shadow.yml").symlink_to(secret)
    (conf / "dangling.yml").symlink_to(tmp_path / "nowhere.yml")
    (conf / "dir.yml").mkdir()
    os.mkfifo(conf / "fifo.yml")  # opening it would block the agent forever
    (conf / "ok.yml").write_text("tasks: {}\n")
    (conf / "inside.yml").symlink_to(conf / "ok.yml")
    parsed = _parsed(conf)
    shadow, fifo = parsed[str(conf / "shadow.yml")], parsed[str(conf / "fifo.yml")]
    assert isinstance(shadow, ConfigError) and "outside" in shadow.message
    assert "20228" not in shadow.message
    assert isinstance(fifo, ConfigError) and "not a regular file" in fifo.message
    result = d.assemble(parsed, existing_images=set(), previous=None)
    assert any("dangling.yml" in w and "does not exist" in w for w in result.warnings)
    assert any("dir.yml" in w and "a directory" in w for w in result.warnings)
    assert not isinstance(parsed[str(conf / "inside.yml")], ConfigError)


def test_an_image_path_through_a_symlink_out_of_the_directory_is_refused(
        tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "Dockerfile").write_text("FROM scratch\n")
    conf = tmp_path / "conf.d"
    conf.mkdir()
    (conf / "esc").symlink_to(outside)
    for body, field in (("{dockerfile: esc/Dockerfile}", "images.i.dockerfile"),
                        ("{inline: 'FROM x', context: esc}", "images.i.context")):
        with pytest.raises(ConfigError) as e:
            parse(conf, f"images:\n  i: {body}\n")
        assert e.value.field == field and "symlinks resolved" in e.value.message


@pytest.mark.parametrize(("a", "b", "words"), [
    ("{name: c, path: /c}", "{name: c, path: /c}", "makes it private"),
    ("{name: c, path: /c, shared: true}", "{name: c, path: /c}", "makes it private"),
    ("{name: c, path: /c, shared: true, quota: 1GiB}",
     "{name: c, path: /d, shared: true, quota: 2GiB}", "quota"),
    ("{name: c, path: /c, shared: true}", "{name: c, path: /c, shared: true, layered: true}",
     "layered"),
])
def test_one_cache_declared_differently_is_refused_naming_both_files(
        tmp_path: Path, a: str, b: str, words: str) -> None:
    (tmp_path / "a.yml").write_text(f"tasks:\n  one:\n    image: x\n    caches: [{a}]\n")
    (tmp_path / "b.yml").write_text(f"tasks:\n  two:\n    image: x\n    caches: [{b}]\n")
    result = d.assemble(_parsed(tmp_path), existing_images={"x"}, previous=None)
    assert set(result.tasks) == {"one"}
    error = result.errors[str(tmp_path / "b.yml")]
    assert words in error and "a.yml:4" in error and "b.yml:4" in error


def test_a_shared_cache_declared_alike_by_two_tasks(tmp_path: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / f"{name}.yml").write_text(
            f"tasks:\n  {name}:\n    image: x\n    caches: [{{name: c, path: /c, shared: true, "
            "layered: true, promote: on-success}]\n")
    result = d.assemble(_parsed(tmp_path), existing_images={"x"}, previous=None)
    assert not result.errors
    use = result.tasks["two"].caches[0]
    assert use.layered and use.promote_on_success and use.source.endswith("two.yml:4")


def test_a_stage_inherits_what_it_does_not_set(tmp_path: Path) -> None:
    decl = parse(tmp_path, """
tasks:
  site:
    image: builder
    command: make
    env: {A: task, B: task}
    secrets: [npmrc]
    time_limit: 10m
    caches: [{name: npm, path: /root/.npm}]
    stages:
      - {name: build, env: {B: stage}}
      - name: publish
        image: publisher
        command: [rsync, -a, out/, /deploy/]
        secrets: []
        caches: []
        time_limit: 1m
        allow_failure: true
""")
    task = decl.tasks["site"]
    build, publish = (task.stage_task(s) for s in task.stages)
    assert (build.image, build.command, build.env) == ("builder", ("/bin/sh", "-c", "make"),
                                                       {"A": "task", "B": "stage"})
    assert (build.secrets, build.time_limit, [c.name for c in build.caches]) == \
        (("npmrc",), 600, ["npm"])
    assert (publish.image, publish.command[0], publish.secrets, publish.caches) == \
        ("publisher", "rsync", (), ())
    assert publish.time_limit == 60 and task.stages[1].allow_failure
    assert build.stages == () and build.repositories == task.repositories


def test_too_many_stages_are_refused(tmp_path: Path) -> None:
    stages = ", ".join(f"{{name: s{i}}}" for i in range(33))
    with pytest.raises(ConfigError, match="33 stages are more than 32"):
        parse(tmp_path, f"tasks:\n  t:\n    image: x\n    stages: [{stages}]\n")


def test_limits_within_agent_yml_s_maxima(tmp_path: Path) -> None:
    most = Limits(cpus=2.0, memory=8 << 30, swap=1 << 30, pids=1000, disk=4 << 30)
    path = tmp_path / "t.yml"
    path.write_text("tasks:\n  t:\n    image: x:1\n    limits: {cpus: 0.5, memory: 512MiB,"
                    " swap: 0, pids: 200, disk: 2GiB}\n")
    task = d.parse_file(path, default_owner="o", secrets_base=SECRETS, most=most).tasks["t"]
    assert task.limits == Limits(cpus=0.5, memory=512 << 20, swap=0, pids=200, disk=2 << 30)
    for limits, line_words in [
            ("{memory: 16GiB}", "16GiB is more than this agent allows: at most 8GiB "
                                "(limits.max_memory in agent.yml)"),
            ("{cpus: 3}", "3 is more than this agent allows: at most 2 (limits.max_cpus"),
            ("{pids: 5000}", "at most 1000 (limits.max_pids"),
            ("{swap: 2GiB}", "at most 1GiB (limits.max_swap"),
            ("{memory: 1MiB}", "at least 6MiB"),
            ("{cpus: -1}", "a number of CPUs"),
            ("{cpus: '2; rm -rf /'}", "a number of CPUs"),
            ("{pids: 10}", "at least 64"),
            ("{disk: 8GiB}", "at most 4GiB (limits.max_disk"),
            ("{disk: 512KiB}", "at least 1MiB"),
            ("{disks: 1GiB}", "disks"),
            ("[1]", "limits")]:
        path.write_text(f"tasks:\n  t:\n    image: x:1\n    limits: {limits}\n")
        with pytest.raises(ConfigError) as e:
            d.parse_file(path, default_owner="o", secrets_base=SECRETS, most=most)
        assert line_words in str(e.value) and ":4" in str(e.value), (limits, str(e.value))
