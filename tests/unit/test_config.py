import subprocess
import sys

import pytest

from comfylb_ext.config import ConfigError, load, parse, parse_backend

GOOD = """
server: {host: "127.0.0.1", port: 8100}
scheduler: {strategy: round_robin, prefer_idle: false}
backends:
  - {name: a, host: 127.0.0.1, port: 8188}
  - {name: b, host: 10.0.0.2, port: 8189, weight: 2, max_queue: 1, enabled: false}
"""


def write(tmp_path, text):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_defaults_match_the_documented_schema():
    cfg = parse({})
    assert (cfg.server.host, cfg.server.port, cfg.server.debug) == ("127.0.0.1", 8100, False)
    assert (cfg.scheduler.strategy, cfg.scheduler.prefer_idle, cfg.scheduler.order) == ("least_busy", True, "fifo")
    hc = cfg.health_check
    assert (hc.interval, hc.timeout, hc.unhealthy_threshold, hc.healthy_threshold) == (5.0, 3.0, 3, 1)
    assert (cfg.queue.max_size, cfg.queue.retry_interval, cfg.queue.max_retries) == (1000, 1.0, 1)
    b = parse_backend({"name": "comfy-1"})
    assert (b.host, b.port, b.weight, b.max_queue, b.enabled) == ("127.0.0.1", 8188, 1, 10, True)


def test_good_file(tmp_path):
    cfg = load(write(tmp_path, GOOD))
    assert [b.name for b in cfg.backends] == ["a", "b"]
    assert cfg.backends[1].weight == 2 and cfg.backends[1].enabled is False
    assert cfg.scheduler.strategy == "round_robin"


@pytest.mark.parametrize("text, field", [
    ("server: {port: http}", "server.port"),
    ("server: {port: 70000}", "server.port"),
    ("scheduler: {strategy: fastest}", "scheduler.strategy"),
    ("scheduler: {order: shortest_first}", "scheduler.order"),
    ("health_check: {interval: fast}", "health_check.interval"),
    ("queue: {max_size: 0}", "queue.max_size"),
    ("backends: [{name: a}, {name: a}]", "backends[1].name"),
    ("backends: [{name: a, port: 0}]", "backends[0].port"),
    ("backends: [{name: a, weight: -1}]", "backends[0].weight"),
    ("backends: [{host: x}]", "backends[0].name"),
    ("backends: [{name: a, host: 'ftp://x'}]", "backends[0].host"),
    ("backends: [{name: a, colour: red}]", "backends[0].colour"),
    ("bogus: 1", "bogus"),
    ("server: [1, 2]", "server"),
])
def test_errors_name_the_file_and_the_field(tmp_path, text, field):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert e.value.field == field
    assert str(e.value).startswith(f"{path}: {field}: ")
    assert "\n" not in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(write(tmp_path, "server: {port: [}"))
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml")


def test_https_peer_from_a_url():
    b = parse_backend({"name": "remote", "host": "https://gpu.example", "port": 443})
    assert b.url == "https://gpu.example:443"


def test_cli_prints_one_line_and_stops(tmp_path):
    path = write(tmp_path, "scheduler: {strategy: fastest}")
    r = subprocess.run([sys.executable, "-m", "comfylb_ext", "-c", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert str(path) in r.stderr and "scheduler.strategy" in r.stderr
    r = subprocess.run([sys.executable, "-m", "comfylb_ext", "-c", str(write(tmp_path, GOOD)), "-p", "99999"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--port" in r.stderr and "Traceback" not in r.stderr


def test_the_example_config_is_valid():
    from tests.procs import REPO

    cfg = load(REPO / "config.example.yaml")
    assert cfg.backends[0].name == "comfy-1" and cfg.storage.database == "comfylb.db" and cfg.auth.token == ""


@pytest.mark.parametrize("url", ["sqlite:///x.db", "postgresql:/no-slashes", "postgresql://h/db with space",
                                 "http://h/db", "postgresql://h/db\nDROP", 5])
def test_a_storage_url_that_is_not_postgresql_is_refused_by_its_field(url):
    with pytest.raises(ConfigError) as e:
        parse({"storage": {"url": url}})
    assert "storage.url" in str(e.value)


def test_a_postgresql_storage_url_is_taken():
    assert parse({"storage": {"url": "postgresql://u:p@db.example:5432/comfylb"}}).storage.url.endswith("/comfylb")
