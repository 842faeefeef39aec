"""ray_cluster.yaml is locked down (issue 13, item 6): properties of the file itself, beyond
Ray's schema (which tests/test_cluster.py checks): token authentication on every node with the
token never in the file, Ray's ports reachable only from the cluster's own security group,
SSH only from a configured range, the dashboard on 127.0.0.1, nothing but code in file_mounts,
the image and every pip install pinned. Nothing here starts Ray or touches AWS."""

from __future__ import annotations

import ipaddress
import re
import shlex

import pytest
import yaml
from conftest import REPO

CONFIG_PATH = REPO / "ray_cluster.yaml"
TEXT = CONFIG_PATH.read_text()
CONFIG = yaml.safe_load(TEXT)
REGION = CONFIG["provider"]["region"]
TOKEN_PARAM = "/qwen-batch/ray-auth-token"
# Ray's fixed ports in this config, plus the default ranges of the others (node manager,
# dashboard agent, metrics, worker ports are picked in these ranges).
RAY_PORTS = [6379, 10001, 8265, 8076, 52365, 52366, 8080, 10002, 19999, 20000, 40000, 65535]
WORLD = {"0.0.0.0/0", "::/0"}


def commands(key: str) -> list[str]:
    return [str(c) for c in CONFIG.get(key) or []]


def all_commands() -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in commands(k)]


def ray_start(key: str) -> str:
    starts = [c for c in commands(key) if re.search(r"\bray start\b", c)]
    assert len(starts) == 1, f"{key}: expected one `ray start`, got {starts}"
    return starts[0]


def env_before_ray_start(cmd: str) -> dict[str, str]:
    """The environment `ray start` runs with: `export A=1 B=2;` and `A=1 ray start` forms."""
    env = {}
    for part in re.split(r"[;&|]+", cmd.split("ray start")[0] + " ray start"):
        words = shlex.split(part.replace("ulimit", "# ulimit"), comments=True) if part.strip() else []
        if words and words[0] == "export":
            words = words[1:]
        for w in words:
            if "=" in w and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w):
                k, v = w.split("=", 1)
                env[k] = v
    return env


# -- token authentication ------------------------------------------------------------------

@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_ray_start_runs_with_token_auth(key):
    env = env_before_ray_start(ray_start(key))
    assert env.get("RAY_AUTH_MODE") == "token", f"{key}: ray start without RAY_AUTH_MODE=token: {env}"
    # the token comes from a file on the node, never from the command line or this file
    assert "RAY_AUTH_TOKEN" not in env, f"{key}: the token itself is passed in the command"
    assert env.get("RAY_AUTH_TOKEN_PATH") == "$HOME/.ray/auth_token"


def test_shells_on_nodes_use_token_auth():
    """`ray attach` then `ray status` / `qwen-batch run --address auto` must speak token auth too."""
    assert any("RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in commands("setup_commands"))


@pytest.mark.parametrize("key", ["head_setup_commands", "worker_setup_commands"])
def test_every_node_fetches_the_token_from_ssm_before_ray_starts(key):
    fetch = [c for c in commands(key) if "get-parameter" in c and "--with-decryption" in c]
    assert fetch, f"{key}: no node-side fetch of the token"
    for c in fetch:
        assert f"--name {TOKEN_PARAM}" in c and f"--region {REGION}" in c
        assert "umask 077" in c, "the token file must be created private (mode 600)"
        assert c.rstrip().endswith("~/.ray/auth_token"), "the token must land in ~/.ray/auth_token"


def test_head_creates_the_token_if_missing_without_it_passing_a_command_line():
    create = [c for c in commands("head_setup_commands") if "put-parameter" in c]
    assert len(create) == 1
    c = create[0]
    assert "--type SecureString" in c and f"--name {TOKEN_PARAM}" in c
    assert "--overwrite" not in c, "setup must never replace the token of a running cluster"
    assert "secrets.token_hex(32)" in c, "256 random bits"
    assert '--value "file://' in c, "the value is read from a private file, not given in argv"
    assert "umask 077" in c
    head_setup = commands("head_setup_commands")
    assert head_setup.index(c) < next(i for i, x in enumerate(head_setup) if "--with-decryption" in x)


def test_no_token_or_secret_literal_in_the_file():
    assert not re.search(r"\b[0-9a-f]{32,}\b", TEXT), "a hex token literal"
    assert not re.search(r"RAY_AUTH_TOKEN\s*=\s*[^\s\"$]", TEXT), "RAY_AUTH_TOKEN assigned a literal"
    assert not re.search(r"(AKIA|ASIA)[0-9A-Z]{16}", TEXT), "an AWS access key id"
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", TEXT), "a Hugging Face token"
    assert not re.search(r"(?i)(aws_secret_access_key|HF_TOKEN)\s*[:=]\s*\S", TEXT.replace("(set HF_TOKEN", ""))


# -- network -------------------------------------------------------------------------------

def effective_inbound_rules() -> list[dict]:
    """The inbound rules Ray puts on the group it creates (its intra-cluster rule, its SSH rule,
    then the file's IpPermissions), minus the rule the head's setup revokes."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    extra = CONFIG["provider"]["security_group"].get("IpPermissions", [])
    rules = _create_default_inbound_rules({"sg-self"}, extra)
    revoke = [c for c in commands("head_setup_commands") if "revoke-security-group-ingress" in c]
    assert revoke, "Ray opens SSH to 0.0.0.0/0 on a group it creates: the head must revoke it"
    assert "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=0.0.0.0/0}]" in revoke[0]
    # ... and refuse to go on if anything world-open is left
    assert "0.0.0.0/0" in revoke[0] and "::/0" in revoke[0] and "exit 1" in revoke[0]
    world_ssh = {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    assert world_ssh in rules, "Ray's default changed: recheck what the head revokes"
    return [r for r in rules if r != world_ssh]


def covers(rule: dict, port: int) -> bool:
    if rule["IpProtocol"] == "-1":
        return True
    return rule.get("FromPort", -1) <= port <= rule.get("ToPort", -1)


def sources(rule: dict) -> set[str]:
    return ({r["CidrIp"] for r in rule.get("IpRanges", [])} | {r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])}
            | {p["PrefixListId"] for p in rule.get("PrefixListIds", [])})


def test_all_nodes_share_the_one_named_group():
    sg = CONFIG["provider"]["security_group"]
    assert sg["GroupName"]
    for name, node_type in CONFIG["available_node_types"].items():
        # a node type with its own SecurityGroupIds would escape these rules
        assert "SecurityGroupIds" not in node_type["node_config"], name
        assert "NetworkInterfaces" not in node_type["node_config"], name


@pytest.mark.parametrize("port", RAY_PORTS)
def test_ray_ports_are_reachable_only_from_the_group_itself(port):
    rules = [r for r in effective_inbound_rules() if covers(r, port)]
    assert rules, f"port {port}: nodes could not reach each other"
    for r in rules:
        assert not sources(r), f"port {port} open to {sources(r)}"
        assert [p["GroupId"] for p in r.get("UserIdGroupPairs", [])] == ["sg-self"], r


def test_ssh_only_from_the_configured_range_and_nothing_from_the_world():
    cidr_rules = [r for r in effective_inbound_rules() if sources(r)]
    assert cidr_rules, "no SSH rule: `ray up` could not reach the head"
    for r in cidr_rules:
        assert (r["IpProtocol"], r["FromPort"], r["ToPort"]) == ("tcp", 22, 22), f"only SSH may have a CIDR: {r}"
        for src in sources(r):
            assert src not in WORLD
            net = ipaddress.ip_network(src)
            assert net.prefixlen >= 8, f"SSH open to a huge range {src}"
    # no world-open inbound rule anywhere in the file (egress is not configured here)
    perms = yaml.safe_dump(CONFIG["provider"]["security_group"])
    assert "0.0.0.0/0" not in perms and "::/0" not in perms


def test_dashboard_and_ports_bound_as_documented():
    head = ray_start("head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head
    assert "--port=6379" in head and "--ray-client-server-port=10001" in head and "--dashboard-port=8265" in head
    assert "--dashboard-host=0.0.0.0" not in TEXT
    worker = ray_start("worker_start_ray_commands")
    assert "--address=$RAY_HEAD_IP:6379" in worker


# -- what goes to the nodes ----------------------------------------------------------------

def test_file_mounts_carry_only_code():
    mounts = CONFIG.get("file_mounts") or {}
    local = [str(v) for v in mounts.values()]
    allowed = {"./pyproject.toml", "./README.md", "./pipeline", "./schemas"}
    assert set(local) <= allowed, f"file_mounts beyond the package's code: {set(local) - allowed}"
    for path in local + [str(k) for k in mounts]:
        assert path.rstrip("/") not in (".", "~", "/work/main"), "the whole tree (specs, .env) would be copied"
        for bad in ("jobs", ".env", ".aws", ".ray", "auth_token", ".ssh", "credentials", ".netrc", ".git"):
            assert bad not in path.split("/"), f"{path} copies {bad}"
    for src in local:
        assert (REPO / src).exists(), src
    assert not CONFIG.get("cluster_synced_files"), "cluster_synced_files copies files to every node"


# -- pins ----------------------------------------------------------------------------------

def test_image_pinned_to_an_ami_id():
    for name, node_type in CONFIG["available_node_types"].items():
        ami = node_type["node_config"].get("ImageId", "")
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", ami), f"{name}: ImageId {ami!r} is not a pinned AMI id"
    assert "latest_dlami" not in TEXT.split("#")[0] and "latest_dlami" not in yaml.safe_dump(CONFIG)


def pip_invocations() -> list[str]:
    return [c for c in all_commands() if re.search(r"\bpip3? install\b", c)]


def test_pip_installs_pinned():
    installs = pip_invocations()
    assert installs
    for c in installs:
        words = shlex.split(c)
        assert "-U" not in words and "--upgrade" not in words, f"unpinned upgrade: {c}"
        reqs = [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
        options = words[words.index("install") + 1:]
        # arguments of options are not requirements
        for opt in ("--python", "--exclude-newer", "-c", "--constraint", "-r"):
            if opt in options:
                reqs.remove(options[options.index(opt) + 1])
        if "-e" in options or "--no-deps" in options:
            # the project itself from its mounted code, without resolving anything
            assert "--no-deps" in options, f"the project's install would resolve its ranges: {c}"
            assert reqs == ["/home/ubuntu/qwen-batch"], c
            continue
        assert reqs, c
        for req in reqs:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.+-]*", req), f"not pinned: {req}"
    # the dependency install freezes transitive versions too
    deps = [c for c in installs if "vllm==" in c]
    assert len(deps) == 1 and re.search(r"--exclude-newer \d{4}-\d\d-\d\dT", deps[0])


def test_pins_cover_every_runtime_dependency_and_match_the_tested_ray():
    """Each of pyproject's dependencies (and the gpu extra) is pinned at setup, ray at the
    version the tests run with (a driver and a cluster of different Ray versions do not talk)."""
    import ray
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["gpu"]
    names = {re.split(r"[\[<>=! ]", d, maxsplit=1)[0].lower() for d in wanted}
    deps = next(c for c in pip_invocations() if "vllm==" in c)
    pinned = {m.group(1).lower(): m.group(2)
              for m in re.finditer(r"'([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?==([^']+)'", deps)}
    assert names <= set(pinned), f"not pinned at setup: {names - set(pinned)}"
    assert pinned["ray"] == ray.__version__


def test_python_and_uv_pinned():
    setup = " ".join(commands("setup_commands"))
    assert re.search(r"'uv==\d+\.\d+\.\d+'", setup)
    assert re.search(r"--python \d+\.\d+\.\d+ --python-preference only-managed", setup)
