"""scripts/preflight.sh, the check scripts/test.sh runs before any test: it passes on this
machine, and it fails, naming the Debian package, when a program the tests call is
missing or cannot do what they need. The failures are real ones, made with the real
programs: swaks hidden from PATH, and the real swaks unable to load Net::SSLeay (the
fresh-machine failure of issue 13: Debian's swaks only Recommends libnet-ssleay-perl)."""

import os
import re
import subprocess
from pathlib import Path

from harness import REPO

PREFLIGHT = REPO / "scripts" / "preflight.sh"


def preflight(env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(PREFLIGHT)], capture_output=True, text=True, timeout=110,
                          env=env if env is not None else dict(os.environ))


def failed_packages(r: subprocess.CompletedProcess) -> list[str]:
    """The Debian packages of the failure lines, one per line, in order."""
    lines = [line for line in r.stderr.splitlines() if line.startswith("preflight: FAIL: ")]
    packages = []
    for line in lines:
        m = re.search(r"\(Debian package: ([^)]+)\)$", line)
        assert m, f"a failure line names no package: {line!r}"
        packages.append(m.group(1))
    return packages


def test_preflight_passes_on_this_machine():
    r = preflight()
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.fullmatch(r"preflight ok \((\d+) checks\)\n", r.stdout)
    assert m, r.stdout
    # Every program of the tests, and a capability of most: far more than a handful.
    assert int(m.group(1)) >= 40, r.stdout
    assert failed_packages(r) == [], r.stderr


def test_swaks_without_net_ssleay_names_libnet_ssleay_perl(tmp_path):
    # A Net::SSLeay that cannot be loaded, found before the real one: the real swaks
    # then reports "TLS not available: requires Net::SSLeay", as on a fresh machine.
    fake = tmp_path / "perl5" / "Net"
    fake.mkdir(parents=True)
    (fake / "SSLeay.pm").write_text('die "Net::SSLeay hidden by test_preflight\\n";\n')
    env = dict(os.environ)
    env["PERL5LIB"] = os.pathsep.join(filter(None, [str(tmp_path / "perl5"),
                                                    env.get("PERL5LIB")]))
    swaks = subprocess.run(["swaks", "--support"], capture_output=True, text=True, env=env)
    assert "TLS not available: requires Net::SSLeay" in swaks.stdout + swaks.stderr, (
        swaks.stdout + swaks.stderr)

    r = preflight(env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert failed_packages(r) == ["libnet-ssleay-perl"], r.stderr
    assert "swaks cannot do STARTTLS/TLS" in r.stderr
    assert "apt-get install --no-install-recommends libnet-ssleay-perl" in r.stderr
    assert "preflight ok" not in r.stdout


def path_without(program: str, tmp_path: Path) -> str:
    """PATH with every directory that holds `program` replaced by a directory of
    symlinks to everything else in it (merged /usr: /bin is /usr/bin, so both go)."""
    dirs = []
    for i, d in enumerate(os.environ["PATH"].split(os.pathsep)):
        if d and os.path.exists(os.path.join(d, program)):
            farm = tmp_path / f"path{i}"
            farm.mkdir()
            for entry in os.scandir(d):
                if entry.name != program:
                    (farm / entry.name).symlink_to(entry.path)
            d = str(farm)
        dirs.append(d)
    return os.pathsep.join(dirs)


def test_missing_swaks_names_swaks(tmp_path):
    env = dict(os.environ)
    env["PATH"] = path_without("swaks", tmp_path)
    hidden = subprocess.run(["bash", "-c", "command -v swaks"], capture_output=True, env=env)
    assert hidden.returncode != 0, "swaks is still on the test's PATH"
    assert subprocess.run(["bash", "-c", "command -v curl"], capture_output=True,
                          env=env).returncode == 0

    r = preflight(env)
    assert r.returncode == 1, r.stdout + r.stderr
    # Only swaks: everything else is still found through the symlinks.
    assert failed_packages(r) == ["swaks"], r.stderr
    assert "swaks not found on PATH" in r.stderr
    assert "preflight ok" not in r.stdout
