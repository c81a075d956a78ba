"""The Prometheus endpoint, scraped with Python's own HTTP client while the
unchanged PyPI LiveLock client holds locks: the figures follow the traffic."""

import re
import urllib.request

from conftest import wait_until

METRICS = re.compile(rb"livelock: metrics on http://(127\.0\.0\.1:\d+)/metrics")


def scrape(address):
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def sample(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ", 1)[1])
    raise AssertionError(f"no sample {name}")


def test_metrics_follow_the_traffic(make_server):
    server = make_server(extra_args=["--metrics", "127.0.0.1:0"])
    address = wait_until(lambda: METRICS.search(server.log_path.read_bytes()), "the metrics line")
    address = address.group(1).decode()
    holder = server.connection()
    other = server.connection()
    for name in ("m1", "m2", "m3"):
        assert holder.send_command("AQ", name) == "1"
    assert other.send_command("AQ", "m1") == "0"

    def held(count):
        text = scrape(address)
        return text if sample(text, "livelock_locks_held") == count else None

    text = wait_until(lambda: held(3), "three held locks in the metrics")
    assert sample(text, 'livelock_sessions{state="attached"}') == 2
    assert sample(text, "livelock_acquisitions_total") >= 4
    assert sample(text, "livelock_grants_total") >= 3
    assert sample(text, 'livelock_op_duration_seconds_count{op="resp"}') >= 4
    assert sample(text, "livelock_oldest_hold_age_seconds") >= 0
    assert sample(text, "livelock_up") == 1

    assert holder.send_command("RELEASE", "m1") == "1"
    text = wait_until(lambda: held(2), "a release in the metrics")
    assert sample(text, "livelock_releases_total") >= 1
