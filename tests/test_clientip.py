"""The client address: socket peer, or the forwarding chain through trusted proxies only."""

from __future__ import annotations

import pytest

from peoplebase.clientip import ClientAddress, InvalidTrustedProxies, forwarded_for, parse_trusted


def h(**headers: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]


PROXIES = ClientAddress("127.0.0.1, 10.0.0.0/8, ::1, fd00::/8")


def test_no_trusted_proxies_means_the_peer_and_headers_ignored() -> None:
    nobody = ClientAddress("")
    assert nobody.resolve("127.0.0.1", h(x_forwarded_for="8.8.8.8")) == "127.0.0.1"
    assert nobody.resolve("81.2.69.160", h(forwarded="for=8.8.8.8")) == "81.2.69.160"


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    spoof = h(x_forwarded_for="8.8.8.8", forwarded="for=9.9.9.9")
    assert PROXIES.resolve("81.2.69.160", spoof) == "81.2.69.160"
    assert PROXIES.resolve("192.168.1.5", spoof) == "192.168.1.5"


def test_trusted_peer_without_header_is_the_client() -> None:
    assert PROXIES.resolve("10.1.2.3", []) == "10.1.2.3"


def test_x_forwarded_for_through_one_trusted_proxy() -> None:
    assert PROXIES.resolve("127.0.0.1", h(x_forwarded_for="81.2.69.160")) == "81.2.69.160"


def test_client_cannot_prepend_its_own_address() -> None:
    # the client sent "X-Forwarded-For: 8.8.8.8"; the proxy appended the real peer
    chain = h(x_forwarded_for="8.8.8.8, 81.2.69.160")
    assert PROXIES.resolve("127.0.0.1", chain) == "81.2.69.160"


def test_chain_of_trusted_proxies_is_walked_from_the_right() -> None:
    chain = h(x_forwarded_for="8.8.8.8, 81.2.69.160, 10.0.0.7, 10.0.0.8")
    assert PROXIES.resolve("127.0.0.1", chain) == "81.2.69.160"


def test_all_hops_trusted_gives_the_leftmost() -> None:
    assert PROXIES.resolve("127.0.0.1", h(x_forwarded_for="10.0.0.9, 10.0.0.8")) == "10.0.0.9"


def test_several_header_lines_are_one_chain() -> None:
    headers = [(b"x-forwarded-for", b"8.8.8.8"), (b"x-forwarded-for", b"81.2.69.160, 10.0.0.1")]
    assert PROXIES.resolve("127.0.0.1", headers) == "81.2.69.160"


def test_empty_items_are_skipped() -> None:
    assert PROXIES.resolve("127.0.0.1", h(x_forwarded_for="81.2.69.160, ,")) == "81.2.69.160"


@pytest.mark.parametrize(
    ("entry", "client"),
    [
        ("81.2.69.160:51234", "81.2.69.160"),
        ("[2400:cb00::1]:443", "2400:cb00::1"),
        ("2400:cb00::1", "2400:cb00::1"),
        ("::ffff:81.2.69.160", "81.2.69.160"),
        ('"81.2.69.160"', "81.2.69.160"),
    ],
)
def test_forms_of_an_address(entry: str, client: str) -> None:
    assert PROXIES.resolve("127.0.0.1", h(x_forwarded_for=entry)) == client


@pytest.mark.parametrize("entry", ["unknown", "_hidden", "not-an-ip", "[2400:cb00::1"])
def test_unreadable_hop_means_unknown_client(entry: str) -> None:
    # nothing left of an unreadable hop can be believed, not even 8.8.8.8
    assert PROXIES.resolve("127.0.0.1", h(x_forwarded_for=f"8.8.8.8, {entry}")) is None


def test_forwarded_header() -> None:
    fwd = 'for=8.8.8.8;proto=http, For="[2400:cb00::1]:4711";by=10.0.0.1, for=10.0.0.2'
    assert PROXIES.resolve("127.0.0.1", h(forwarded=fwd)) == "2400:cb00::1"


def test_forwarded_element_without_for_is_unknown() -> None:
    assert PROXIES.resolve("127.0.0.1", h(forwarded="for=8.8.8.8, proto=https")) is None


def test_x_forwarded_for_preferred_over_forwarded() -> None:
    headers = h(x_forwarded_for="81.2.69.160", forwarded="for=8.8.8.8")
    assert PROXIES.resolve("127.0.0.1", headers) == "81.2.69.160"


def test_ipv6_proxies_and_mapped_peer() -> None:
    assert PROXIES.resolve("::1", h(x_forwarded_for="81.2.69.160")) == "81.2.69.160"
    assert PROXIES.resolve("fd00::5", h(x_forwarded_for="2400:cb00::9")) == "2400:cb00::9"
    # a dual-stack socket reports an IPv4 proxy as ::ffff:a.b.c.d
    assert PROXIES.resolve("::ffff:10.0.0.1", h(x_forwarded_for="81.2.69.160")) == "81.2.69.160"


def test_no_peer() -> None:
    assert PROXIES.resolve(None, h(x_forwarded_for="81.2.69.160")) is None


def test_parse_trusted() -> None:
    nets = parse_trusted(" 10.0.0.0/8,127.0.0.1 ::1 , 192.168.1.7/24")
    assert [str(n) for n in nets] == ["10.0.0.0/8", "127.0.0.1/32", "::1/128", "192.168.1.0/24"]
    assert parse_trusted("") == ()
    with pytest.raises(InvalidTrustedProxies, match="'10.0.0.0/33' is not an IP address"):
        parse_trusted("127.0.0.1,10.0.0.0/33")
    with pytest.raises(InvalidTrustedProxies, match="'proxy.local'"):
        ClientAddress("proxy.local")


def test_forwarded_for_elements() -> None:
    assert forwarded_for('for=1.2.3.4;by=x, proto=https, FOR="[::1]"') == ["1.2.3.4", "", '"[::1]"']
