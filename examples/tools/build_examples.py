#!/usr/bin/env python3
"""Build the example data files under examples/ from locally installed
Debian documentation packages.

Runs fully offline, but needs these Debian packages installed (bookworm):

    apt-get install -y debian-faq git-doc debian-reference-common \
        debian-reference-en manpages man-db apt dpkg bash openssh-client \
        rsync tar

Outputs (relative to the examples/ directory):

    corpus.jsonl          unlabelled human-written documents
    gold/faq_pairs.jsonl  human-written FAQ question/answer pairs

seed.jsonl and DATA.md are written by hand and are not touched here.

Usage:
    python3 examples/tools/build_examples.py [--list-candidates] [--check]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent

FAQ_DIR = Path("/usr/share/doc/debian/FAQ")
REF_DIR = Path("/usr/share/doc/debian-reference-en/docs")
GIT_DIR = Path("/usr/share/doc/git-doc")

# Licence labels. Each one was read from the package's copyright file
# (/usr/share/doc/<pkg>/copyright) or, for man pages, from the page source.
LIC_DEBIAN_FAQ = ("Debian FAQ permission notice (verbatim and modified copies "
                  "permitted under an identical notice; Copyright Software in "
                  "the Public Interest)")
LIC_DEBIAN_REF = "GPL-2+"
LIC_GIT = "GPL-2"

# Chapter files of the Debian FAQ, in document order.
FAQ_FILES = [
    "basic-defs", "getting-debian", "choosing", "compatibility", "software",
    "ftparchives", "pkg-basics", "pkgtools", "uptodate", "kernel",
    "customizing", "support", "contributing", "redistributing",
    "nextrelease", "faqinfo",
]

# ---------------------------------------------------------------------------
# Minimal HTML -> DOM -> block list
# ---------------------------------------------------------------------------

VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base",
        "wbr", "source"}
SKIP_TAGS = {"script", "style", "head", "title"}
SKIP_CLASSES = {"toc", "navheader", "navfooter", "footnotes", "attribution",
                "list-of-tables", "list-of-figures", "list-of-examples"}
ADMONITIONS = {"note", "tip", "warning", "caution", "important"}
HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}


class Node:
    __slots__ = ("tag", "attrs", "children", "parent")

    def __init__(self, tag, attrs, parent):
        self.tag = tag
        self.attrs = dict(attrs)
        self.children = []
        self.parent = parent

    @property
    def classes(self):
        return set((self.attrs.get("class") or "").split())


class DomBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("root", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse_html(path: Path) -> Node:
    b = DomBuilder()
    b.feed(path.read_text(encoding="utf-8"))
    b.close()
    return b.root


def inline_text(node, pre=False) -> str:
    parts = []

    def walk(n):
        if isinstance(n, str):
            parts.append(n)
            return
        if n.tag in SKIP_TAGS or n.tag == "img":
            return
        if n.tag == "br":
            parts.append("\n" if pre else " ")
            return
        # footnote markers: <sup>[<a class="footnote">1</a>]</sup>
        if n.tag == "sup" and any(
                (not isinstance(c, str)) and "footnote" in c.classes
                for c in n.children):
            return
        if n.tag == "a" and "footnote" in n.classes:
            return
        for c in n.children:
            walk(c)

    walk(node)
    s = "".join(parts)
    if pre:
        return s.strip("\n")
    return norm_ws(s)


def norm_ws(s: str) -> str:
    s = s.replace("\u00a0", " ").replace("\u200b", "")
    return re.sub(r"\s+", " ", s).strip()


BLOCK_TAGS = {"p", "pre", "ul", "ol", "dl", "table", "div", "li", "dt", "dd",
              "blockquote"} | HEADINGS


def has_block_child(n: Node) -> bool:
    for c in n.children:
        if not isinstance(c, str) and c.tag in BLOCK_TAGS:
            return True
    return False


def heading_id(h: Node) -> str:
    if h.attrs.get("id"):
        return h.attrs["id"]
    for c in h.children:
        if not isinstance(c, str) and c.tag == "a":
            if c.attrs.get("id") or c.attrs.get("name"):
                return c.attrs.get("id") or c.attrs.get("name")
    # DocBook: <div class="section"><div class="titlepage">...<h2>
    p = h.parent
    while p is not None:
        if p.tag == "div" and ("section" in p.classes or "chapter" in p.classes
                               or "sect1" in p.classes) and p.attrs.get("id"):
            return p.attrs["id"]
        p = p.parent
    return ""


def blocks(root: Node):
    """Yield ('h', level, id, title) and ('b', kind, text) in document order.

    kinds: p, li, oli (ordered list item), pre, dt, dd, table
    """
    out = []

    def walk(n, ctx):
        if isinstance(n, str):
            t = norm_ws(n)
            if t and ctx.get("loose"):
                out.append(("b", ctx["loose"], t))
            return
        cls = n.classes
        if n.tag in SKIP_TAGS or cls & SKIP_CLASSES:
            return
        if n.tag in HEADINGS:
            if ctx.get("admon"):
                return  # "Note", "Tip" titles of admonitions
            out.append(("h", int(n.tag[1]), heading_id(n), inline_text(n)))
            return
        if n.tag == "div" and cls & ADMONITIONS:
            ctx = dict(ctx, admon=True)
        if "admonitionblock" in cls:  # asciidoc admonition
            ctx = dict(ctx, admon=True)
        if n.tag == "td" and "icon" in cls:
            return
        if n.tag == "table" and not ctx.get("admon") \
                and "navigation" not in cls:
            rows = []
            for tr in iter_tags(n, "tr"):
                cells = [inline_text(c) for c in tr.children
                         if not isinstance(c, str) and c.tag in ("td", "th")]
                rows.append(" | ".join(cells))
            out.append(("b", "table", "\n".join(rows)))
            return
        if n.tag == "pre":
            out.append(("b", "pre", inline_text(n, pre=True)))
            return
        if n.tag == "p":
            kind = ctx.get("list", "note" if ctx.get("admon") else "p")
            t = inline_text(n)
            owner = ctx.get("li")
            # several <p> directly inside one <li> form a single list item
            if owner is not None and out and out[-1][0] == "b" \
                    and len(out[-1]) > 3 and out[-1][3] == owner:
                out[-1] = ("b", out[-1][1], out[-1][2] + " " + t, owner)
            else:
                out.append(("b", kind, t, owner) if owner is not None
                           else ("b", kind, t))
            return
        if n.tag == "li":
            ctx = dict(ctx, li=id(n))
        elif n.tag in ("ul", "ol", "dl", "pre", "table"):
            ctx = dict(ctx, li=None)
        if n.tag in ("ul", "ol"):
            ctx = dict(ctx, list="oli" if n.tag == "ol" else "li")
        if n.tag in ("li", "dt", "dd") and not has_block_child(n):
            kind = {"li": ctx.get("list", "li"), "dt": "dt", "dd": "dd"}[n.tag]
            t = inline_text(n)
            if t:
                out.append(("b", kind, t))
            return
        if n.tag == "dt":
            out.append(("b", "dt", inline_text(n)))
            return
        if n.tag == "dd":
            ctx = dict(ctx, list="dd", loose="dd")
        for c in n.children:
            walk(c, ctx)

    walk(root, {})
    # merge: consecutive fragments produced from loose text are rare; keep
    return [b for b in out if not (b[0] == "b" and not b[2].strip())]


def iter_tags(n: Node, tag: str):
    for c in n.children:
        if isinstance(c, str):
            continue
        if c.tag == tag:
            yield c
        else:
            yield from iter_tags(c, tag)


def sections(blist):
    """Group a block list into sections, one per heading."""
    secs = []
    cur = None
    for b in blist:
        if b[0] == "h":
            cur = {"level": b[1], "id": b[2], "title": b[3], "items": []}
            secs.append(cur)
        elif cur is not None:
            cur["items"].append((b[1], b[2]))
    return secs


# ---------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------

def words(s: str) -> int:
    return len(s.split())


def slug(s: str) -> str:
    s = re.sub(r"^_+", "", s.lower())
    s = re.sub(r"_literal_", "_", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s


URL_RE = re.compile(r"(https?|ftp)://\S+")


def is_prose_para(t: str) -> bool:
    """A paragraph that reads as running prose."""
    if words(t) < 8:
        return False
    if not re.search(r"[.!?)\"'\u201d]$", t):
        return False
    if len(URL_RE.findall(t)) > 1:
        return False
    letters = sum(ch.isalpha() for ch in t)
    return letters / max(1, len(t)) > 0.6


def render_items(items, allow=("p", "note", "li", "oli", "pre", "dt", "dd")):
    """Render block items as clean text with paragraph breaks."""
    paras = []
    num = 0
    for kind, text in items:
        if kind not in allow:
            return None
        if kind == "oli":
            num += 1
            paras.append(f"{num}. {text}")
            continue
        num = 0
        if kind == "li":
            paras.append(f"- {text}")
        elif kind == "pre":
            lines = [ln.rstrip() for ln in text.splitlines()]
            paras.append("\n".join("    " + ln if ln else "" for ln in lines))
        else:
            paras.append(text)
    # list items belong together: join consecutive list lines with \n
    merged = []
    for p in paras:
        if merged and re.match(r"(- |\d+\. )", p) and \
                re.match(r"(- |\d+\. )", merged[-1].split("\n")[-1]):
            merged[-1] += "\n" + p
        else:
            merged.append(p)
    return "\n\n".join(merged)


def truncate_paras(text: str, max_words: int) -> str:
    """Cut text at a paragraph boundary so that it has <= max_words words.

    After a cut, trailing code blocks and paragraphs that do not end a
    sentence are dropped too, so the text never stops in mid-explanation.
    """
    paras = text.split("\n\n")
    out = []
    n = 0
    for p in paras:
        if n + words(p) > max_words:
            break
        out.append(p)
        n += words(p)
    while out and (out[-1].startswith("    ") or
                   not re.search(r"[.!?)\"']$", out[-1].rstrip())):
        out.pop()
    return "\n\n".join(out)


def drop_trailing_intro(text: str) -> str:
    """Drop final paragraphs that introduce material that is not there."""
    paras = text.split("\n\n")
    while paras and paras[-1].rstrip().endswith(":"):
        paras.pop()
    return "\n\n".join(paras)


def gold_ok(q: str, body: str) -> bool:
    if not (30 <= words(body) <= 350) or points_elsewhere(body):
        return False
    if "<" in body or "<" in q:       # e.g. "<foo>_<Version>", "git add <file>"
        return False
    for p in body.split("\n\n"):
        if re.match(r"^[.,;:)]", p.strip()):   # sentence split by a code block
            return False
    return True


def tidy(s: str) -> str:
    s = s.replace("\u2018", "'").replace("\u2019", "'")
    s = s.replace("\u201c", '"').replace("\u201d", '"')
    s = s.replace("\u2026", "...")
    # old-style `quotes' (Debian FAQ typography) -> 'quotes'
    s = re.sub(r"`([^`'\n]{1,40})'", r"'\1'", s)
    s = re.sub(r"[ \t]+\n", "\n", s)
    return s.strip()


# ---------------------------------------------------------------------------
# Debian FAQ
# ---------------------------------------------------------------------------

NUM_RE = re.compile(r"^(\d+(?:\.\d+)*)\.\s+")


def faq_sections():
    res = []
    for name in FAQ_FILES:
        path = FAQ_DIR / f"{name}.en.html"
        for s in sections(blocks(parse_html(path))):
            m = NUM_RE.match(s["title"])
            if not m:
                continue
            s["number"] = m.group(1)
            s["title"] = s["title"][m.end():].strip()
            s["file"] = name
            res.append(s)
    return res


def points_elsewhere(text: str) -> bool:
    urls = len(URL_RE.findall(text))
    w = words(text)
    if urls >= 3 or (urls and w / urls < 40):
        return True
    return False


# Debian FAQ sections excluded from the gold set after review (answer is
# mostly a list of links, only refers to another document, or is out of date
# to the point of being misleading out of context).
FAQ_GOLD_SKIP = {
    "faqinfo",          # whole chapter: about the FAQ document itself
}

# Individual question sections left out of the gold set after review: the
# answer only points to another document or web page.
FAQ_GOLD_SKIP_IDS = {
    "inst-disks", "cdrom", "missing", "ownrepository", "onlineresources",
    "pkgprogs", "searchtools",
    "whatisfaq",            # "What is this FAQ?" is about the document itself
}


def faq_gold():
    pairs = []
    for s in faq_sections():
        if s["file"] in FAQ_GOLD_SKIP:
            continue
        if "?" not in s["title"]:
            continue
        body = render_items(s["items"])
        if body is None:   # contains a table
            continue
        body = drop_trailing_intro(tidy(body))
        q = tidy(s["title"])
        if words(body) > 350:
            body = truncate_paras(body, 350)
        if s["id"] in FAQ_GOLD_SKIP_IDS or not gold_ok(q, body):
            continue
        pairs.append({
            "id": f"debian-faq-{s['file']}-{slug(s['id'])}",
            "instruction": q,
            "response": body,
            "source": f"debian-faq: /usr/share/doc/debian/FAQ/{s['file']}.en.html"
                      f" section {s['number']}",
            "license": LIC_DEBIAN_FAQ,
        })
    return pairs


# ---------------------------------------------------------------------------
# gitfaq (asciidoc source)
# ---------------------------------------------------------------------------

def asciidoc_inline(s: str) -> str:
    s = re.sub(r"linkgit:([\w.-]+)\[(\d)\]", r"\1(\2)", s)
    s = re.sub(r"link:[^\[\s]+\[([^\]]*)\]", r"\1", s)
    s = re.sub(r"<<[^,>]+,\s*([^>]+)>>", r"\1", s)
    s = re.sub(r"<<([^>]+)>>", r"\1", s)
    s = re.sub(r"(https?://\S+?)\[([^\]]*)\]", r"\2 (\1)", s)
    s = re.sub(r"`([^`]*)`", r"\1", s)
    s = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"\1", s)
    s = re.sub(r"(?<![\w_])_([^_\n]+)_(?![\w_])", r"\1", s)
    s = re.sub(r"(?<![\w'])'([^'\n]+)'(?![\w'])", r"\1", s)
    s = s.replace("{litdd}", "--").replace("&#8217;", "'")
    s = s.replace("(((", "").replace(")))", "")
    return s


def gitfaq_pairs():
    text = (GIT_DIR / "gitfaq.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    pairs = []
    i = 0
    anchor = None
    while i < len(lines):
        ln = lines[i]
        m = re.match(r"^\[\[([\w-]+)\]\]$", ln)
        if m:
            anchor = m.group(1)
            i += 1
            continue
        m = re.match(r"^(\S.*\?)::$", ln)
        if m and anchor:
            q = m.group(1)
            i += 1
            paras, cur, in_code, code = [], [], False, []
            while i < len(lines):
                ln = lines[i]
                if re.match(r"^\[\[[\w-]+\]\]$", ln) or (
                        not in_code and i + 1 < len(lines)
                        and re.match(r"^[A-Za-z]", ln)
                        and re.match(r"^[-=~]{3,}$", lines[i + 1])
                        and len(lines[i + 1]) == len(ln)):
                    break  # next anchor or a setext section heading
                if re.match(r"^-{4,}$", ln):
                    if in_code:
                        paras.append("\n".join("    " + c for c in code))
                        code, in_code = [], False
                    else:
                        if cur:
                            paras.append(" ".join(cur))
                            cur = []
                        in_code = True
                    i += 1
                    continue
                if in_code:
                    code.append(ln.replace("\t", "    "))
                elif ln.strip() in ("+", ""):
                    if cur:
                        paras.append(" ".join(cur))
                        cur = []
                else:
                    cur.append(ln.strip())
                i += 1
            if cur:
                paras.append(" ".join(cur))
            paras = [p if p.startswith("    ") else norm_ws(asciidoc_inline(p))
                     for p in paras]
            body = drop_trailing_intro(
                tidy("\n\n".join(p for p in paras if p.strip())))
            if words(body) > 350:
                body = truncate_paras(body, 350)
            anchor_used, anchor = anchor, None
            q = tidy(norm_ws(asciidoc_inline(q)))
            if not gold_ok(q, body):
                continue
            pairs.append({
                "id": f"gitfaq-{anchor_used}",
                "instruction": q,
                "response": body,
                "source": "git-doc: /usr/share/doc/git-doc/gitfaq.txt "
                          f"(anchor {anchor_used})",
                "license": LIC_GIT,
            })
            continue
        i += 1
    return pairs


# ---------------------------------------------------------------------------
# Corpus documents from HTML manuals
# ---------------------------------------------------------------------------

# Paragraphs that lean on a table, code block or figure that is not part of
# the document; they break a prose run.
BACKREF_RE = re.compile(
    r"\b(above|below|following|as follows|this example|the example|"
    r"as you can see|table \d+|figure \d+|example \d+|see the output)\b", re.I)
# Opening words that refer back to something outside the run.
OPENER_RE = re.compile(r"^(Here|These|This|That|Those|Then|So|Now|It|"
                       r"Also|Alternatively|Otherwise|Similarly|Note|However|"
                       r"In particular|More interestingly|Again|Further|"
                       r"Furthermore|Moreover|Thus|Therefore|Instead)\b")


def prose_runs(items):
    """Split a section's items into runs of consecutive prose paragraphs.

    A run that does not open the section must start with a capitalised
    paragraph (otherwise it is the tail of a sentence interrupted by a code
    block, e.g. "which will print ...").
    """
    runs, cur, start = [], [], True
    for idx, (kind, text) in enumerate(items):
        ok = (kind == "p" and is_prose_para(text)
              and not text.rstrip().endswith(":")
              and not BACKREF_RE.search(text))
        if ok and not cur and (OPENER_RE.match(text) or (
                not start and not re.match(r"[A-Z]", text))):
            ok = False
        if ok:
            cur.append(text)
        else:
            # a paragraph right before a code block, table or list usually
            # introduces it ("You can do this from the commandline.")
            if cur and kind in ("pre", "table", "li", "oli", "dt"):
                cur.pop()
            if cur:
                runs.append(cur)
            cur = []
            start = False
    if cur:
        runs.append(cur)
    return runs


def chunk_run(paras, lo=80, hi=400, target=250):
    """Group consecutive paragraphs into chunks of lo..hi words."""
    chunks, cur, n = [], [], 0
    for p in paras:
        w = words(p)
        if w > hi:
            if cur and n >= lo:
                chunks.append(cur)
            cur, n = [], 0
            continue
        if n + w > hi or (n >= target and cur):
            if n >= lo:
                chunks.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += w
    if cur and n >= lo:
        chunks.append(cur)
    return chunks


def html_corpus_candidates(path: Path, prefix: str, source_pkg: str,
                           license_: str, title_filter=None):
    cands = []
    for s in sections(blocks(parse_html(path))):
        if title_filter and not title_filter(s):
            continue
        sid = slug(s["id"]) or slug(s["title"])
        for k, chunk in enumerate(chunk_run_all(prose_runs(s["items"]))):
            text = tidy("\n\n".join(chunk))
            cands.append({
                "id": f"{prefix}-{sid}-{k + 1}",
                "text": text,
                "source": f"{source_pkg}: {path} section \"{tidy(s['title'])}\"",
                "license": license_,
                "_title": s["title"],
            })
    return cands


def chunk_run_all(runs):
    out = []
    for r in runs:
        out.extend(chunk_run(r))
    return out


# ---------------------------------------------------------------------------
# Man pages
# ---------------------------------------------------------------------------

def render_man(page: str, section: str) -> list[str]:
    env = dict(os.environ, MANWIDTH="4000", MAN_KEEP_FORMATTING="0",
               LANG="C.UTF-8", LC_ALL="C.UTF-8")
    raw = subprocess.run(["man", "--nh", "--nj", "-P", "cat", section, page],
                         capture_output=True, text=True, env=env,
                         check=True).stdout
    col = subprocess.run(["col", "-bx"], input=raw, capture_output=True,
                         text=True, check=True).stdout
    return col.splitlines()


def man_section_paras(page, section, heading, sub=None, max_paras=None):
    """Leading prose paragraphs of a man page section (or subsection).

    Paragraphs are the lines at the section's base indent (man(7) pages are
    rendered with 7 spaces, mdoc(7) pages with 5); collection stops at the
    first more deeply indented block (option list, example, syntax).
    """
    lines = render_man(page, section)
    paras, on, in_sub, base = [], False, sub is None, None
    for ln in lines:
        if re.match(r"^[A-Z]", ln):            # section heading
            if on and paras:
                break
            on = ln.strip() == heading
            continue
        if not on or not ln.strip():
            continue
        indent = len(ln) - len(ln.lstrip(" "))
        if indent <= 3:                        # subsection heading
            if in_sub and paras:
                break
            in_sub = sub is None or ln.strip() == sub
            continue
        if not in_sub:
            continue
        if base is None:
            base = indent
        if indent == base:
            paras.append(norm_ws(ln))
        elif paras:
            break
    if max_paras:
        paras = paras[:max_paras]
    return paras


def man_license(page, section, pkg):
    src = subprocess.run(["man", "-w", section, page], capture_output=True,
                         text=True, check=True).stdout.strip()
    with gzip.open(src, "rt", encoding="utf-8", errors="replace") as f:
        head = f.read(4000)
    m = re.search(r"SPDX-License-Identifier:\s*(\S+)", head)
    if m:
        return m.group(1), src
    m = re.search(r"%%%LICENSE_START\(([^)]+)\)", head)
    if m:
        return f"man-pages {m.group(1)}", src
    if re.search(r"GNU General Public License.*\n.*version 3", head):
        return "GPL-3+", src
    return copyright_files_star(pkg), src


def copyright_files_star(pkg):
    txt = Path(f"/usr/share/doc/{pkg}/copyright").read_text(encoding="utf-8")
    m = re.search(r"^Files: \*\s*\n(?:.*\n)*?License: (\S+)", txt, re.M)
    return m.group(1) if m else "see /usr/share/doc/%s/copyright" % pkg


# (page, section, package, heading, subsection, max_paras)
MAN_DOCS = [
    ("apt", "8", "apt", "DESCRIPTION", None, None),
    ("sources.list", "5", "apt", "ONE-LINE-STYLE FORMAT", None, None),
    ("dpkg", "1", "dpkg", "DESCRIPTION", None, None),
    ("bash", "1", "bash", "INVOCATION", None, None),
    ("bash", "1", "bash", "ALIASES", None, None),
    ("bash", "1", "bash", "FUNCTIONS", None, None),
    ("bash", "1", "bash", "EXIT STATUS", None, None),
    ("bash", "1", "bash", "COMMAND EXECUTION ENVIRONMENT", None, None),
    ("ssh", "1", "openssh-client", "DESCRIPTION", None, None),
    ("ssh", "1", "openssh-client", "X11 FORWARDING", None, None),
    ("ssh-keygen", "1", "openssh-client", "KEY REVOCATION LISTS", None, None),
    ("rsync", "1", "rsync", "DESCRIPTION", None, None),
    ("rsync", "1", "rsync", "BATCH MODE", None, None),
    ("tar", "1", "tar", "DESCRIPTION", None, None),
    ("man", "1", "man-db", "DESCRIPTION", None, None),
    ("pipe", "7", "manpages", "DESCRIPTION", None, None),
    ("environ", "7", "manpages", "DESCRIPTION", None, None),
    ("time", "7", "manpages", "DESCRIPTION", None, None),
]


def man_candidates():
    cands = []
    for page, sec, pkg, heading, sub, maxp in MAN_DOCS:
        try:
            paras = man_section_paras(page, sec, heading, sub, maxp)
        except subprocess.CalledProcessError:
            print(f"warning: man page {page}({sec}) not available",
                  file=sys.stderr)
            continue
        keep = []
        for p in paras:          # leading prose only
            if not is_prose_para(p):
                break
            keep.append(p)
        # the last paragraph before an option list or example introduces it
        while keep and BACKREF_RE.search(keep[-1]):
            keep.pop()
        text = drop_trailing_intro(tidy("\n\n".join(keep)))
        if words(text) > 400:
            text = truncate_paras(text, 400)
        if words(text) < 80:
            continue
        lic, src = man_license(page, sec, pkg)
        part = slug(heading + ("-" + sub if sub else ""))
        cands.append({
            "id": f"man-{page}-{sec}-{part}",
            "text": text,
            "source": f"{pkg}: {src} ({page}({sec}) {heading}"
                      + (f" / {sub}" if sub else "") + ")",
            "license": lic,
            "_title": heading,
        })
    return cands


# ---------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------

def ngrams(text, n=8):
    toks = re.findall(r"\w+", text.lower())
    return {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def all_corpus_candidates():
    c = []
    for ch in sorted(REF_DIR.glob("ch*.en.html")):
        c += html_corpus_candidates(ch, f"debian-reference-{ch.name[:4]}",
                                    "debian-reference-en", LIC_DEBIAN_REF)
    c += html_corpus_candidates(GIT_DIR / "user-manual.html",
                                "git-user-manual", "git-doc", LIC_GIT)
    for name in ("gittutorial", "gittutorial-2", "gitcore-tutorial",
                 "giteveryday"):
        c += html_corpus_candidates(GIT_DIR / f"{name}.html", name,
                                    "git-doc", LIC_GIT)
    c += glossary_candidates()
    # Debian FAQ sections that are not questions (never in the gold set)
    for s in faq_sections():
        if "?" in s["title"] or s["file"] == "faqinfo":
            continue
        for k, chunk in enumerate(chunk_run_all(prose_runs(s["items"]))):
            c.append({
                "id": f"debian-faq-{s['file']}-{slug(s['id'])}-{k + 1}",
                "text": tidy("\n\n".join(chunk)),
                "source": f"debian-faq: /usr/share/doc/debian/FAQ/"
                          f"{s['file']}.en.html section {s['number']}",
                "license": LIC_DEBIAN_FAQ,
                "_title": s["title"],
            })
    c += man_candidates()
    return c


def glossary_candidates():
    """gitglossary entries whose definition is 80-400 words of prose."""
    bl = blocks(parse_html(GIT_DIR / "gitglossary.html"))
    entries, cur = [], None
    for b in bl:
        if b[0] != "b":
            continue
        if b[1] == "dt":
            cur = {"term": b[2], "defs": [], "ok": True}
            entries.append(cur)
        elif cur is not None:
            if b[1] in ("dd", "p") and is_prose_para(b[2]) \
                    and not b[2].endswith(":"):
                cur["defs"].append(b[2])
            else:
                cur["ok"] = False
    cands = []
    for e in entries:
        if not e["ok"] or not e["defs"]:
            continue
        text = tidy(e["term"] + "\n\n" + "\n\n".join(e["defs"]))
        if 80 <= words(text) <= 400:
            cands.append({
                "id": f"gitglossary-{slug(e['term'])}",
                "text": text,
                "source": "git-doc: /usr/share/doc/git-doc/gitglossary.html"
                          f" entry \"{e['term']}\"",
                "license": LIC_GIT,
                "_title": e["term"],
            })
    return cands


def load_selection():
    path = HERE / "corpus_selection.txt"
    if not path.exists():
        return None
    sel = []
    for ln in path.read_text().splitlines():
        ln = ln.split("#", 1)[0].strip()
        if ln:
            sel.append(ln)
    return sel


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            r = {k: v for k, v in r.items() if not k.startswith("_")}
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build(list_candidates=False):
    gold = faq_gold() + gitfaq_pairs()
    gold_ids = [g["id"] for g in gold]
    assert len(gold_ids) == len(set(gold_ids)), "duplicate gold ids"
    cands = all_corpus_candidates()
    # drop any candidate sharing an 8-gram with a gold response/question
    gold_grams = set()
    for g in gold:
        gold_grams |= ngrams(g["response"]) | ngrams(g["instruction"])
    cands = [c for c in cands if not (ngrams(c["text"]) & gold_grams)]
    if list_candidates:
        for c in cands:
            print(json.dumps({"id": c["id"], "words": words(c["text"]),
                              "title": c["_title"],
                              "start": c["text"][:160]}, ensure_ascii=False))
        print(f"{len(cands)} corpus candidates, {len(gold)} gold pairs",
              file=sys.stderr)
        return
    sel = load_selection()
    by_id = {c["id"]: c for c in cands}
    if sel is None:
        corpus = cands
    else:
        missing = [s for s in sel if s not in by_id]
        if missing:
            sys.exit(f"selected corpus ids not found: {missing}")
        corpus = [by_id[s] for s in sel]
    write_jsonl(EXAMPLES / "corpus.jsonl", corpus)
    write_jsonl(EXAMPLES / "gold" / "faq_pairs.jsonl", gold)
    print(f"wrote {len(corpus)} corpus docs, {len(gold)} gold pairs")


# ---------------------------------------------------------------------------
# Validation of all example files
# ---------------------------------------------------------------------------

MARKUP_RE = re.compile(r"<[A-Za-z/!]|\\f|::|&amp;|&lt;|&gt;|&#\d+;|\blinkgit:")


def check():
    errors = []
    specs = {
        "corpus.jsonl": (["id", "text", "source", "license"], "text", 80, 400),
        "seed.jsonl": (["instruction", "response"], "response", 60, 200),
        "gold/faq_pairs.jsonl": (["id", "instruction", "response", "source",
                                  "license"], "response", 30, 350),
    }
    texts_by_file = {}
    for name, (fields, tfield, lo, hi) in specs.items():
        path = EXAMPLES / name
        if not path.exists():
            errors.append(f"{name}: missing")
            continue
        ids, texts = set(), set()
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8")
                                 .splitlines(), 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{name}:{n}: bad JSON: {e}")
                continue
            rows.append(r)
            for f in fields:
                if not isinstance(r.get(f), str) or not r[f].strip():
                    errors.append(f"{name}:{n}: empty field {f}")
            t = r.get(tfield, "")
            w = words(t)
            if not lo <= w <= hi:
                errors.append(f"{name}:{n}: {tfield} has {w} words")
            if "id" in fields:
                if r.get("id") in ids:
                    errors.append(f"{name}:{n}: duplicate id {r.get('id')}")
                ids.add(r.get("id"))
            if t in texts:
                errors.append(f"{name}:{n}: duplicate text")
            texts.add(t)
            for f in fields:
                v = r.get(f, "")
                if f in ("source",):
                    continue
                m = MARKUP_RE.search(v)
                if m:
                    errors.append(f"{name}:{n}: markup {m.group(0)!r} in {f}")
            if re.search(r"\n{3,}|[ \t]\n", t):
                errors.append(f"{name}:{n}: unnormalised whitespace")
        texts_by_file[name] = rows
        print(f"{name}: {len(rows)} rows")
    # corpus must not overlap gold
    gold = texts_by_file.get("gold/faq_pairs.jsonl", [])
    corpus = texts_by_file.get("corpus.jsonl", [])
    gg = set()
    for g in gold:
        gg |= ngrams(g.get("response", "")) | ngrams(g.get("instruction", ""))
    for c in corpus:
        if ngrams(c.get("text", "")) & gg:
            errors.append(f"corpus {c.get('id')}: shares an 8-gram with gold")
    for e in errors:
        print("ERROR", e)
    print("OK" if not errors else f"{len(errors)} problems")
    return not errors


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--list-candidates", action="store_true",
                    help="print every corpus candidate instead of writing")
    ap.add_argument("--check", action="store_true",
                    help="only validate the files in examples/")
    a = ap.parse_args()
    if a.check:
        sys.exit(0 if check() else 1)
    build(list_candidates=a.list_candidates)
    if not a.list_candidates:
        sys.exit(0 if check() else 1)


if __name__ == "__main__":
    main()
