"""The web page over HTTP: sign-in, cookies, CSRF, escaping, history and time travel."""

from __future__ import annotations

import re
from urllib.parse import quote

import httpx
import pytest

from peoplebase.ui.history import late_seqs
from peoplebase.ui.session import Signer
from tests.conftest import AppClient

pytestmark = pytest.mark.all_backends  # tests taking `client` run on SQLite and on PostgreSQL

TOKEN = "ui-token"


async def send(client: AppClient, records: list[dict]) -> None:
    r = await client.http.post("/engage?verbose=1", json=records)
    assert r.json() == {"status": 1, "error": None}, r.text


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html
    return m.group(1)


async def sign_in(client: AppClient, secret: str) -> httpx.Response:
    page = await client.http.get("/ui/login")
    return await client.http.post("/ui/login", data={"csrf": csrf_of(page.text), "secret": secret})


async def test_pages_need_a_session(client: AppClient) -> None:
    for path in ("/ui/", "/ui/profiles", "/ui/profiles/u1"):
        r = await client.http.get(path)
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/login"


async def test_sign_in_sets_a_signed_httponly_lax_cookie(client: AppClient) -> None:
    await send(client, [{"$token": TOKEN, "$distinct_id": "u1", "$set": {"a": 1}}])
    secret = client.secret_for(TOKEN)
    r = await sign_in(client, secret)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = [v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("pb_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/ui" in cookie
    overview = await client.http.get("/ui/")
    assert overview.status_code == 200
    assert 'id="profile-count">1<' in overview.text


async def test_wrong_secret_is_refused(client: AppClient) -> None:
    client.secret_for(TOKEN)
    r = await sign_in(client, "not-the-secret")
    assert r.status_code == 401
    assert "do not open any project" in r.text
    assert "pb_session=" not in r.headers.get("set-cookie", "")
    assert (await client.http.get("/ui/")).status_code == 303


async def test_sign_in_without_csrf_token_is_refused(client: AppClient) -> None:
    secret = client.secret_for(TOKEN)
    r = await client.http.post("/ui/login", data={"secret": secret})
    assert r.status_code == 403
    assert "pb_session=" not in r.headers.get("set-cookie", "")


async def test_tampered_cookie_is_ignored(client: AppClient) -> None:
    secret = client.secret_for(TOKEN)
    await sign_in(client, secret)
    value = client.http.cookies.get("pb_session")
    assert value
    payload, mac = value.rsplit(".", 1)
    client.http.cookies.set("pb_session", payload + "." + mac[:-2] + ("AA" if not mac.endswith("AA") else "BB"), path="/ui")
    assert (await client.http.get("/ui/")).status_code == 303


def test_signer_rejects_other_keys_and_expired_sessions() -> None:
    a, b = Signer(b"k1"), Signer(b"k2")
    cookie, session = a.issue(7, "x")
    assert a.read(cookie) == session
    assert b.read(cookie) is None
    assert Signer(b"k1", max_age=-1).read(Signer(b"k1", max_age=-1).issue(7, "x")[0]) is None


async def test_sign_out_needs_csrf_and_clears_the_session(client: AppClient) -> None:
    secret = client.secret_for(TOKEN)
    await sign_in(client, secret)
    page = await client.http.get("/ui/")
    refused = await client.http.post("/ui/logout", data={"csrf": "forged"})
    assert refused.status_code == 403
    assert (await client.http.get("/ui/")).status_code == 200
    r = await client.http.post("/ui/logout", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303
    assert "pb_session=;" in r.headers["set-cookie"] and "Max-Age=0" in r.headers["set-cookie"]


async def test_property_names_and_values_are_escaped(client: AppClient) -> None:
    evil = "<script>alert(1)</script>"
    did = 'x"><img src=x onerror=alert(2)>'
    await send(client, [{"$token": TOKEN, "$distinct_id": did, "$set": {evil: evil, "$email": evil}}])
    await sign_in(client, client.secret_for(TOKEN))
    listing = await client.http.get("/ui/profiles", params={"cols": f"$email,{evil}"})
    profile = await client.http.get("/ui/profiles/" + quote(did, safe=""))
    for page in (listing, profile):
        assert page.status_code == 200
        assert "<script>alert" not in page.text
        assert "<img src=x" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert profile.headers["content-security-policy"].startswith("default-src 'self'")


async def test_history_marks_late_updates_and_time_travel_shows_the_past(client: AppClient) -> None:
    await send(client, [{"$token": TOKEN, "$distinct_id": "h1", "$set": {"plan": "free"}, "$time": 1_700_000_000}])
    await send(client, [{"$token": TOKEN, "$distinct_id": "h1", "$set": {"plan": "pro"}, "$time": 1_700_000_200}])
    # arrives last, but its $time puts it between the two
    await send(client, [{"$token": TOKEN, "$distinct_id": "h1", "$set": {"seats": 5}, "$time": 1_700_000_100}])
    await sign_in(client, client.secret_for(TOKEN))
    page = await client.http.get("/ui/profiles/h1")
    assert page.status_code == 200
    history = page.text.split('id="history"', 1)[1]
    assert history.count('class="step late"') == 1
    assert "arrived late" in history
    # newest first: 22:16:40 ($set plan pro), 22:15:00 (the late seats), 22:13:20 (plan free)
    order = [history.index(f"$time 2023-11-14 22:{m}<") for m in ("16:40", "15:00", "13:20")]
    assert order == sorted(order)
    late_step = history.split('class="step late"', 1)[1].split("</li>", 1)[0]
    assert "$time 2023-11-14 22:15:00" in late_step
    assert re.search(r"<th scope=\"row\">seats</th><td><code>\(not set\)</code></td><td><code>5</code>", late_step)
    then = await client.http.get("/ui/profiles/h1", params={"at": "2023-11-14T22:14:00"})  # 1700000040
    table = then.text.split('id="then"', 1)[1].split("</table>", 1)[0]
    assert "free" in table and "pro" not in table and "seats" not in table
    now = await client.http.get("/ui/profiles/h1", params={"at": "1700000150"})
    table = now.text.split('id="then"', 1)[1].split("</table>", 1)[0]
    assert "free" in table and "seats" in table
    before = await client.http.get("/ui/profiles/h1", params={"at": "1600000000"})
    assert 'id="then-missing"' in before.text
    bad = await client.http.get("/ui/profiles/h1", params={"at": "yesterday"})
    assert "Give a time as" in bad.text


def test_late_seqs_marks_only_reordered_arrivals() -> None:
    from peoplebase.merge import LogEntry
    from peoplebase.types import Update

    def entry(t: float, seq: int) -> LogEntry:
        return LogEntry(t, seq, Update(0, "", "d", t, True, False, {"$set": {}}))

    assert late_seqs([entry(1, 1), entry(2, 2), entry(3, 3)]) == set()
    assert late_seqs([entry(1, 1), entry(3, 2), entry(2, 3), entry(4, 4)]) == {3}


async def test_overview_counts_accepted_and_rejected_by_reason(client: AppClient) -> None:
    await send(client, [{"$token": TOKEN, "$distinct_id": f"o{i}", "$set": {"i": i}} for i in range(3)])
    r = await client.http.post(
        "/engage", json=[{"$token": TOKEN, "$set": {"x": 1}}, {"$token": TOKEN, "$distinct_id": "o9", "$add": 5}]
    )
    assert r.text == "0"
    client.app.writer.stop()  # flushes the pending counts
    await sign_in(client, client.secret_for(TOKEN))
    page = await client.http.get("/ui/")
    text = page.text
    assert 'id="profile-count">3<' in text
    assert re.search(r"<td>accepted</td><td class=\"num\">3</td>", text)
    assert "rejected: $distinct_id, missing or empty" in text
    assert "rejected: $add, must be an object" in text
    assert "<svg" in text


async def test_profiles_list_search_and_keyset_paging(client: AppClient) -> None:
    await send(client, [{"$token": TOKEN, "$distinct_id": f"user-{i:03d}", "$set": {"$email": f"e{i}@x.test"}} for i in range(60)])
    await sign_in(client, client.secret_for(TOKEN))
    first = await client.http.get("/ui/profiles")
    assert first.text.count('href="/ui/profiles/user-') == 50
    nxt = re.search(r'href="([^"]+)" id="next-page"', first.text)
    assert nxt
    second = await client.http.get(nxt.group(1).replace("&amp;", "&"))
    assert second.text.count('href="/ui/profiles/user-') == 10
    assert "user-059" in second.text and "user-000" not in second.text
    by_email = await client.http.get("/ui/profiles", params={"q": "e7@x.test"})
    assert by_email.text.count('href="/ui/profiles/user-') == 1 and "user-007" in by_email.text
    by_prefix = await client.http.get("/ui/profiles", params={"q": "user-05"})
    assert by_prefix.text.count('href="/ui/profiles/user-') == 10


async def test_profiles_search_by_name(client: AppClient) -> None:
    # $name is matched exactly, like $email; a profile that only mentions the name in a value
    # or holds it as a nested key is not a match
    await send(
        client,
        [
            {"$token": TOKEN, "$distinct_id": "n1", "$set": {"$name": "Ada Lovelace"}},
            {"$token": TOKEN, "$distinct_id": "n2", "$set": {"note": "$name", "o": {"$name": "Ada Lovelace"}}},
            {"$token": TOKEN, "$distinct_id": "n3", "$set": {"$name": "Ada"}},
        ],
    )
    await sign_in(client, client.secret_for(TOKEN))
    page = await client.http.get("/ui/profiles", params={"q": "Ada Lovelace"})
    assert page.text.count('href="/ui/profiles/') == 1 and 'href="/ui/profiles/n1"' in page.text


@pytest.mark.parametrize("expr", ['properties["n"] >', "properties[", '(properties["a"] == 1'])
async def test_where_syntax_error_is_shown_inline(client: AppClient, expr: str) -> None:
    await send(client, [{"$token": TOKEN, "$distinct_id": "w1", "$set": {"n": 1}}])
    await sign_in(client, client.secret_for(TOKEN))
    page = await client.http.get("/ui/profiles", params={"where": expr})
    assert page.status_code == 200
    m = re.search(r'id="where-error">([^<]+)<', page.text)
    assert m and "position" in m.group(1)


async def test_where_filter_selects_profiles(client: AppClient) -> None:
    await send(client, [{"$token": TOKEN, "$distinct_id": f"p{i}", "$set": {"plan": "pro" if i % 2 else "free", "n": i}} for i in range(6)])
    await sign_in(client, client.secret_for(TOKEN))
    page = await client.http.get("/ui/profiles", params={"where": 'properties["plan"] == "pro" and properties["n"] > 1'})
    found = sorted(set(re.findall(r'href="/ui/profiles/(p\d)"', page.text)))
    assert found == ["p3", "p5"]


async def test_service_account_signs_in_to_its_projects_only(client: AppClient) -> None:
    await send(client, [{"$token": TOKEN, "$distinct_id": "s1", "$set": {"a": 1}}])
    await send(client, [{"$token": "other-token", "$distinct_id": "s2", "$set": {"a": 2}}])
    store = client.app.store
    mine = store.project_by_token(TOKEN)
    other = store.project_by_token("other-token")
    assert mine is not None and other is not None
    account, secret = store.create_service_account("ui-reader", [mine.id])
    credentials = f"{account.username}:{secret}"

    async def attempt(project_id: int, text: str) -> httpx.Response:
        page = await client.http.get("/ui/login")
        return await client.http.post(
            "/ui/login", data={"csrf": csrf_of(page.text), "secret": text, "project_id": str(project_id)}
        )

    assert (await attempt(other.id, credentials)).status_code == 401
    assert (await attempt(mine.id, f"{account.username}:wrong")).status_code == 401
    ok = await attempt(mine.id, credentials)
    assert ok.status_code == 303
    overview = await client.http.get("/ui/")
    assert f"(id {mine.id})" in overview.text
    assert f"<code>{TOKEN}</code>" in overview.text


async def test_static_files_are_served_and_any_other_name_is_404(client: AppClient) -> None:
    r = await client.http.get("/ui/static/ui.css")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
    # a name longer than the file system allows once gave a 500 (found by schemathesis)
    for name in ["x" * 300 + ".css", "%E1%B9%B0" * 200, "..%2Fweb.py", "", "nope.js", ".hidden"]:
        r = await client.http.get("/ui/static/" + name)
        assert r.status_code == 404, name


async def test_paths_under_ui_are_never_ingestion_routes(client: AppClient) -> None:
    """Ingestion answers under any prefix (/mp/engage), but not inside the web page's tree."""
    for path in ["/ui/static/record", "/ui/static/engage"]:
        r = await client.http.get(path)
        assert r.status_code == 404, path
    r = await client.http.get("/ui/track")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")  # a page
    r = await client.http.get("/mp/track")
    assert (r.status_code, r.text) == (200, "0")  # a prefixed event route still answers
