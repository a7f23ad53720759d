"""The container image: Dockerfile, .dockerignore, `make image`, scripts/install.sh, and what the
k8s manifests and the `ray up` configs expect of the image. Checked without Docker (no image is
built here):

- `make image` tags the image that every k8s manifest (every ``image`` field and every kustomize
  ``images:`` entry, overlays included) and every ``ray up`` config in cluster/ names, with the
  version of pyproject.toml;
- every path those run inside the container (``workingDir``, ``python /app/jobs/...``, config
  files under /app) is one the Dockerfile puts there, following its WORKDIR and COPY
  instructions over the repository files that .dockerignore leaves in the build context; no
  volume is mounted over the app;
- the Dockerfile installs with scripts/install.sh, the script the Makefile's setup runs; the
  script's --cpu commands are the Makefile's former recipe unchanged, its --cuda commands install
  the CUDA build of the same torch and the project, not editable, without test extras;
- the final stage runs as uid 1000 (the pods' runAsUser) and installs no compiler;
- the Pushgateway step of the setup: apt-get as root or through sudo, a message and exit 0 where
  that is impossible; `.ci/run` runs README's test command and nothing else;
- for each check, a broken copy is reported.
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CLUSTER = ROOT / "cluster"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCRIPT = ROOT / "scripts" / "install.sh"
STAMP = ".venv/.installed"

#: where the project lives in the image (the manifests' workingDir and `python /app/...`)
APP = "/app"
#: users of the base image rayproject/ray (Ray's docker/base-deps/Dockerfile:
#: `useradd ... ray --uid 1000 --gid 100`, then `USER 1000`)
BASE_IMAGE_USERS = {"root": 0, "ray": 1000}
#: the commands of the Makefile's setup recipe before scripts/install.sh existed: `make setup`
#: must run exactly these (PY=python3, VENV=.venv)
FORMER_SETUP_RECIPE = [
    "python3 -m venv .venv",
    ".venv/bin/pip install --upgrade --quiet pip",
    ".venv/bin/pip install --quiet torch==2.13.0",
    ".venv/bin/pip install --quiet -e '.[test]'",
]
#: packages that bring a compiler or build tools
COMPILER_PACKAGE = re.compile(
    r"^(build-essential|gcc|g\+\+|cpp|cc|c\+\+|clang|llvm|gfortran|make|cmake|ninja-build|binutils|"
    r"autoconf|automake|libtool|libc6?-dev|linux-libc-dev|cuda-nvcc|cuda-toolkit|cuda-compiler|"
    r"nvidia-cuda-toolkit|devtoolset|gcc-toolset|musl-dev)([-.=:~0-9].*)?$")

_MAKE_ENV_DROP = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "IMAGE", "PY", "VENV", "PUSHGATEWAY")


# =============================================================================================
# The Makefile, the script
# =============================================================================================


def make_dry_run(*args: str) -> list[str]:
    """What `make -n ARGS` would run, in the repository root, without the caller's make settings."""
    env = {k: v for k, v in os.environ.items() if k not in _MAKE_ENV_DROP}
    result = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.strip()]


def make_image_name() -> str:
    """The tag of `make image` (`docker build -t IMAGE .` in the repository root)."""
    lines = make_dry_run("image")
    builds = [shlex.split(line) for line in lines if line.startswith("docker build")]
    assert len(builds) == 1, lines
    words = builds[0]
    assert words[-1] == ".", f"`make image` must build the repository root as the context: {words}"
    assert "-f" not in words and "--file" not in words, "the Dockerfile at the root is the one tested here"
    tags = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-t", "--tag")]
    assert len(tags) == 1, words
    return tags[0]


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def project_dependencies() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def run_script(*args: str, env: dict[str, str] | None = None, path: str | None = None,
               cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    if path is not None:
        full_env["PATH"] = path
    return subprocess.run(["/bin/bash", str(SCRIPT), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=60)


def script_dry_run(args: list[str], env: dict[str, str] | None = None) -> list[str]:
    result = run_script("--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# =============================================================================================
# Dockerfile
# =============================================================================================


@dataclass
class Instruction:
    cmd: str
    flags: list[tuple[str, str]]
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


def logical_lines(text: str) -> list[str]:
    """Instructions one per line: continuation lines joined, comments and blank lines dropped."""
    lines, buf = [], None
    for raw in text.splitlines():
        s = raw.strip()
        if s.startswith("#") or (buf is None and not s):
            continue
        part = raw.rstrip()
        if part.endswith("\\"):
            buf = (buf or "") + part[:-1]
            continue
        lines.append(((buf or "") + part).strip())
        buf = None
    if buf:
        lines.append(buf.strip())
    return lines


def substitute(value: str, variables: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2)
        got = variables.get(name, "")
        return got if got else (default or "")

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", repl, value)


def parse_dockerfile(text: str) -> tuple[list[Stage], dict[str, str]]:
    """The stages, and the global ARG defaults (those before the first FROM)."""
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for line in logical_lines(text):
        cmd, _, rest = line.partition(" ")
        cmd = cmd.upper()
        rest = rest.strip()
        flags = []
        while rest.startswith("--"):
            word, _, rest = rest.partition(" ")
            name, _, value = word[2:].partition("=")
            flags.append((name, value))
            rest = rest.strip()
        if cmd == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(substitute(words[0], global_args), name))
        elif not stages:
            if cmd == "ARG":
                key, _, default = rest.partition("=")
                global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(Instruction(cmd, flags, rest))
    return stages, global_args


def stage_chain(stages: list[Stage], index: int = -1) -> list[Stage]:
    """The stage and the earlier stages it is built FROM, oldest first."""
    chain = [stages[index]]
    names = {s.name: i for i, s in enumerate(stages) if s.name}
    while chain[0].base in names:
        chain.insert(0, stages[names[chain[0].base]])
    return chain


def stage_args(stage: Stage, global_args: dict[str, str]) -> dict[str, str]:
    """ARG defaults in scope in ``stage`` (as a RUN sees them in its environment)."""
    out = {}
    for ins in stage.instructions:
        if ins.cmd == "ARG":
            key, _, default = ins.args.partition("=")
            key = key.strip()
            out[key] = default.strip().strip('"') if default else global_args.get(key, "")
    return out


# ---- .dockerignore --------------------------------------------------------------------------


def _translate(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1:j]
            if body.startswith(("!", "^")):
                body = "^" + body[1:]
            out += f"[{body}]"
            i = j + 1
            continue
        elif c == "\\" and i + 1 < len(pattern):
            out += re.escape(pattern[i + 1])
            i += 2
            continue
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out)


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    """(exception, pattern) per line of a .dockerignore, in order."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        if pattern in ("", "."):
            continue
        rules.append((exception, _translate(pattern)))
    return rules


def is_ignored(rel: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: a pattern excludes a path it matches or whose parent folder it matches;
    the last matching line wins, `!` lines re-include."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for exception, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not exception
    return ignored


def context_files(rules: list[tuple[bool, re.Pattern]]) -> list[str]:
    """Files of the build context (the repository root less .dockerignore), relative paths."""
    prune = not any(exception for exception, _ in rules)
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        if prune:
            dirnames[:] = [d for d in dirnames if not is_ignored(posixpath.join(rel_dir, d), rules)]
        for name in filenames:
            rel = posixpath.join(rel_dir, name)
            if not is_ignored(rel, rules):
                out.append(rel)
    return sorted(out)


# ---- what the image holds -------------------------------------------------------------------


@dataclass
class Layout:
    files: dict[str, str] = field(default_factory=dict)  # image path -> context path
    dirs: set[str] = field(default_factory=lambda: {"/"})
    opaque: set[str] = field(default_factory=set)  # copied from another image/stage: contents unknown

    def add_dir(self, path: str) -> None:
        while path not in self.dirs:
            self.dirs.add(path)
            path = posixpath.dirname(path)

    def add_file(self, path: str, source: str) -> None:
        self.files[path] = source
        self.add_dir(posixpath.dirname(path))

    def has(self, path: str) -> bool:
        path = posixpath.normpath(path)
        return (path in self.files or path in self.dirs
                or any(path == o or path.startswith(o + "/") for o in self.opaque))


def copy_sources(args: str) -> list[str]:
    args = args.strip()
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def image_layout(dockerfile: str, dockerignore: str) -> Layout:
    """Paths the Dockerfile's final stage creates with WORKDIR and COPY/ADD from the context."""
    stages, global_args = parse_dockerfile(dockerfile)
    assert stages, "the Dockerfile has no FROM"
    files = context_files(ignore_rules(dockerignore))
    layout = Layout()
    workdir = "/"
    for stage in stage_chain(stages):
        variables = {**global_args, **stage_args(stage, global_args)}
        for ins in stage.instructions:
            if ins.cmd == "WORKDIR":
                workdir = posixpath.normpath(posixpath.join(workdir, substitute(ins.args, variables)))
                layout.add_dir(workdir)
            elif ins.cmd in ("COPY", "ADD"):
                words = [substitute(w, variables) for w in copy_sources(ins.args)]
                sources, dest = words[:-1], words[-1]
                dest_path = posixpath.normpath(posixpath.join(workdir, dest))
                if any(name == "from" for name, _ in ins.flags):
                    layout.opaque.add(dest_path)
                    layout.add_dir(posixpath.dirname(dest_path))
                    continue
                into_dir = dest.endswith("/") or len(sources) > 1 or dest_path in layout.dirs
                for src in sources:
                    src = posixpath.normpath(src).lstrip("/")
                    src = "" if src == "." else src
                    matched = False
                    for rel in files:
                        if src == "" or rel.startswith(src + "/"):  # a folder: its contents
                            inner = rel if src == "" else rel[len(src) + 1:]
                            layout.add_file(posixpath.join(dest_path, inner), rel)
                            layout.add_dir(dest_path)
                            matched = True
                        elif rel == src or (any(c in src for c in "*?[") and _translate(src).fullmatch(rel)):
                            target = posixpath.join(dest_path, posixpath.basename(rel)) if into_dir else dest_path
                            layout.add_file(target, rel)
                            matched = True
                    assert matched, f"COPY {src!r}: nothing in the build context (missing or in .dockerignore)"
    return layout


# =============================================================================================
# The manifests and the ray up configs
# =============================================================================================


def k8s_documents() -> list[tuple[str, Any]]:
    out = []
    for path in sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.relative_to(ROOT)}#{i}", doc))
    return out


def cluster_configs() -> list[tuple[str, Any]]:
    return [(str(p.relative_to(ROOT)), yaml.safe_load(p.read_text()))
            for p in sorted(CLUSTER.glob("*.y*ml"))]


def walk(node: Any, where: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) for every mapping entry and list item, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{where}.{k}" if where else str(k)
            yield here, str(k), v
            yield from walk(v, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            here = f"{where}[{i}]"
            yield here, "", v
            yield from walk(v, here)


def kustomize_image(entry: dict) -> str:
    name = entry.get("newName") or entry.get("name", "")
    if entry.get("digest"):
        return f"{name}@{entry['digest']}"
    return f"{name}:{entry['newTag']}" if entry.get("newTag") else name


def k8s_image_errors(docs: list[tuple[str, Any]], image: str) -> list[str]:
    errors, containers = [], 0
    for label, doc in docs:
        for where, key, value in walk(doc):
            if key in ("containers", "initContainers", "ephemeralContainers") and isinstance(value, list):
                for i, c in enumerate(value):
                    containers += 1
                    if not (isinstance(c, dict) and c.get("image")):
                        errors.append(f"{label} {where}[{i}]: no image")
            elif key == "image" and isinstance(value, str) and value != image:
                errors.append(f"{label} {where}: {value!r}, not the image `make image` builds ({image})")
        if isinstance(doc, dict) and doc.get("kind") == "Kustomization":
            for entry in doc.get("images") or []:
                got = kustomize_image(entry)
                if got != image:
                    errors.append(f"{label} images: sets {entry.get('name')!r} to {got!r}, not {image}")
    if not containers:
        errors.append("no container found in k8s/")
    return errors


def cluster_image_errors(configs: list[tuple[str, Any]], image: str) -> list[str]:
    errors = []
    for label, config in configs:
        docker = config.get("docker") or {}
        if not docker.get("image"):
            errors.append(f"{label}: docker.image is not set (the nodes would run without the project's image)")
        found = [(f"docker.{k}", v) for k, v in docker.items() if k.endswith("image")]
        for name, t in (config.get("available_node_types") or {}).items():
            found += [(f"available_node_types.{name}.docker.{k}", v)
                      for k, v in (t.get("docker") or {}).items() if k.endswith("image")]
        for where, value in found:
            if value != image:
                errors.append(f"{label} {where}: {value!r}, not the image `make image` builds ({image})")
    return errors


APP_PATH = re.compile(rf"(?<![\w/.~$-]){re.escape(APP)}(?:/[^\s'\"`;,|&()<>]*)?")


def container_path_errors(docs: list[tuple[str, Any]], layout: Layout) -> list[str]:
    """Paths run inside the image that it lacks; volumes mounted over the app."""
    errors = []
    for label, doc in docs:
        mount_keys = ("mountPath",)
        file_mounts = (doc.get("file_mounts") or {}) if isinstance(doc, dict) else {}
        mounts = [(f"file_mounts[{k!r}]", k) for k in file_mounts]
        for where, key, value in walk(doc):
            if key in mount_keys and isinstance(value, str):
                mounts.append((where, value))
            elif key == "workingDir" and isinstance(value, str) and value not in layout.dirs:
                errors.append(f"{label} {where}: working directory {value} is not a folder of the image")
            elif isinstance(value, str) and key not in mount_keys and where.split(".")[0] != "file_mounts":
                for m in APP_PATH.finditer(value):
                    path = m.group(0).rstrip(".:")
                    if not layout.has(path):
                        errors.append(f"{label} {where}: {path} is not in the image (Dockerfile COPY, .dockerignore)")
        for where, path in mounts:
            path = posixpath.normpath(path)
            if path == APP or APP.startswith(path.rstrip("/") + "/"):
                errors.append(f"{label} {where}: a mount at {path} hides the image's {APP}")
            elif path.startswith(APP + "/") and layout.has(path):
                errors.append(f"{label} {where}: a mount at {path} hides the image's files there")
    return errors


def pod_uids(docs: list[tuple[str, Any]]) -> set[int]:
    return {v for _, doc in docs for _, k, v in walk(doc) if k == "runAsUser" and isinstance(v, int)}


# =============================================================================================
# Checks on the Dockerfile
# =============================================================================================


def shell_segments(command: str) -> list[list[str]]:
    """Simple commands of a RUN line (split on && || ; | and newlines), as words."""
    out = []
    for part in re.split(r"&&|\|\||;|\||\n", command):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        while words and re.fullmatch(r"\w+=.*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if words:
            out.append(words)
    return out


def final_stage_runs(dockerfile: str) -> list[tuple[str, str, dict[str, str]]]:
    """(workdir, command, build args) of every RUN of the final stage and the stages it is built on."""
    stages, global_args = parse_dockerfile(dockerfile)
    out, workdir = [], "/"
    for stage in stage_chain(stages):
        variables = {**global_args, **stage_args(stage, global_args)}
        for ins in stage.instructions:
            if ins.cmd == "WORKDIR":
                workdir = posixpath.normpath(posixpath.join(workdir, substitute(ins.args, variables)))
            elif ins.cmd == "RUN":
                out.append((workdir, ins.args, variables))
    return out


def installed_packages(words: list[str]) -> list[str]:
    """Packages a package-manager command installs ([] for other commands)."""
    tools = {"apt-get": "install", "apt": "install", "aptitude": "install", "yum": "install",
             "dnf": "install", "microdnf": "install", "apk": "add", "conda": "install",
             "mamba": "install", "micromamba": "install", "zypper": "install"}
    words = [w for w in words if w not in ("sudo", "env") and not re.fullmatch(r"\w+=.*", w)]
    if not words or posixpath.basename(words[0]) not in tools:
        return []
    verb = tools[posixpath.basename(words[0])]
    if verb not in words:
        return []
    return [w for w in words[words.index(verb) + 1:] if not w.startswith("-")]


def compiler_errors(dockerfile: str) -> list[str]:
    errors = []
    for _, command, _ in final_stage_runs(dockerfile):
        for words in shell_segments(command):
            for pkg in installed_packages(words):
                if COMPILER_PACKAGE.match(pkg):
                    errors.append(f"the final stage installs {pkg} ({' '.join(words)})")
    return errors


def user_errors(dockerfile: str, uids: set[int]) -> list[str]:
    stages, _ = parse_dockerfile(dockerfile)
    users = [ins.args.strip() for stage in stage_chain(stages) for ins in stage.instructions if ins.cmd == "USER"]
    if not users:
        return ["the final stage sets no USER (it would run as whatever the base image says)"]
    user = users[-1].split(":")[0]
    uid = int(user) if user.isdigit() else BASE_IMAGE_USERS.get(user)
    errors = []
    if uid is None:
        errors.append(f"USER {users[-1]}: unknown user (the base image has {sorted(BASE_IMAGE_USERS)})")
    elif uid != 1000:
        errors.append(f"USER {users[-1]}: the image must run as uid 1000, not {uid}")
    for other in sorted(uids - {uid}):
        errors.append(f"the pods run as uid {other}, the image as {uid}")
    return errors


@dataclass
class ScriptCall:
    args: list[str]
    env: dict[str, str]
    source: str | None  # the repository file the image path of the script comes from


def script_calls(dockerfile: str, layout: Layout) -> list[ScriptCall]:
    """Invocations of scripts/install.sh in the final stage's RUN lines."""
    calls = []
    for workdir, command, variables in final_stage_runs(dockerfile):
        for words in shell_segments(command):
            for i, w in enumerate(words):
                if w.endswith("install.sh"):
                    image_path = posixpath.normpath(posixpath.join(workdir, w))
                    calls.append(ScriptCall(words[i + 1:], variables, layout.files.get(image_path)))
                    break
    return calls


def install_errors(dockerfile: str, layout: Layout) -> list[str]:
    """The Dockerfile must install through the Makefile's script, for CUDA, the project included."""
    makefile_calls = [shlex.split(line) for line in make_dry_run("-B", STAMP) if "install.sh" in line]
    assert len(makefile_calls) == 1, "the Makefile's setup runs scripts/install.sh once"
    makefile_script = os.path.relpath((ROOT / makefile_calls[0][0]).resolve(), ROOT)
    calls = script_calls(dockerfile, layout)
    errors = []
    if not calls:
        errors.append("the Dockerfile does not run scripts/install.sh")
    for call in calls:
        if call.source != makefile_script:
            errors.append(f"the Dockerfile runs {call.source or 'a script not copied from the repository'}, "
                          f"the Makefile {makefile_script}")
        if "--cuda" not in call.args:
            errors.append(f"install.sh {' '.join(call.args)}: the image needs --cuda")
    if calls and all("--deps-only" in c.args for c in calls):
        errors.append("no install.sh call installs the project itself (all are --deps-only)")
    return errors


# =============================================================================================
# The real files
# =============================================================================================


@pytest.fixture(scope="module")
def image() -> str:
    return make_image_name()


@pytest.fixture(scope="module")
def layout() -> Layout:
    return image_layout(DOCKERFILE.read_text(), DOCKERIGNORE.read_text())


def test_make_image_tags_the_image_with_the_project_version(image):
    name, _, tag = image.rpartition(":")
    assert name == "ghcr.io/posefr/posefr-dist"
    assert tag == project_version()


def test_every_k8s_manifest_uses_the_image_make_image_builds(image):
    assert k8s_image_errors(k8s_documents(), image) == []


def test_every_ray_up_config_uses_the_image_make_image_builds(image):
    configs = cluster_configs()
    assert "cluster/aws-gpu.yaml" in [label for label, _ in configs]
    assert cluster_image_errors(configs, image) == []


def test_paths_the_manifests_and_configs_run_are_in_the_image(layout):
    docs = k8s_documents() + cluster_configs()
    assert container_path_errors(docs, layout) == []
    # what the jobs name is there, from the repository
    for path in ("/app/jobs/train.py", "/app/jobs/configs/paper-gpu.yaml", "/app/jobs/nightly.py",
                 "/app/benchmarks/reproduce.py", "/app/pyproject.toml", "/app/posefr_dist/__init__.py"):
        assert layout.files.get(path) == path[len(APP) + 1:], path
    assert not any(p.startswith((f"{APP}/.venv/", f"{APP}/.git/", f"{APP}/out/", f"{APP}/tests/"))
                   for p in layout.files), "local or test-only files in the image"


def test_base_image_is_rays_gpu_image_of_the_pinned_ray():
    from packaging.specifiers import SpecifierSet

    stages, _ = parse_dockerfile(DOCKERFILE.read_text())
    base = stage_chain(stages)[0].base
    assert base == "rayproject/ray:2.60.0-py311-gpu"
    ray_pin = next(d for d in project_dependencies() if d.startswith("ray["))
    assert "2.60.0" in SpecifierSet(ray_pin.split("]", 1)[1])


def test_dockerfile_installs_with_the_makefiles_script(layout):
    assert os.access(SCRIPT, os.X_OK)
    assert install_errors(DOCKERFILE.read_text(), layout) == []


def test_makefile_setup_runs_the_former_recipe():
    [call] = [shlex.split(line) for line in make_dry_run("-B", STAMP) if "install.sh" in line]
    assert call[1:] == ["--cpu", "python3", ".venv"]
    assert script_dry_run(call[1:]) == FORMER_SETUP_RECIPE
    assert make_dry_run("-B", STAMP)[-1] == f"touch {STAMP}"


def test_image_gets_the_cuda_build_of_the_same_torch_and_no_test_extras(layout):
    cpu_torch = {w for line in FORMER_SETUP_RECIPE for w in line.split() if w.startswith("torch==")}
    calls = script_calls(DOCKERFILE.read_text(), layout)
    outputs = [script_dry_run(c.args, env={k: v for k, v in c.env.items() if k == "TORCH_INDEX_URL"})
               for c in calls]
    lines = [line for out in outputs for line in out]
    torch_lines = [shlex.split(line) for line in lines if "torch==" in line and "--index-url" in line]
    assert torch_lines, lines
    for words in torch_lines:
        assert {w for w in words if w.startswith("torch==")} == cpu_torch
        index = words[words.index("--index-url") + 1]
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu1\d{2}", index), index
    project = [shlex.split(line) for line in lines if line.endswith(" install --quiet .")]
    assert len(project) == 1, "the project, not editable, without extras"
    deps = [shlex.split(line) for line in lines if "install" in line and "deepspeed>=0.16" in line]
    assert deps and set(project_dependencies()) <= set(deps[0])
    assert not any(" -e " in line or "[test]" in line or "apt-get" in line for line in lines), lines


def test_image_runs_as_uid_1000():
    assert user_errors(DOCKERFILE.read_text(), pod_uids(k8s_documents())) == []


def test_final_stage_installs_no_compiler():
    assert compiler_errors(DOCKERFILE.read_text()) == []


def test_ci_runs_readmes_test_command_and_make_test_installs_the_pushgateway():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make test\s", readme, re.M), "README's test command"
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert [c for c in commands if not c.startswith(("set ", "cd ", "export "))] == ["make test"]
    assert "scripts/install.sh --pushgateway" in make_dry_run("test", "PUSHGATEWAY=/nonexistent/pushgateway")
    assert "scripts/install.sh --pushgateway" not in make_dry_run("test", f"PUSHGATEWAY={SCRIPT}")


# ---- the Pushgateway step, with stand-ins for id, sudo and apt-get --------------------------


def fake_bin(tmp_path: Path, uid: int, sudo_ok: bool | None, apt: str | None) -> tuple[str, Path]:
    """A PATH with `id`, optionally `sudo` and `apt-get` stand-ins (apt: "ok" or "fail"); the
    stand-ins log their calls to the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("env", "cat", "touch", "chmod"):
        real = next(Path(d) / tool for d in ("/usr/bin", "/bin") if (Path(d) / tool).exists())
        (bin_dir / tool).symlink_to(real)
    scripts = {"id": f'#!/bin/bash\n[ "$1" = -u ] && echo {uid}\n'}
    if sudo_ok is not None:
        scripts["sudo"] = (f'#!/bin/bash\necho "sudo $*" >>{log}\n'
                           f'if [ "$1" = -n ]; then shift; {"exit 0" if sudo_ok else "exit 1"}; fi\nexec "$@"\n')
    if apt is not None:
        create = 'touch "$POSEFR_PUSHGATEWAY_BIN"; chmod +x "$POSEFR_PUSHGATEWAY_BIN"' if apt == "ok" else "exit 100"
        scripts["apt-get"] = (f'#!/bin/bash\necho "apt-get $* DEBIAN_FRONTEND=${{DEBIAN_FRONTEND:-}}" >>{log}\n'
                              f'if [ "$1" = install ]; then {create}; fi\n')
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return str(bin_dir), log


PUSHGATEWAY_CASES = [
    # id, uid, sudo (None: no sudo), apt-get (None: none), installs, through sudo, warning part
    ("root", 0, None, "ok", True, False, None),
    ("sudo-without-password", 1000, True, "ok", True, True, None),
    ("sudo-asks-for-password", 1000, False, "ok", False, False, "sudo is missing or asks for a password"),
    ("no-sudo", 1000, None, "ok", False, False, "sudo is missing or asks for a password"),
    ("no-apt", 0, None, None, False, False, "no apt-get"),
    ("apt-fails", 0, None, "fail", False, False, "apt-get failed"),
]


@pytest.mark.parametrize("case_id,uid,sudo_ok,apt,installs,via_sudo,warning", PUSHGATEWAY_CASES,
                         ids=[c[0] for c in PUSHGATEWAY_CASES])
def test_pushgateway_step(tmp_path, case_id, uid, sudo_ok, apt, installs, via_sudo, warning):
    path, log = fake_bin(tmp_path, uid, sudo_ok, apt)
    target = tmp_path / "prometheus-pushgateway"
    env = {"POSEFR_PUSHGATEWAY_BIN": str(target), "DEBIAN_FRONTEND": ""}
    result = run_script("--pushgateway", env=env, path=path)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    apt_calls = [c for c in calls if c.startswith("apt-get")]
    if installs:
        assert target.exists() and "WARNING" not in result.stderr
        assert apt_calls[0].startswith("apt-get update")
        assert apt_calls[1] == ("apt-get install -y -q --no-install-recommends prometheus-pushgateway "
                                "DEBIAN_FRONTEND=noninteractive")
        assert any(c.startswith("sudo apt-get install") or c.startswith("sudo env DEBIAN_FRONTEND")
                   for c in calls) == via_sudo
    else:
        assert not target.exists()
        assert warning in result.stderr
        assert "apt-get install -y --no-install-recommends prometheus-pushgateway" in result.stderr
        if apt != "fail":
            assert apt_calls == []
    # present: nothing to do
    target.touch()
    target.chmod(0o755)
    log.unlink(missing_ok=True)
    result = run_script("--pushgateway", env=env, path=path)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "" and not log.exists()


def test_script_refuses_wrong_arguments(tmp_path):
    # --dry-run first, and a scratch folder: a script that ignored a wrong argument would only print
    for args in (["--cpu", "python3"], ["--gpu", "python3", "venv"], ["--cpu", "--deps-only", "python3", "venv"],
                 ["--pushgateway", "python3", "venv"]):
        result = run_script("--dry-run", *args, cwd=tmp_path)
        assert result.returncode == 2 and "usage:" in result.stderr + result.stdout, args


def test_script_works_from_another_directory(tmp_path):
    result = run_script("--dry-run", "--cpu", "python3", "venv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"python3 -m venv {tmp_path}/venv"


# =============================================================================================
# Broken copies are reported
# =============================================================================================


@dataclass
class World:
    dockerfile: str
    dockerignore: str
    k8s: list[tuple[str, Any]]
    cluster: list[tuple[str, Any]]


def real_world() -> World:
    return World(DOCKERFILE.read_text(), DOCKERIGNORE.read_text(), k8s_documents(), cluster_configs())


def doc(world: World, suffix: str) -> Any:
    return next(d for label, d in world.k8s if label.startswith(suffix))


def head_container(world: World) -> dict:
    return doc(world, "k8s/base/raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def add_overlay_images(world: World, tag: str) -> None:
    world.k8s.append(("k8s/overlays/x/kustomization.yaml#0", {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../../base"],
        "images": [{"name": "ghcr.io/posefr/posefr-dist", "newTag": tag}]}))


def append_to_final_stage(world: World, text: str) -> None:
    world.dockerfile = world.dockerfile.rstrip("\n") + "\n" + text + "\n"


def k8s_images(w: World) -> list[str]:
    return k8s_image_errors(w.k8s, make_image_name())


def cluster_images(w: World) -> list[str]:
    return cluster_image_errors(w.cluster, make_image_name())


def paths(w: World) -> list[str]:
    return container_path_errors(w.k8s + w.cluster, image_layout(w.dockerfile, w.dockerignore))


def users(w: World) -> list[str]:
    return user_errors(w.dockerfile, pod_uids(w.k8s))


def compilers(w: World) -> list[str]:
    return compiler_errors(w.dockerfile)


def install(w: World) -> list[str]:
    return install_errors(w.dockerfile, image_layout(w.dockerfile, w.dockerignore))


BROKEN: list[tuple[str, Callable[[World], None], Callable[[World], list[str]], str]] = [
    ("container-on-rays-image", lambda w: head_container(w).update(image="rayproject/ray:2.60.0-py311-gpu"),
     k8s_images, "not the image `make image` builds"),
    ("container-without-image", lambda w: head_container(w).pop("image"), k8s_images, "no image"),
    ("overlay-sets-another-tag", lambda w: add_overlay_images(w, "0.2.0"), k8s_images, "not ghcr.io/posefr"),
    ("ray-up-head-on-rays-image", lambda w: w.cluster[0][1]["docker"].update(head_image="rayproject/ray:2.60.0-py311"),
     cluster_images, "docker.head_image"),
    ("ray-up-worker-type-on-rays-image",
     lambda w: w.cluster[0][1]["available_node_types"]["cpu"].update(docker={"worker_image": "rayproject/ray:2.60.0"}),
     cluster_images, "available_node_types.cpu.docker.worker_image"),
    ("ray-up-without-docker", lambda w: w.cluster[0][1].pop("docker"), cluster_images, "docker.image is not set"),
    ("job-script-missing", lambda w: doc(w, "k8s/jobs/rayjob-train.yaml")["spec"].update(
        entrypoint="python /app/jobs/no_such_job.py"), paths, "/app/jobs/no_such_job.py is not in the image"),
    ("config-missing", lambda w: doc(w, "k8s/jobs/rayjob-tune.yaml")["spec"].update(
        entrypoint="python /app/jobs/tune.py --config /app/jobs/configs/nope.yaml"), paths,
     "/app/jobs/configs/nope.yaml is not in the image"),
    ("jobs-in-dockerignore", lambda w: setattr(w, "dockerignore", w.dockerignore + "jobs\n"), paths,
     "/app/jobs/train.py is not in the image"),
    ("project-copied-elsewhere", lambda w: setattr(w, "dockerfile", w.dockerfile.replace(". /app", ". /srv")),
     paths, "is not in the image"),
    ("working-dir-not-in-image", lambda w: head_container(w).update(workingDir="/srv/posefr"), paths,
     "working directory /srv/posefr"),
    ("volume-over-the-app", lambda w: head_container(w)["volumeMounts"].append({"name": "x", "mountPath": "/app"}),
     paths, "hides the image's /app"),
    ("volume-over-the-configs", lambda w: head_container(w)["volumeMounts"].append(
        {"name": "x", "mountPath": "/app/jobs/configs"}), paths, "hides the image's files"),
    ("runs-as-root", lambda w: append_to_final_stage(w, "USER root"), users, "not 0"),
    ("no-user", lambda w: setattr(w, "dockerfile", re.sub(r"(?m)^USER .*$", "", w.dockerfile)), users,
     "sets no USER"),
    ("pods-as-another-uid", lambda w: head_container(w)["securityContext"].update(runAsUser=2000), users,
     "the pods run as uid 2000"),
    ("build-essential-in-final-stage",
     lambda w: append_to_final_stage(w, "RUN apt-get update && apt-get install -y build-essential"), compilers,
     "installs build-essential"),
    ("gcc-through-sudo",
     lambda w: append_to_final_stage(w, "RUN sudo apt-get install -y --no-install-recommends gcc-12"), compilers,
     "installs gcc-12"),
    ("no-install-script",
     lambda w: setattr(w, "dockerfile", w.dockerfile.replace("    scripts/install.sh", "    pip install")), install,
     "does not run scripts/install.sh"),
    ("install-script-for-the-cpu", lambda w: setattr(w, "dockerfile", w.dockerfile.replace("--cuda", "--cpu")),
     install, "the image needs --cuda"),
    ("project-never-installed", lambda w: setattr(w, "dockerfile", w.dockerfile.replace(
        "scripts/install.sh --cuda /home", "scripts/install.sh --cuda --deps-only /home")), install,
     "no install.sh call installs the project"),
]


@pytest.mark.parametrize("case_id,mutate,check,expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_copy_is_reported(case_id, mutate, check, expected):
    world = real_world()
    assert not any(expected in e for e in check(world))
    world = copy.deepcopy(world)
    mutate(world)
    errors = check(world)
    assert any(expected in e for e in errors), f"{expected!r} not in {errors}"


def test_compilers_in_a_builder_stage_are_allowed():
    dockerfile = ("FROM rayproject/ray:2.60.0-py311-gpu AS build\n"
                  "RUN sudo apt-get update && sudo apt-get install -y build-essential\n"
                  "FROM rayproject/ray:2.60.0-py311-gpu\nUSER 1000\n")
    assert compiler_errors(dockerfile) == []
    # ... but not in a stage the final one is built FROM
    assert compiler_errors(dockerfile.replace("FROM rayproject/ray:2.60.0-py311-gpu\n", "FROM build\n"))


def test_dockerignore_semantics():
    rules = ignore_rules("# c\n.venv\n**/__pycache__\n*.md\n!README.md\ndocs/**/*.png\n")
    assert is_ignored(".venv", rules) and is_ignored(".venv/bin/python", rules)
    assert is_ignored("a/b/__pycache__/x.pyc", rules) and is_ignored("__pycache__/x", rules)
    assert is_ignored("NOTES.md", rules) and not is_ignored("README.md", rules)
    assert not is_ignored("docs/x.md", rules)  # patterns are anchored at the context root
    assert is_ignored("docs/results/a/b.png", rules) and is_ignored("docs/b.png", rules)
    assert not is_ignored("jobs/train.py", rules)
