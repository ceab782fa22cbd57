"""The edge key sources of the request policy (router/request.py), socket-free: preview hosts,
the extension's ``x-devstack-key`` header, the ``devstack-key`` cookie and its ``?devstack=``
redirect, their precedence and conflicts, the merge into the forwarded ``baggage``, and
``--edge-key-clients``. Each case calls ``decide`` on a head and checks the plan and the exact
head that would go upstream."""

from __future__ import annotations

import pytest

from router.errors import Answer
from router.request import HeadCache, Plan, Policy, TableSlot, decide
from router.settings import Mode, RouterSettings
from tests.support import Origin, exchange, make_table, running_router, split_responses

TABLE = make_table(
    {
        "checkout": {"baseline": "http://127.0.0.1:9001", "overrides": {"alice": "http://127.0.0.1:9101"}},
        "payments": {
            "baseline": "http://127.0.0.1:9003",
            "overrides": {"alice": "http://127.0.0.1:9103", "bob": "http://127.0.0.1:9104"},
        },
    }
)
EDGE = RouterSettings(preview_domain="preview.example.com", key_header=True, key_cookie=True)


def _decide(
    host: bytes,
    *fields: tuple[bytes, bytes],
    target: bytes = b"/",
    method: bytes = b"GET",
    settings: RouterSettings = EDGE,
    peer: bytes = b"10.0.0.7",
) -> Plan:
    headers = [(b"Host", host), *fields]
    return decide(Policy(settings), HeadCache(peer), TableSlot(TABLE), method, target, "1.1", True, False, headers,
                  Plan())  # fmt: skip


def _fields(plan: Plan) -> list[tuple[bytes, bytes]]:
    lines = plan.head.split(b"\r\n")[1:-2]
    return [(name, value) for name, _, value in (line.partition(b": ") for line in lines)]


def _field(plan: Plan, name: bytes) -> list[bytes]:
    return [value for field, value in _fields(plan) if field.lower() == name]


# -- each source alone -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "host", "fields", "key", "source", "target"),
    [
        ("baggage", b"payments", [(b"baggage", b"devstack=alice")], "alice", b"baggage", "override"),
        ("preview-host", b"alice--payments.preview.example.com", [], "alice", b"preview-host", "override"),
        ("preview-host-port", b"bob--payments.preview.example.com:8080", [], "bob", b"preview-host", "override"),
        ("preview-host-upper", b"ALICE--Payments.Preview.Example.COM", [], "alice", b"preview-host", "override"),
        ("header", b"payments", [(b"X-Devstack-Key", b"bob")], "bob", b"header", "override"),
        ("cookie", b"payments", [(b"Cookie", b"a=1; devstack-key=alice; b=2")], "alice", b"cookie", "override"),
        ("none", b"payments", [], None, b"", "baseline"),
        ("header-invalid", b"payments", [(b"x-devstack-key", b"Alice!")], None, b"", "baseline"),
        ("cookie-invalid", b"payments", [(b"cookie", b"devstack-key=%zz")], None, b"", "baseline"),
    ],
)
def test_each_source_alone(
    case: str, host: bytes, fields: list[tuple[bytes, bytes]], key: str | None, source: bytes, target: str
) -> None:
    plan = _decide(host, *fields)
    assert plan.refusal is None, case
    assert (plan.key, plan.key_source) == (key, source)
    assert plan.decision is not None and plan.decision.kind.value == target
    assert plan.decision.service == "payments"
    assert not _field(plan, b"x-devstack-key"), "the extension's header is never forwarded"
    assert all(b"devstack-key" not in value for value in _field(plan, b"cookie")), "nor is the cookie pair"


def test_a_key_from_the_edge_is_written_into_the_forwarded_baggage() -> None:
    plan = _decide(b"alice--payments.preview.example.com")
    assert _field(plan, b"baggage") == [b"devstack=alice"]


def test_the_clients_own_baggage_members_stay_byte_exact_and_the_key_is_added() -> None:
    own = b"userId=u-1;prop=1 ,  sessionId=%20x"
    plan = _decide(b"payments", (b"baggage", own), (b"x-devstack-key", b"bob"))
    assert _field(plan, b"baggage") == [own + b",devstack=bob"]
    assert plan.key == "bob"


def test_with_two_baggage_lines_the_key_is_added_to_the_last() -> None:
    plan = _decide(b"payments", (b"baggage", b"a=1"), (b"baggage", b"b=2"), (b"cookie", b"devstack-key=alice"))
    assert _field(plan, b"baggage") == [b"a=1", b"b=2,devstack=alice"]


def test_the_cookie_line_goes_when_the_key_was_its_only_pair() -> None:
    plan = _decide(b"payments", (b"cookie", b"devstack-key=alice"))
    assert _field(plan, b"cookie") == []
    plan = _decide(b"payments", (b"cookie", b"theme=dark; devstack-key=alice"))
    assert _field(plan, b"cookie") == [b"theme=dark"]


# -- precedence and conflicts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "host", "fields", "key", "source", "overruled"),
    [
        (
            "baggage-beats-everything",
            b"bob--payments.preview.example.com",
            [(b"baggage", b"devstack=alice"), (b"x-devstack-key", b"bob"), (b"cookie", b"devstack-key=bob")],
            "alice", b"baggage", b"preview-host=bob,header=bob,cookie=bob",
        ),
        (
            "an-invalid-baggage-member-still-decides",
            b"payments",
            [(b"baggage", b"devstack=%zz"), (b"x-devstack-key", b"bob")],
            None, b"baggage", b"header=bob",
        ),
        (
            "preview-beats-header-and-cookie",
            b"alice--payments.preview.example.com",
            [(b"x-devstack-key", b"bob"), (b"cookie", b"devstack-key=bob")],
            "alice", b"preview-host", b"header=bob,cookie=bob",
        ),
        (
            "header-beats-cookie",
            b"payments",
            [(b"x-devstack-key", b"bob"), (b"cookie", b"devstack-key=alice")],
            "bob", b"header", b"cookie=alice",
        ),
        (
            "agreeing-sources-are-no-conflict",
            b"payments",
            [(b"x-devstack-key", b"alice"), (b"cookie", b"devstack-key=alice")],
            "alice", b"header", b"",
        ),
    ],
)  # fmt: skip
def test_precedence_and_the_conflicts_it_overrules(
    case: str, host: bytes, fields: list[tuple[bytes, bytes]], key: str | None, source: bytes, overruled: bytes
) -> None:
    plan = _decide(host, *fields, (b"x-devstack-debug", b"1"))
    assert (plan.key, plan.key_source, plan.overruled) == (key, source, overruled), case
    header = plan.route_header()
    assert b"; source=" + source in header
    assert (b"; overruled=" + overruled in header) == bool(overruled)
    if source == b"baggage":
        assert b"devstack=bob" not in b"".join(_field(plan, b"baggage")), "nothing is added to a member that decides"


# -- the cookie's redirect ----------------------------------------------------------------------


def _answer_fields(plan: Plan) -> dict[bytes, bytes]:
    lines = [line for line in plan.extra_head.split(b"\r\n") if line]
    return {name: value for name, _, value in (line.partition(b": ") for line in lines)}


def test_a_navigation_with_the_parameter_sets_the_cookie_and_redirects_without_it() -> None:
    plan = _decide(b"checkout", target=b"/cart?item=3&devstack=alice&x=y")
    assert plan.refusal is Answer.KEY_COOKIE and plan.refusal.status == 302
    fields = _answer_fields(plan)
    assert fields[b"location"] == b"/cart?item=3&x=y"
    cookie = fields[b"set-cookie"].split(b"; ")
    assert cookie[0] == b"devstack-key=alice"
    assert set(cookie[1:]) == {b"Max-Age=28800", b"Path=/", b"HttpOnly", b"SameSite=Lax"}
    assert fields[b"cache-control"] == b"no-store"
    assert plan.keep_alive  # a redirect is not a reason to drop the connection


def test_an_empty_parameter_clears_the_cookie_and_the_domain_flag_widens_it() -> None:
    settings = RouterSettings(key_cookie=True, key_cookie_domain="preview.example.com", key_cookie_max_age=60)
    plan = _decide(b"checkout", target=b"/?devstack=", settings=settings)
    fields = _answer_fields(plan)
    assert fields[b"location"] == b"/"
    assert fields[b"set-cookie"].split(b"; ")[:2] == [b"devstack-key=", b"Max-Age=0"]
    assert b"Domain=preview.example.com" in fields[b"set-cookie"]
    plan = _decide(b"checkout", target=b"/?devstack=bob", settings=settings)
    assert b"Max-Age=60" in _answer_fields(plan)[b"set-cookie"]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/?devstack=Alice", Answer.EDGE_KEY_INVALID),
        (b"/?devstack=%zz", Answer.EDGE_KEY_INVALID),
        (b"/?devstack=a%0d%0aSet-Cookie:x", Answer.EDGE_KEY_INVALID),
        (b"/?notdevstack=alice", None),  # another parameter: forwarded as it is
    ],
)
def test_a_bad_parameter_is_refused_and_others_pass(target: bytes, expected: Answer | None) -> None:
    plan = _decide(b"checkout", target=target)
    assert plan.refusal is expected
    if expected is None:
        assert plan.head.startswith(b"GET " + target + b" HTTP/1.1\r\n")


def test_the_redirect_never_leaves_the_site_and_only_answers_navigations() -> None:
    away = _decide(b"checkout", target=b"//evil.example/?devstack=alice")
    assert _answer_fields(away)[b"location"] == b"/evil.example/"
    post = _decide(b"checkout", target=b"/?devstack=alice", method=b"POST")
    assert post.refusal is None and post.head.startswith(b"POST /?devstack=alice ")


# -- preview host parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        b"--payments.preview.example.com",  # no key
        b"alice--.preview.example.com",  # no service
        b"-alice--payments.preview.example.com",  # a label cannot start with '-'
        b"alice--payments-.preview.example.com",  # nor end with it
        b"alice--nosuch.preview.example.com",  # no such service
        b"alice.payments.preview.example.com",  # two labels
        b"alice--payments.preview.example.org",  # another domain
        b"alice_x--payments.preview.example.com",
    ],
)
def test_what_is_not_a_preview_host_is_not_routed_as_one(host: bytes) -> None:
    plan = _decide(host)
    assert plan.refusal is Answer.NO_ROUTE
    assert plan.key is None


def test_preview_hosts_are_off_without_the_flag_and_in_sidecar_mode() -> None:
    host = b"alice--payments.preview.example.com"
    assert _decide(host, settings=RouterSettings()).refusal is Answer.NO_ROUTE
    sidecar = RouterSettings(mode=Mode.SIDECAR, preview_domain="preview.example.com", key_header=True)
    plan = _decide(host, settings=sidecar)
    assert plan.refusal is Answer.NO_ROUTE_SIDECAR
    plan = _decide(b"payments", (b"x-devstack-key", b"alice"), settings=sidecar)
    assert plan.key is None and not _field(plan, b"x-devstack-key")  # dropped, never honoured


def test_without_the_flags_the_header_is_dropped_and_the_cookie_forwarded_untouched() -> None:
    plan = _decide(b"payments", (b"x-devstack-key", b"alice"), (b"cookie", b"devstack-key=bob"),
                   settings=RouterSettings())  # fmt: skip
    assert plan.key is None and plan.key_source == b""
    assert not _field(plan, b"x-devstack-key")
    assert _field(plan, b"cookie") == [b"devstack-key=bob"]


# -- who may choose a key at the edge ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [(b"10.1.2.3", True), (b"192.168.7.9", True), (b"203.0.113.5", False), (b"::1", False), (b"fd00::5", True)],
)
def test_only_clients_of_the_edge_networks_choose_a_key(peer: bytes, allowed: bool) -> None:
    settings = RouterSettings(
        preview_domain="preview.example.com",
        key_header=True,
        key_cookie=True,
        edge_key_clients=("10.0.0.0/8", "192.168.0.0/16", "fd00::/8"),
    )
    others = ((b"x-devstack-key", b"bob"), (b"cookie", b"devstack-key=bob"))
    plan = _decide(b"alice--payments.preview.example.com", *others, settings=settings, peer=peer)
    assert plan.decision is not None and plan.decision.service == "payments"  # the preview host still names it
    assert plan.key == ("alice" if allowed else None)
    assert not _field(plan, b"x-devstack-key") and not _field(plan, b"cookie")
    redirect = _decide(b"checkout", target=b"/?devstack=alice", settings=settings, peer=peer)
    assert (redirect.refusal is Answer.KEY_COOKIE) == allowed
    baggage = _decide(b"payments", (b"baggage", b"devstack=alice"), settings=settings, peer=peer)
    assert baggage.key == "alice"  # baggage is not an edge source: it always counts


# -- through a real router ----------------------------------------------------------------------


async def test_through_a_router_the_cookie_redirect_then_the_cookie_reach_alices_override(
    origins: dict[str, Origin],
) -> None:
    table = make_table({"a": {"baseline": origins["baseline"].url, "overrides": {"alice": origins["alice"].url}}})
    settings = RouterSettings(preview_domain="localhost", key_cookie=True, key_header=True)
    async with running_router(table, settings) as server:
        port = server.address[1]
        data, _ = await exchange(port, b"GET /x?devstack=alice HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        status, head, _ = split_responses(data)[0]
        assert status == 302
        assert head["location"] == "/x"
        assert head["set-cookie"].startswith("devstack-key=alice; Max-Age=28800")
        raw = (
            b"GET /x HTTP/1.1\r\nHost: a\r\nCookie: theme=dark; devstack-key=alice\r\nbaggage: userId=7\r\n"
            b"x-devstack-debug: 1\r\nConnection: close\r\n\r\n"
        )
        data, _ = await exchange(port, raw)
        status, head, _ = split_responses(data)[0]
        assert status == 200
        assert "source=cookie" in head["x-devstack-route"]
        seen = origins["alice"].seen[-1]
        assert seen.header("baggage") == ["userId=7,devstack=alice"]
        assert seen.header("cookie") == ["theme=dark"]
        data, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: alice--a.localhost:8080\r\nConnection: close\r\n\r\n")
        assert split_responses(data)[0][0] == 200
        assert origins["alice"].seen[-1].header("baggage") == ["devstack=alice"]
        assert not origins["baseline"].seen
