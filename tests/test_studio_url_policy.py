"""The image host policy: a corpus of server-side request forgery attempts (tests/fixtures/ssrf_urls.json),
redirects to private addresses from a real local server, DNS names resolving to loopback (a patched
resolver), a name that changes its address between the check and the connection, and property-based fuzzing
of URL and setting parsing."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from magral_core.errors import UserError
from magral_core.studio import ImageFetchError
from magral_core.studio.downloads import DownloadCache
from magral_core.studio.url_policy import (
    HostNotAllowed,
    Studio,
    Target,
    address_kind,
    check,
    parse_allowed_hosts,
    resolve,
    target_of,
)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # requirements-dev.txt pins it; without it only the fuzzing is skipped
    given = None

CORPUS = json.loads((Path(__file__).parent / "fixtures" / "ssrf_urls.json").read_text())
STUDIO = "http://ls.example:8080"
_real_getaddrinfo = socket.getaddrinfo


@pytest.fixture()
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """socket.getaddrinfo answering the corpus's names from its table (other hosts: the real resolver, which
    for the literals here needs no network). Tests may change the table."""
    table: dict[str, list[str]] = {k: list(v) for k, v in CORPUS["resolving"].items()}

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = str(host).lower().rstrip(".")
        if name in table:
            out = []
            for address in table[name]:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                out.append((family, socket.SOCK_STREAM, 6, "", (address, int(port or 0))))
            return out
        return _real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def _cache(tmp_path: Path, allowed: str = "none", base_url: str = STUDIO) -> DownloadCache:
    return DownloadCache(
        tmp_path / "images",
        base_url=base_url,
        timeout=2.0,
        max_bytes=10_000,
        max_pixels=10_000,
        capacity_bytes=10**6,
        policy=parse_allowed_hosts(allowed),
    )


# a public host is what '*' allows: those entries are refused under "none" only
REFUSED = [(e, a) for e in CORPUS["refused"] for a in ("none", "*") if not (a == "*" and e.get("public"))]


@pytest.mark.parametrize(("entry", "allowed"), REFUSED, ids=[f"{e['url']}-{a}" for e, a in REFUSED])
def test_every_corpus_url_is_refused_naming_the_host(
    entry: dict[str, str], allowed: str, fake_dns: dict[str, list[str]], tmp_path: Path
) -> None:
    with pytest.raises(ImageFetchError) as info:
        _cache(tmp_path, allowed).fetch(entry["url"], task_id=3, auth_headers={"Authorization": "Token t"})
    message = str(info.value)
    assert message.startswith("task 3: ")
    assert entry["names"] in message
    plain = "@" not in entry["url"] and ":///" not in entry["url"]
    if urlscheme(entry["url"]) in ("http", "https") and plain:
        assert "MAGRAL_ALLOWED_IMAGE_HOSTS" in message
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").iterdir())


def urlscheme(url: str) -> str:
    return url.split(":", 1)[0].lower()


def test_named_hosts_and_networks_are_allowed(fake_dns: dict[str, list[str]]) -> None:
    studio = Studio(Target("http", "ls.example", 8080), resolve("ls.example", 8080))

    def allowed(url: str, setting: str, public_ok: bool = False) -> bool:
        target = target_of(url)
        try:
            check(target, resolve(target.host, target.port), parse_allowed_hosts(setting), studio,
                  public_ok=public_ok)
        except HostNotAllowed:
            return False
        return True

    assert allowed("http://ls.example:8080/data/upload/1/a.png", "none")
    assert allowed("http://93.184.216.40:8080/x", "none")  # Label Studio's own address and port
    assert not allowed("http://93.184.216.40:8081/x", "none")
    assert allowed("http://internal.example/x", "10.0.0.0/8")
    fake_dns["minio.internal"] = ["10.9.9.9"]
    assert allowed("http://minio.internal:9000/b/x.png", "minio.internal:9000,10.0.0.0/8")
    assert allowed("http://minio.internal:9000/b/x.png", "minio.internal:9000")
    assert not allowed("http://minio.internal:9001/b/x.png", "minio.internal:9000")
    assert allowed("http://minio.internal:9001/b/x.png", "minio.internal")
    assert not allowed("http://internal.example/x", "*")  # '*' is public hosts only
    assert allowed("https://public.example/x", "*")
    assert not allowed("https://public.example/x", "none")
    assert allowed("https://public.example/x", "none", public_ok=True)  # after Label Studio's redirect
    assert not allowed("http://metadata.example/x", "none", public_ok=True)
    assert not allowed("http://rebind.example/x", "*")  # one private address is enough to refuse
    assert allowed("http://rebind.example/x", "*,127.0.0.1")
    assert allowed("http://[::ffff:10.1.1.1]/x", "10.0.0.0/8")  # an IPv4-mapped address is its IPv4 one


def test_address_kinds() -> None:
    kinds = {a: address_kind(ipaddress.ip_address(a)) for a in (
        "127.0.0.1", "169.254.169.254", "10.0.0.1", "0.0.0.0", "224.0.0.1", "::1", "::ffff:127.0.0.1",
        "64:ff9b::7f00:1", "93.184.216.34", "2606:4700::1111",
    )}
    assert kinds == {
        "127.0.0.1": "loopback", "169.254.169.254": "link-local", "10.0.0.1": "private",
        "0.0.0.0": "unspecified", "224.0.0.1": "multicast", "::1": "loopback", "::ffff:127.0.0.1": "loopback",
        "64:ff9b::7f00:1": "loopback", "93.184.216.34": "global", "2606:4700::1111": "global",
    }


def test_setting_parse_errors_name_the_entry() -> None:
    assert parse_allowed_hosts("").describe() == "none (Label Studio only)"
    policy = parse_allowed_hosts("*, Minio.Internal:9000, 10.0.0.0/8, [fd00::1]:9000, 192.168.1.5")
    assert policy.any_public and policy.hosts == {"minio.internal:9000"}
    assert [str(n) for n, _ in policy.networks] == ["10.0.0.0/8", "fd00::1/128", "192.168.1.5/32"]
    for bad in ("10.0.0.0/33", "host/path", "a:b", "user@host"):
        with pytest.raises(UserError, match=r"MAGRAL_ALLOWED_IMAGE_HOSTS.*found"):
            parse_allowed_hosts(bad)


# --- a real server: redirects to what is not allowed ------------------------------------------------------
@contextlib.contextmanager
def _redirector() -> Iterator[str]:
    """A server on 127.0.0.1 answering /go?to=URL with a 302 to URL, anything else with a tiny PNG."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4, 3)).save(out, format="PNG")

    @Request.application
    def app(request: Request) -> Response:
        if request.path == "/go":
            return Response(status=302, headers={"Location": request.args["to"]})
        return Response(out.getvalue(), mimetype="image/png")

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


@pytest.mark.parametrize(
    ("to", "names"),
    [
        ("http://10.1.2.3/x.png", "10.1.2.3, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, a link-local address"),
        ("http://127.0.0.1:9/x.png", "127.0.0.1, a loopback address"),
        ("http://evil.example/x.png", "evil.example resolves to 127.0.0.1"),
        ("http://[::1]:9/x.png", "::1, a loopback address"),
        ("file:///etc/passwd", "scheme 'file'"),
    ],
)
def test_redirect_to_a_refused_target(
    to: str, names: str, fake_dns: dict[str, list[str]], tmp_path: Path
) -> None:
    with _redirector() as server:
        # The test server itself is on 127.0.0.1: allowed by name, so that only its redirect is judged.
        cache = _cache(tmp_path, allowed=server.removeprefix("http://"))
        assert cache.fetch(f"{server}/ok.png", task_id=1, auth_headers={}).is_file()
        with pytest.raises(ImageFetchError, match="redirected to") as info:
            cache.fetch(f"{server}/go?to={to}", task_id=1, auth_headers={})
    assert names in str(info.value)


def test_label_studio_redirect_may_lead_to_public_hosts_only(
    fake_dns: dict[str, list[str]], tmp_path: Path
) -> None:
    with _redirector() as server:
        port = int(server.rsplit(":", 1)[1])
        fake_dns["ls.example"] = ["127.0.0.1"]  # Label Studio on loopback, the usual single-machine install
        cache = _cache(tmp_path, base_url=f"http://ls.example:{port}")
        assert cache.fetch("/data/upload/1/a.png", task_id=1, auth_headers={}).is_file()  # its own address
        with pytest.raises(ImageFetchError, match=r"redirected to .*169.254.169.254, a link-local"):
            cache.fetch("/go?to=http://169.254.169.254/x", task_id=1, auth_headers={})


def test_address_changed_after_the_check_is_refused_at_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DNS rebinding: the name resolves to a public address when checked, to 127.0.0.1 when connected."""
    with _redirector() as server:
        port = int(server.rsplit(":", 1)[1])
        answers = iter([["93.184.216.34"], ["127.0.0.1"]])

        def getaddrinfo(host: Any, p: Any, *args: Any, **kwargs: Any) -> Any:
            if str(host) == "flip.example":
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, int(p))) for a in next(answers)]
            return _real_getaddrinfo(host, p, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        with pytest.raises(ImageFetchError, match=r"flip.example resolves to 127.0.0.1, a loopback") as info:
            _cache(tmp_path, allowed="*").fetch(f"http://flip.example:{port}/a", task_id=1, auth_headers={})
        assert "redirected" not in str(info.value)  # refused by the connection's own check


def test_connection_outside_a_download_is_refused() -> None:
    from magral_core.studio.url_policy import guarded_session

    with pytest.raises(HostNotAllowed, match="outside an image download"):
        guarded_session().get("http://127.0.0.1:9/", timeout=1)


# --- fuzzing ----------------------------------------------------------------------------------------------
needs_hypothesis = pytest.mark.skipif(given is None, reason="hypothesis is not installed (requirements-dev)")

if given is not None:

    @needs_hypothesis
    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=80))
    def test_target_of_any_text_is_a_target_or_a_refusal(text: str) -> None:
        for url in (text, "http://" + text, "https://" + text + "/x.png"):
            try:
                target = target_of(url)
            except HostNotAllowed as exc:
                assert str(exc)
                continue
            assert target.scheme in ("http", "https") and target.host and 0 <= target.port <= 65535
            assert target.host == target.host.lower() and not target.host.endswith(".")

    @needs_hypothesis
    @settings(max_examples=300, deadline=None)
    @given(st.ip_addresses(v=4), st.sampled_from(["dotted", "decimal", "hex", "mapped"]))
    def test_no_form_of_a_non_global_address_passes(address: ipaddress.IPv4Address, form: str) -> None:
        host = {
            "dotted": str(address),
            "decimal": str(int(address)),
            "hex": hex(int(address)),
            "mapped": f"[::ffff:{address}]",
        }[form]
        target = target_of(f"http://{host}:81/x.png")
        try:
            addresses = resolve(target.host, target.port)  # numeric forms: no DNS query
        except OSError:
            return  # a form this resolver does not read: nothing to connect to
        studio = Studio(Target("http", "ls.example", 8080), ())
        if address.is_global and address_kind(address) == "global":
            check(target, addresses, parse_allowed_hosts("*"), studio, public_ok=False)
        else:
            with pytest.raises(HostNotAllowed, match="MAGRAL_ALLOWED_IMAGE_HOSTS"):
                check(target, addresses, parse_allowed_hosts("*"), studio, public_ok=True)

    @needs_hypothesis
    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=60))
    def test_any_setting_parses_or_names_its_bad_entry(text: str) -> None:
        try:
            policy = parse_allowed_hosts(text)
        except UserError as exc:
            assert "MAGRAL_ALLOWED_IMAGE_HOSTS" in str(exc)
            return
        assert isinstance(policy.describe(), str)
