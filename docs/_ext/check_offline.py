"""Check that the built HTML docs load nothing from the network.

``make docs`` runs ``python docs/_ext/check_offline.py docs/_build/html`` after Sphinx. Opened
from disk with no network, every page must get its scripts, stylesheets and fonts from the build
itself: no ``<script src>`` or ``<link href>`` with an address on another host, no address in an
inline script (the MathJax configuration could point MathJax elsewhere) and no remote ``url()``
or ``@import`` in a stylesheet (that is how fonts are loaded). Links a reader clicks (``<a
href>``) are not loads, and neither is ``<link rel="canonical">``. Exits with status 1 and one
line per remote load.
"""

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

# An address on another host: with a scheme, or scheme-relative (``//host/path``).
REMOTE = re.compile(r"^\s*(?:https?:)?//", re.IGNORECASE)
ADDRESS_IN_TEXT = re.compile(r"https?://[^\s\"'<>)]+", re.IGNORECASE)
CSS_LOAD = re.compile(
    r"""url\(\s*["']?([^"')\s]+)|@import\s+["']([^"']+)["']""",
    re.IGNORECASE,
)


def _is_remote(address):
    return bool(REMOTE.match(address))


def remote_loads_in_css(text):
    """The remote addresses a stylesheet loads: fonts, images and imports."""
    return [
        address
        for match in CSS_LOAD.finditer(text)
        for address in match.groups()
        if address and _is_remote(address)
    ]


class _PageScanner(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.loads = []
        self._inside = None

    def handle_starttag(self, tag, attrs):
        attrs = {name: value or "" for name, value in attrs}
        rel = attrs.get("rel", "").lower().split()
        if tag == "script" and _is_remote(attrs.get("src", "")):
            self.loads.append(f"<script src={attrs['src']}>")
        elif tag == "link" and "canonical" not in rel and _is_remote(attrs.get("href", "")):
            self.loads.append(f"<link rel={' '.join(rel)} href={attrs['href']}>")
        if tag in ("script", "style"):
            self._inside = tag
        self.loads.extend(
            f"<{tag} style=...> url({address})"
            for address in remote_loads_in_css(attrs.get("style", ""))
        )

    def handle_endtag(self, tag):
        if tag == self._inside:
            self._inside = None

    def handle_data(self, data):
        if self._inside == "script":
            self.loads.extend(
                f"inline <script> names {found}" for found in ADDRESS_IN_TEXT.findall(data)
            )
        elif self._inside == "style":
            self.loads.extend(f"<style> url({found})" for found in remote_loads_in_css(data))


def remote_loads_in_page(html):
    """What one HTML page loads from the network, one description per load."""
    scanner = _PageScanner()
    scanner.feed(html)
    scanner.close()
    return scanner.loads


def remote_loads(html_dir):
    """``(path, description)`` for each remote load of the pages and stylesheets under
    ``html_dir``."""
    html_dir = Path(html_dir)
    found = []
    for path in sorted(html_dir.rglob("*.html")):
        page = path.read_text(encoding="utf-8")
        found.extend((path, load) for load in remote_loads_in_page(page))
    for path in sorted(html_dir.rglob("*.css")):
        css = path.read_text(encoding="utf-8")
        found.extend((path, f"url({address})") for address in remote_loads_in_css(css))
    return found


def main(argv):
    (html_dir,) = argv or ["docs/_build/html"]
    if not Path(html_dir, "index.html").is_file():
        print(f"check_offline: no built docs at {html_dir}", file=sys.stderr)
        return 2
    found = remote_loads(html_dir)
    for path, load in found:
        print(f"{path}: loads from the network: {load}", file=sys.stderr)
    if found:
        return 1
    print(f"check_offline: {html_dir} loads no script, stylesheet or font from the network")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
