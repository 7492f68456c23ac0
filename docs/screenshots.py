"""Screenshots of the built docs at desktop and phone widths, and a check for clipped content.

Build the docs first; needs Debian's ``chromium`` (``apt-get install chromium``), nothing else::

    sphinx-build -W --keep-going -b html docs docs/_build/html
    python docs/screenshots.py                    # docs/_build/screenshots/<page>-<width>.png
    python docs/screenshots.py benchmarks.html    # chosen pages (relative to the HTML root)
    python docs/screenshots.py --check --all      # no pictures: list content sticking out, exit 1 if any

Pages are opened from ``file://`` in headless Chromium, driven over its DevTools pipe so that the
viewport is exactly 1280 or 390 CSS px wide (``--window-size`` cannot go below 500 px). A
screenshot is the whole page, up to ``--max-height`` px. ``--check`` lists, per page and width,
the elements that stick out past the right edge of the window or of their box, outside the boxes
that scroll sideways on purpose (code blocks, tables, displayed formulas).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
HTML = HERE / "_build" / "html"
OUT = HERE / "_build" / "screenshots"

PAGES = {
    "landing": "index.html",
    "api": "api.html",
    "api-function": "generated/kernelattn.linear_attention.html",
    "api-class": "generated/kernelattn.backends.torch_nn.LinearTransformerEncoderLayer.html",
    "gallery": "auto_examples/index.html",
    "gallery-timing": "auto_examples/plot_time_vs_n.html",
    "speed": "benchmarks.html",
}
WIDTHS = (1280, 390)

# Elements whose right edge passes the viewport's, or whose content spills out of their own box,
# unless a box between them and the article or sidebar scrolls sideways (those themselves do not
# count: a page or sidebar that has to be scrolled sideways is what we look for).
CHECK_JS = r"""
(() => {
  const W = document.documentElement.clientWidth, bad = [];
  const scrollsX = (el) => ["auto", "scroll"].includes(getComputedStyle(el).overflowX);
  const inScroller = (el) => {
    for (let a = el.parentElement; a && !a.matches(".bd-article-container, .bd-sidebar-primary, "
         + ".bd-sidebar-secondary") && a !== document.body; a = a.parentElement) if (scrollsX(a)) return true;
    return false;
  };
  const art = document.querySelector(".bd-article");
  const A = art ? art.getBoundingClientRect().right - parseFloat(getComputedStyle(art).paddingRight) : W;
  for (const el of document.querySelectorAll(".bd-header *, .bd-main *")) {
    const r = el.getBoundingClientRect(), cs = getComputedStyle(el);
    if (!r.width || !r.height || cs.visibility === "hidden" || el.matches("a.headerlink")) continue;
    const spill = !scrollsX(el) && el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1
                  && cs.display !== "inline" && !el.closest(".math, mjx-container");
    if (el.matches("mjx-assistive-mml, mjx-assistive-mml *")) continue;  // clipped on purpose, for screen readers
    const limit = art && art.contains(el) ? A : W;
    if ((r.right <= limit + 1 && !spill) || inScroller(el) || bad.some((b) => b.contains(el))) continue;
    bad.push(el);
  }
  return bad.map((e) => [e.tagName.toLowerCase() + (e.className ? "." + e.className : ""),
    Math.round(Math.max(e.getBoundingClientRect().right - (art && art.contains(e) ? A : W),
                     e.scrollWidth - e.clientWidth)),
    (e.textContent || "").trim().replace(/\s+/g, " ").slice(0, 60)]);
})()
"""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: apt-get install -y chromium")


class Browser:
    """Headless Chromium over ``--remote-debugging-pipe`` (JSON messages on fds 3 and 4)."""

    def __init__(self, executable: str):
        self.profile = tempfile.TemporaryDirectory()
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds():  # in the child: the pipe ends on fds 3 and 4, as Chromium expects
            r, w = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", "--remote-debugging-pipe",
             f"--user-data-dir={self.profile.name}", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4),
            stdout=subprocess.DEVNULL, stderr=None if os.environ.get("SCREENSHOTS_DEBUG") else subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)

    def _read(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply.get("method"))

    def wait_for(self, event: str) -> None:
        while event not in self.events:
            self.events.append(self._read().get("method"))
        self.events.clear()

    def open(self, url: str, width: int, height: int = 1000) -> None:
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=width < 600)
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")
        # let MathJax and the theme's scripts finish
        self.evaluate("new Promise(r => setTimeout(r, 800))")

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", session=True, expression=expression,
                        awaitPromise=True, returnByValue=True)
        return res["result"].get("value")

    def screenshot(self, out: pathlib.Path, width: int, max_height: int) -> None:
        height = min(int(self.evaluate("document.documentElement.scrollHeight")), max_height)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=width < 600)
        self.evaluate("new Promise(r => setTimeout(r, 300))")
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        out.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except RuntimeError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.profile.cleanup()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="pages relative to the HTML root (default: a fixed set)")
    parser.add_argument("--max-height", type=int, default=6000, help="longest screenshot in px (default 6000)")
    parser.add_argument("--check", action="store_true", help="list overflowing content instead of screenshots")
    parser.add_argument("--all", action="store_true", help="every page of the build")
    args = parser.parse_args(argv)
    if not (HTML / "index.html").exists():
        sys.exit(f"{HTML} is not built: run sphinx-build first")
    pages = {pathlib.Path(p).with_suffix("").as_posix().replace("/", "-"): p for p in args.pages} or PAGES
    if args.all:
        pages = {p.relative_to(HTML).with_suffix("").as_posix().replace("/", "-"): p.relative_to(HTML).as_posix()
                 for p in sorted(HTML.rglob("*.html")) if not p.relative_to(HTML).parts[0].startswith("_")}
    for page in pages.values():
        if not (HTML / page).exists():
            sys.exit(f"missing page: {HTML / page}")
    OUT.mkdir(parents=True, exist_ok=True)
    browser = Browser(find_chromium())
    problems = 0
    try:
        for name, page in pages.items():
            for width in WIDTHS:
                browser.open((HTML / page).as_uri(), width)
                if args.check:
                    for tag, px, text in browser.evaluate(CHECK_JS):
                        problems += 1
                        print(f"{page} @{width}px: {tag} sticks out {px} px: {text!r}")
                    continue
                out = OUT / f"{name}-{width}.png"
                browser.screenshot(out, width, args.max_height)
                print(out)
    finally:
        browser.close()
    if args.check:
        print(f"{len(pages)} pages x {len(WIDTHS)} widths: {problems} element(s) sticking out")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
