"""The console in a real browser: Debian's chromium, headless, driven by selenium,
against a running `seg-fast serve` with real device sessions through it (the
mailbox simulator behind). Log in with the token, see the dashboard count the
devices, filter the list to blocked devices, blacklist a device from its detail
page and see its next real request get Status 129, start Dx for it and download
its log from the console (no password), bulk-whitelist a filter.

Skips, saying why, when chromium or chromedriver is not installed
(scripts/test.sh installs both).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import trio

from http_client import request
from redis_server import free_port
from seg_fast.policy.model import DeviceRecord, ManagedDevicePolicies, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.state import INBOX
from seg_fast.sim.tree import E, text
from processes import start_serve, stop_process

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (the test extra has it)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="Debian's chromium and chromium-driver are not installed "
                                       "(scripts/test.sh installs them)")

TOKEN = "browser-admin-token-Q4"
PASSWORD = "pw-Kx93-not-in-any-log"
FOLDERSYNC = E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))


def sync_req(key: str):
    """Inbox Sync; after the first, changes with HTML bodies."""
    return E("AirSync:Sync", E("AirSync:Collections", E(
        "AirSync:Collection", E("AirSync:SyncKey", key), E("AirSync:CollectionId", INBOX),
        E("AirSync:GetChanges") if key != "0" else None, E("AirSync:WindowSize", 50) if key != "0" else None,
        E("AirSync:Options", E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", 2))) if key != "0" else None)))


async def folder_sync(port: int, device_id: str) -> str:
    """The FolderSync Status (provisioning first when asked); "provision failed" while a
    policy change is still reaching the worker between the Provision steps."""
    c = EasClient("127.0.0.1", port, "jdoe", PASSWORD, device_id, version="14.1")
    try:
        r = await c.request("FolderSync", FOLDERSYNC)
        status = text(r.doc, "FolderHierarchy:Status")
        if status == "142":
            try:
                await c.provision()
            except ConnectionError:
                return "provision failed"
            r = await c.request("FolderSync", FOLDERSYNC)
            status = text(r.doc, "FolderHierarchy:Status")
        return status
    finally:
        await c.aclose()


def browser():
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


class Page:
    """Selenium calls in a thread (they block), so the simulator in this loop keeps serving."""

    def __init__(self, driver):
        self.d = driver

    async def run(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args)

    async def el(self, css):
        from selenium.webdriver.common.by import By
        return await self.run(self.d.find_element, By.CSS_SELECTOR, css)

    async def text(self, css) -> str:
        return await self.run(lambda: self.d.find_element("css selector", css).text)

    async def click(self, css):
        await self.run(lambda: self.d.find_element("css selector", css).click())

    async def accept_confirm(self):
        await self.until(lambda: self._alert() is not None)
        await self.run(lambda: self.d.switch_to.alert.accept())

    def _alert(self):
        try:
            return self.d.switch_to.alert
        except Exception:  # noqa: BLE001 - NoAlertPresentException
            return None

    async def until(self, check, timeout: float = 15.0, what: str = ""):
        with trio.fail_after(timeout):
            while True:
                try:
                    if await self.run(check):
                        return
                except Exception:  # noqa: BLE001 - element not there yet, stale
                    pass
                await trio.sleep(0.1)

    async def rows(self) -> list[str]:
        return await self.run(lambda: [tr.get_attribute("data-device") for tr in
                                       self.d.find_elements("css selector", "#device-rows tr")])


def shots_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("SEG_FAST_SCREENSHOTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


async def test_console_in_a_real_browser(tmp_path):
    store = SqliteStore(tmp_path / "policy.db")
    await store.open()
    await store.replace_all(PolicyDocument(managed=ManagedDevicePolicies(compromised=True)),
                            [DeviceRecord(device_id="BADPHONE", managed=True, compromised=True, platform="Apple"),
                             DeviceRecord(device_id="GOODPHONE", managed=True, compromised=False, platform="Apple")])
    await store.aclose()
    sim = MailboxSimulator(password=PASSWORD, seed=5, initial_messages=1)
    gw_port, admin_port = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {gw_port}\n'
            f'[upstream]\nurl = "http://127.0.0.1:{sim.port}"\n'
            f'[admin]\nport = {admin_port}\ntoken = "{TOKEN}"\n'
            f'[log]\ntransactions = "{tmp_path / "tx.jsonl"}"\n'
            f'[policy]\nsqlite_path = "{tmp_path / "policy.db"}"\n'
            f'[security]\nmaster_key_file = "{tmp_path / "mk"}"\nkey_state_file = "{tmp_path / "ks.json"}"\n')
        proc = start_serve(cfg, tmp_path)
        driver = None
        try:
            with trio.fail_after(20):
                while True:
                    assert proc.poll() is None
                    try:
                        if await folder_sync(gw_port, "GOODPHONE") == "1":
                            break
                    except OSError:
                        pass
                    await trio.sleep(0.2)
            assert await folder_sync(gw_port, "BADPHONE") == "129"
            # The sightings reach the store within a second (the worker's flush).
            with trio.fail_after(15):
                while True:
                    _, _, body = await request(admin_port, "GET", "/seg/console/dashboard", token=TOKEN)
                    if json.loads(body)["devices"] == 2 and json.loads(body)["by_status"].get("blocked") == 1:
                        break
                    await trio.sleep(0.2)
            driver = await trio.to_thread.run_sync(browser)
            page = Page(driver)
            base = f"http://127.0.0.1:{admin_port}"
            await page.run(driver.get, base + "/seg/admin")
            # Log in with the token; the page then holds a session cookie it cannot read.
            await page.until(lambda: driver.find_element("id", "token").is_displayed())
            await page.run(lambda: driver.find_element("id", "token").send_keys(TOKEN))
            await page.run(lambda: driver.find_element("id", "name").send_keys("selenium"))
            await page.click("#login")
            await page.until(lambda: driver.find_element("id", "dash-devices").text == "2")
            assert await page.text("#dash-blocked") == "1" and await page.text("#dash-allowed") == "1"
            assert await page.run(lambda: driver.execute_script("return document.cookie")) == ""   # HttpOnly
            # The last 24 hours drawn as SVG by the page's own script: a line per command, its
            # legend's total the FolderSyncs the server counted; a line for allowed devices.
            _, _, body = await request(admin_port, "GET", "/seg/console/series", token=TOKEN)
            counted = sum(json.loads(body)["series"]["requests_by_command"]["FolderSync"])
            assert counted >= 2

            def legend(family):
                return {s.get_attribute("data-key"): s.text for s in
                        driver.find_elements("css selector", f"#series-{family} .legend [data-key]")}
            await page.until(lambda: "FolderSync" in legend("requests_by_command"))
            shown = int(legend("requests_by_command")["FolderSync"].split()[-1])
            assert counted <= shown <= counted + 4        # (the page may have sampled a later FolderSync)
            lines = await page.run(lambda: driver.find_elements(
                "css selector", "#series-requests_by_command svg polyline[data-key=FolderSync]"))
            assert lines and await page.run(lambda: len(lines[0].get_attribute("points").split())) == 288
            await page.until(lambda: "allowed" in legend("devices_by_status"))
            assert await page.run(lambda: driver.find_elements(
                "css selector", "#series-devices_by_status svg [data-key=allowed]"))     # a line, or a dot
            await page.run(driver.save_screenshot, str(shots_dir(tmp_path) / "console-dashboard.png"))

            # Filter the list to blocked devices.
            await page.click("#tabs [data-tab=devices]")
            await page.until(lambda: len(driver.find_elements("css selector", "#device-rows tr")) == 2)
            await page.run(lambda: driver.find_element("css selector", "#f-status option[value=blocked]").click())
            await page.click("#apply")
            await page.until(lambda: [tr.get_attribute("data-device") for tr in
                                      driver.find_elements("css selector", "#device-rows tr")] == ["BADPHONE"])
            await page.run(driver.save_screenshot, str(shots_dir(tmp_path) / "console-list.png"))

            # The EAS version GOODPHONE spoke, from its transaction records alone (no Dx yet).
            with trio.fail_after(15):
                while True:
                    _, _, body = await request(admin_port, "GET", "/seg/console/device/GOODPHONE", token=TOKEN)
                    if json.loads(body).get("protocol_version"):
                        break
                    await trio.sleep(0.2)
            assert json.loads(body)["protocol_version"] == "14.1" and not json.loads(body)["identity"]
            # Blacklist GOODPHONE from its detail page; its next real request gets 129.
            await page.click("#clear")
            await page.until(lambda: len(driver.find_elements("css selector", "#device-rows tr")) == 2)
            await page.click("#device-rows tr[data-device=GOODPHONE]")
            await page.until(lambda: driver.find_element("id", "d-id").text == "GOODPHONE")
            await page.until(lambda: driver.find_elements("css selector", "#d-identity tr")[0].text
                             == "protocol version 14.1")
            await page.click("#d-blacklist")
            await page.accept_confirm()
            with trio.fail_after(15):
                while await folder_sync(gw_port, "GOODPHONE") != "129":
                    await trio.sleep(0.2)
            _, _, body = await request(admin_port, "GET", "/seg/console/audit", token=TOKEN)
            entries = json.loads(body)["entries"]
            assert any(e["action"] == "override" and e["override"] == "blacklist" and e["who"].startswith("selenium@")
                       for e in entries)
            # Run compliance for this one device from its detail page: audited with its id.
            await page.click("#d-compliance")
            with trio.fail_after(15):
                while True:
                    _, _, body = await request(admin_port, "GET", "/seg/console/audit", token=TOKEN)
                    runs = [e for e in json.loads(body)["entries"] if e["action"] == "run_compliance"]
                    if runs:
                        break
                    await trio.sleep(0.2)
            assert runs[0]["selected"] == ["GOODPHONE"] and runs[0]["devices"] == 1

            # Bulk-whitelist a filter (the compromised devices: BADPHONE alone), confirmed; it gets in.
            await page.click("#d-close")
            await page.run(lambda: driver.find_element("id", "f-reason").send_keys("blocked.device_compromised"))
            await page.click("#apply")
            await page.until(lambda: [tr.get_attribute("data-device") for tr in
                                      driver.find_elements("css selector", "#device-rows tr")] == ["BADPHONE"])
            await page.click("#bulk-whitelist")
            await page.accept_confirm()
            with trio.fail_after(15):
                while await folder_sync(gw_port, "BADPHONE") != "1":
                    await trio.sleep(0.2)
            _, _, body = await request(admin_port, "GET", "/seg/console/audit", token=TOKEN)
            bulk = [e for e in json.loads(body)["entries"] if e["action"] == "bulk_override"]
            assert bulk and bulk[0]["devices"] == ["BADPHONE"] and bulk[0]["override"] == "whitelist"
            # Dx over the same filter, confirmed: BADPHONE alone becomes a target.
            await page.click("#bulk-dx-start")
            await page.accept_confirm()
            with trio.fail_after(15):
                while True:
                    _, _, body = await request(admin_port, "GET", "/seg/dx", token=TOKEN)
                    if json.loads(body)["targets"]:
                        break
                    await trio.sleep(0.2)
            assert [(t["kind"], t["target"]) for t in json.loads(body)["targets"]] == [("device", "BADPHONE")]

            # Dx for GOODPHONE (blacklisted now) from the console, a session, the log downloaded through the page.
            await page.click("#clear")
            await page.until(lambda: len(driver.find_elements("css selector", "#device-rows tr")) == 2)
            await page.click("#device-rows tr[data-device=GOODPHONE]")
            await page.until(lambda: driver.find_element("id", "d-id").text == "GOODPHONE")
            await page.click("#d-dx-start")
            await page.until(lambda: driver.find_element("id", "d-dx-state").text.startswith("on until"))
            with trio.fail_after(15):
                while True:
                    assert await folder_sync(gw_port, "GOODPHONE") == "129"
                    log = await page.run(lambda: driver.execute_async_script(
                        "const done = arguments[0];"
                        "fetch(document.getElementById('d-dx-download').href, {credentials: 'same-origin'})"
                        ".then(r => r.text()).then(done, e => done('ERR ' + e));"))
                    if log.strip():
                        break
                    await trio.sleep(0.3)
            lines = [json.loads(x) for x in log.splitlines()]
            assert lines and {x["device_id"] for x in lines} == {"GOODPHONE"}
            assert all(x["decision"].startswith("blocked") for x in lines)
            assert PASSWORD not in log
            # Headers with Authorization cut to scheme and user; the WBXML both ways as XML.
            x = lines[-1]
            auth = [v for k, v in x["request_headers"] if k.lower() == "authorization"]
            assert auth and auth[0].startswith("Basic user=jdoe (")
            assert "<Status>129</Status>" in x["answer_xml"]     # a blocked request's body is never read
            # The detail page now shows the headers that identify it (from its last Dx line) and
            # its recent transactions (from the transaction log), as the log says.
            await page.click("#device-rows tr[data-device=GOODPHONE]")
            await page.until(lambda: "ms-asprotocolversion" in driver.find_element("id", "d-identity").text.lower())
            ident = await page.text("#d-identity")
            assert "14.1" in ident and "Basic user=jdoe" in ident and PASSWORD not in ident
            logged = [json.loads(t) for t in (tmp_path / "tx.jsonl").read_text().splitlines()]
            want = [t["command"] for t in logged if t.get("device_id") == "GOODPHONE"][::-1]
            shown = await page.run(lambda: [tr.get_attribute("data-command") for tr in
                                            driver.find_elements("css selector", "#d-recent-rows tr")])
            # Newest first, this device's only (lines flushed since the page read it come before).
            assert shown and "FolderSync" in shown and len(shown) <= 20
            assert any(want[k:k + len(shown)] == shown for k in range(len(want)))
            # An allowed device (BADPHONE, whitelisted above) through the admin API: the request's
            # WBXML too, and the mail server's answer with folder names cut to their sizes.
            status, _, _ = await request(admin_port, "POST", "/seg/dx",
                                         json.dumps({"kind": "device", "target": "BADPHONE"}).encode(), token=TOKEN)
            assert status == 200
            with trio.fail_after(15):
                while True:
                    assert await folder_sync(gw_port, "BADPHONE") in ("1", "provision failed")
                    _, _, raw = await request(admin_port, "GET", "/seg/dx/device/BADPHONE/log", token=TOKEN)
                    got = [json.loads(y) for y in raw.splitlines()]
                    # (a FolderSync may first be answered 142, before the device provisions)
                    fs = [y for y in got if y["command"] == "FolderSync" and "request_xml" in y
                          and "<Status>1</Status>" in y.get("answer_xml", "")]
                    if fs:
                        break
                    await trio.sleep(0.3)
            y = fs[-1]
            assert "<SyncKey>0</SyncKey>" in y["request_xml"] and "<Status>1</Status>" in y["answer_xml"]
            assert "<DisplayName>(" in y["answer_xml"] and "Inbox" not in y["answer_xml"]
            assert PASSWORD.encode() not in raw

            # Dx for a user from the Settings tab; a session with mail; the user's log downloaded
            # through the page holds the Sync both ways but neither the message nor the password.
            await page.click("#tabs [data-tab=settings]")
            await page.until(lambda: driver.find_element("id", "dx-target").is_displayed())
            from selenium.webdriver.support.ui import Select
            await page.run(lambda: Select(driver.find_element("id", "dx-kind")).select_by_visible_text("user"))
            await page.run(lambda: driver.find_element("id", "dx-target").send_keys("jdoe"))
            await page.click("#dx-start")
            await page.until(lambda: any(r.text.startswith("user jdoe") for r in
                                         driver.find_elements("css selector", "#dx-rows tr")))
            with trio.fail_after(15):        # the worker reads the targets once a second
                while True:
                    _, _, body = await request(admin_port, "GET", "/seg/stats", token=TOKEN)
                    if json.loads(body)["total"].get("dx_targets", 0) >= 3:     # two devices and jdoe
                        break
                    await trio.sleep(0.2)
            msg = sim.corpus.message(0)                    # the Inbox's one message
            c = EasClient("127.0.0.1", gw_port, "jdoe", PASSWORD, "BADPHONE", version="14.1")
            try:
                with trio.fail_after(20):
                    while True:
                        try:
                            await c.provision()
                            break
                        except ConnectionError:
                            await trio.sleep(0.2)
                    r = await c.request("Sync", sync_req("0"))
                    key = text(r.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:SyncKey")
                    r = await c.request("Sync", sync_req(key))
                    assert msg.subject.encode() in r.body        # the device got the message itself
            finally:
                await c.aclose()
            with trio.fail_after(15):
                while True:
                    ulog = await page.run(lambda: driver.execute_async_script(
                        "const done = arguments[0];"
                        "const a = [...document.querySelectorAll('#dx-rows a')].find(a => a.href.includes('/user/'));"
                        "fetch(a.href, {credentials: 'same-origin'}).then(r => r.text()).then(done, e => done('ERR ' + e));"))
                    got = [json.loads(z) for z in ulog.splitlines()]
                    syncs = [z for z in got if z["command"] == "Sync" and "<Commands>" in z.get("answer_xml", "")]
                    if syncs:
                        break
                    await trio.sleep(0.3)
            z = syncs[-1]
            assert {g["user"] for g in got} == {"jdoe"}
            assert any(k.lower() == "ms-asprotocolversion" for k, _ in z["request_headers"])
            assert "<Collections>" in z["request_xml"] and "<ApplicationData>" in z["answer_xml"]
            assert PASSWORD not in ulog and msg.subject not in ulog
            words = [w for w in msg.text.split() if len(w) > 8]
            assert words and not any(w in ulog for w in words[:20])
        finally:
            if driver is not None:
                await trio.to_thread.run_sync(driver.quit)
            stop_process(proc)
            nursery.cancel_scope.cancel()
