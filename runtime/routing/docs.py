"""`hublab knowledge build`: documentation (HTML, man pages, Markdown, text) turned into a signed knowledge package.

    hublab knowledge build --from /usr/share/doc/python3.11/html/library --domain python
    hublab knowledge build --from ~/notes --domain general --out ~/packs/my-notes

Each document is read into sections (a heading or an anchor and its text: `python docs: os.path.join`,
`man ls(1): OPTIONS`), a section is cut into passages of about `--words` words at paragraph and sentence
boundaries, and every passage is embedded with the router's encoder (the one the knowledge packs and routing
use, so no second model on the device). The package directory holds:

- `<name>.jsonl`: one {"passage", "source"} record a line (the pack format of runtime/routing/knowledge.py);
- `<name>.<key>.npy`: the passages' embeddings, float16 (knowledge.sidecar names it);
- `knowledge.toml`: `[knowledge] domain`, `pack`, `passages`, `min_similarity` (what the runtime reads);
- `package.toml` + `package.sig`: the package manifest, signed as `hublab pkg build` signs.

It is written under a temporary name beside `--out` and renamed into place: a failed build leaves nothing.
Installed under a models directory (the default `--out`), the runtime adds its passages to every expert of
that domain (`domain = "*"`: to every expert).
"""
from __future__ import annotations

import fnmatch
import gzip
import html
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ..errors import HublabError

KNOWLEDGE_TOML = "knowledge.toml"
DOC_SUFFIXES = (".html", ".htm", ".md", ".markdown", ".txt", ".rst")
MAN_SECTION = re.compile(r"\.(\d[a-z]*)(\.gz)?$")  # ls.1, ls.1.gz, printf.3p.gz
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads", "static.files", "implementors", "src", "search"}
SKIP_PAGES = re.compile(r"^(genindex.*|py-modindex|search|searchindex|index|contents|copyright|about|bugs|"
                        r"download|license|print|toc|404|not_found|all|settings|help)\.html?$")


@dataclass
class Section:
    """A titled run of paragraphs from one document: the unit a passage's source names."""
    source: str
    paragraphs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# HTML

BLOCK = {"p", "div", "section", "article", "li", "dt", "dd", "tr", "table", "ul", "ol", "dl", "pre", "blockquote",
         "h1", "h2", "h3", "h4", "h5", "h6", "br", "hr", "main", "summary", "details", "figcaption", "td", "th"}
DROP = {"script", "style", "nav", "header", "footer", "noscript", "button", "form", "svg", "rustdoc-search",
        "rustdoc-toolbar", "template", "iframe", "select", "textarea"}
# Sphinx, rustdoc, mdBook and DocBook chrome (whole class names): sidebars, breadcrumbs, "source" links, permalinks.
DROP_CLASS = {"sphinxsidebar", "related", "footer", "headerlink", "sidebar", "sidebar-elems", "navheader", "navfooter",
              "menu-bar", "nav-chapters", "nav-wrapper", "mobile-nav-chapters", "src", "srclink", "rightside", "since",
              "out-of-band", "anchor", "search-container", "toc", "breadcrumb", "breadcrumbs", "skip-link",
              "sidebar-scrollbox"}
ANCHOR = re.compile(r"^(?:module-)?([A-Za-z_][\w.]*(?:::[\w]+)*|method\.\w+|tymethod\.\w+)$")


class _HTMLReader(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.h1 = ""
        self.sections: list[tuple[str, list[str]]] = [("", [])]
        self._skip: list[str] = []   # tags we are inside of and dropping, innermost last
        self._in_title = self._in_pre = False
        self._heading: str | None = None
        self._heading_text: list[str] = []
        self._buf: list[str] = []
        self._stack: list[str] = []

    def _flush(self) -> None:
        text = "".join(self._buf)
        text = text.strip("\n") if self._in_pre else re.sub(r"\s+", " ", text).strip()
        if text:
            self.sections[-1][1].append(text)
        self._buf = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"):
            if tag == "br" and not self._skip:
                self._buf.append("\n" if self._in_pre else " ")
            return
        self._stack.append(tag)
        if self._skip:
            self._skip.append(tag)
            return
        if (tag in DROP or a.get("role") in ("navigation", "search", "banner", "contentinfo")
                or DROP_CLASS.intersection((a.get("class") or "").split())
                or a.get("id") in ("sidebar", "searchbox", "menu-bar")):
            self._skip.append(tag)
            return
        if tag == "title":
            self._in_title = True
        if tag in BLOCK:
            self._flush()
        if tag == "pre":
            self._in_pre = True
        if tag in ("h1", "h2", "h3", "h4") or (tag == "dt" and ANCHOR.match(a.get("id") or "")):
            self._heading, self._heading_text = (a.get("id") or "") if tag == "dt" else tag, []
            self._flush()

    def handle_endtag(self, tag):
        if tag not in self._stack:
            return
        while self._stack:  # close tags left open inside it too
            top = self._stack.pop()
            if self._skip:
                self._skip.pop()
                if top == tag:
                    return
                continue
            if top == "title":
                self._in_title = False
            if self._heading is not None and top in ("h1", "h2", "h3", "h4", "dt"):
                self._end_heading()
            if top in BLOCK:
                self._flush()
            if top == "pre":
                self._in_pre = False
            if top == tag:
                return

    def _end_heading(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._heading_text)).strip().rstrip("¶#").strip()
        kind, self._heading = self._heading, None
        self._buf = []
        if kind == "h1" and not self.h1:
            self.h1 = text
            self.sections.append(("", []))
        elif kind in ("h1", "h2", "h3", "h4"):
            self.sections.append((text, []))
        else:  # a <dt id="os.path.join">: the anchor names the section; its signature is its first line
            self.sections.append((kind, [text] if text else []))

    def handle_data(self, data):
        if self._skip:
            return
        if self._in_title:
            self.title += data
        elif self._heading is not None:
            self._heading_text.append(data)
        else:
            self._buf.append(data)


def _page_name(title: str) -> str:
    """"os.path — Common pathname manipulations — Python 3.11.2 documentation" -> "os.path"."""
    first = re.split(r"\s+[—–|]\s+|\s+-\s+", title.strip(), maxsplit=1)[0].strip()
    # "3.1. Using Python as a Calculator", "Chapter 2. Debian package management"
    first = re.sub(r"^(?:Chapter\s+|Appendix\s+)?(?:[\dA-Z]+(?:\.\d+)*\.\s+|\d+(?:\.\d+)*\s+)", "", first)
    return re.sub(r"^(Module|Struct|Trait|Enum|Function|Macro|Primitive Type|Type Definition|Constant)\s+",
                  "", first).strip()


def read_html(path: Path, label: str) -> list[Section]:
    reader = _HTMLReader()
    reader.feed(_read_text(path))
    reader.close()
    reader._flush()
    page = _page_name(reader.h1 or reader.title) or path.stem
    out = []
    for heading, paragraphs in reader.sections:
        if not paragraphs:
            continue
        heading = _page_name(heading) if heading else ""
        if heading and (heading.startswith(page) or "." in heading or "::" in heading):
            name = heading  # os.path.join, std::vec::Vec
        elif heading and heading.lower() != page.lower():
            name = f"{page}: {heading}"
        else:
            name = page
        out.append(Section(f"{label}: {name}", paragraphs))
    return out


# ---------------------------------------------------------------------------------------------------
# man pages (roff, the man and a little of the mdoc macro set; groff is not needed, and is absent on many Pis)

ROFF_ESCAPES = [(r"\(em", "—"), (r"\(en", "–"), (r"\(aq", "'"), (r"\(dq", '"'), (r"\(lq", '"'), (r"\(rq", '"'),
                (r"\(oq", "'"), (r"\(cq", "'"), (r"\(bu", "•"), (r"\(co", "©"), (r"\(rg", "®"), (r"\(mu", "×"),
                (r"\(ti", "~"), (r"\(ha", "^"), (r"\(ga", "`"), (r"\(rs", "\\"), (r"\(at", "@"), (r"\(sh", "#"),
                (r"\(Fo", "«"), (r"\(Fc", "»"), (r"\(>=", "≥"), (r"\(<=", "≤"), (r"\(->", "→"), (r"\(de", "°"),
                (r"\*(lq", '"'), (r"\*(rq", '"'), (r"\*(Tm", "™"), (r"\*R", "®"),
                (r"\-", "-"), (r"\e", "\\"), (r"\&", ""), (r"\ ", " "), (r"\~", " "), (r"\0", " "), (r"\|", ""),
                (r"\^", ""), (r"\:", ""), (r"\%", ""), (r"\c", ""), (r"\/", ""), (r"\,", ""), (r"\)", ""),
                (r"\.", "."), (r"\'", "'"), (r"\`", "`"), (r"\t", " ")]
MDOC_DROP = {"Dd", "Os", "Bl", "El", "Ed", "Pp", "It", "Ek", "Bk", "Ns", "Bd", "Sm", "Lb"}


def _roff_text(s: str) -> str:
    s = re.sub(r"\\f(?:\[[^\]]*\]|\(..|.)", "", s)           # font changes
    s = re.sub(r"\\s[-+]?\d+|\\s\[[^\]]*\]", "", s)           # size changes
    s = re.sub(r"\\\[(\w+)\]", lambda m: {"em": "—", "en": "–", "aq": "'", "dq": '"', "bu": "•", "lq": '"',
                                          "rq": '"', "oq": "'", "cq": "'", "ti": "~", "ha": "^", "co": "©",
                                          "rs": "\\", "mu": "×"}.get(m.group(1), ""), s)
    for a, b in ROFF_ESCAPES:
        s = s.replace(a, b)
    s = re.sub(r"\\[hvwlLxXkoDzHSN]'[^']*'", "", s)           # motions and the like, with quoted arguments
    s = re.sub(r"\\\(..", "", s)                               # special characters we do not map
    s = re.sub(r"\\\*(?:\(..|.)", "", s)
    return s.replace("\\", "")


def _roff_args(rest: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') and a.endswith('"') and len(a) > 1 else a
            for a in re.findall(r'"[^"]*"|\S+', rest)]


def read_man(path: Path, label: str) -> list[Section]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    stem = path.name[:-3] if path.suffix == ".gz" else path.name
    name, _, sect = stem.rpartition(".")
    page = f"{name}({sect})"
    sections: list[Section] = []
    current = Section(f"{label} {page}")
    para: list[str] = []
    fill = True

    def flush() -> None:
        joined = ("\n" if not fill else " ").join(para).strip()
        if joined:
            current.paragraphs.append(joined if not fill else re.sub(r"\s+", " ", joined))
        para.clear()

    for line in text.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")) and len(line) > 1:
            m = re.match(r"[.'](\S+)\s*(.*)", line)
            if not m:
                continue
            macro, rest = m.group(1), m.group(2)
            args = _roff_args(rest)
            if macro in ("so",):
                continue
            if macro in ("TH", "Dt"):
                if args:
                    title = _roff_text(args[0])
                    page = f"{title.lower() if title.isupper() else title}({args[1] if len(args) > 1 else sect})"
                    current = Section(f"{label} {page}", current.paragraphs)
                continue
            if macro in ("SH", "SS", "Sh", "Ss"):
                flush()
                if current.paragraphs:
                    sections.append(current)
                title = _roff_text(" ".join(args)).strip()
                title = title.title() if title.isupper() else title
                current = Section(f"{label} {page}: {title}" if title else f"{label} {page}")
                continue
            if macro in ("PP", "LP", "P", "TP", "IP", "HP", "sp", "br", "Pp", "RS", "RE", "It", "Bl", "El"):
                flush()
                if macro == "IP" and args:
                    para.append(_roff_text(args[0]))
                if macro == "It" and args:
                    para.append(_roff_text(" ".join(a for a in args if a not in ("Fl", "Ar", "Cm", "Xo", "Op"))))
                continue
            if macro in ("nf", "EX", "Bd"):
                flush()
                fill = False
                continue
            if macro in ("fi", "EE", "Ed"):
                flush()
                fill = True
                continue
            if macro in ("B", "I", "SM", "SB"):
                para.append(_roff_text(" ".join(args)))
            elif macro in ("BR", "RB", "IR", "RI", "BI", "IB"):
                para.append(_roff_text("".join(args)))
            elif macro in ("Nm", "Fl", "Ar", "Cm", "Xr", "Pa", "Va", "Ev", "Li", "Op", "Dq", "Sq", "Ql", "Em", "Sy",
                           "Fn", "Ft", "Fa", "Nd", "Dl", "Er", "Ic", "Ad", "An", "Cd", "Dv", "Fd", "Lk", "Ms", "Ot",
                           "Pq", "St", "Tn", "Ux", "Xo", "Xc", "Aq", "Bq", "Brq", "Qq", "No"):
                words = [a for a in args if not re.fullmatch(r"[A-Z][a-z]{1,2}", a) or a in ("No",)]
                if macro == "Fl":
                    words = ["-" + w for w in words] or ["-"]
                if macro == "Nd":
                    words = ["—", *words]
                para.append(_roff_text(" ".join(words)))
            # any other request (.ad, .nh, .ds, .de, .if, .ie, .tr, .in, .ti, .ft, .ps, ...) carries no text
            continue
        para.append(_roff_text(line))
    flush()
    if current.paragraphs:
        sections.append(current)
    return sections


# ---------------------------------------------------------------------------------------------------
# Markdown and plain text

def read_markdown(path: Path, label: str) -> list[Section]:
    text = _read_text(path)
    page = path.stem
    sections: list[Section] = []
    current = Section(f"{label}: {page}")
    para: list[str] = []
    fence = False

    def flush() -> None:
        joined = ("\n" if fence else " ").join(para).strip()
        if joined:
            current.paragraphs.append(joined)
        para.clear()

    first_heading = True
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            flush()
            fence = not fence
            continue
        if fence:
            para.append(line)
            continue
        m = re.match(r"(#{1,4})\s+(.*?)\s*#*\s*$", line)
        if m:
            flush()
            if current.paragraphs:
                sections.append(current)
            title = _md_inline(m.group(2))
            if first_heading and len(m.group(1)) == 1:
                page = title
                current = Section(f"{label}: {page}")
            else:
                current = Section(f"{label}: {page}: {title}")
            first_heading = False
            continue
        if not line.strip():
            flush()
            continue
        para.append(_md_inline(re.sub(r"^\s*(?:[-*+]|\d+\.)\s+", "", line).strip()))
    flush()
    if current.paragraphs:
        sections.append(current)
    return sections


def _md_inline(s: str) -> str:
    s = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", s)     # links and images keep their text
    s = re.sub(r"<[^>]+>", "", s)                          # inline HTML
    s = re.sub(r"(\*\*|__)(.+?)\1", r"\2", s)
    return html.unescape(s)


def read_text(path: Path, label: str) -> list[Section]:
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", _read_text(path))]
    return [Section(f"{label}: {path.stem}", [p for p in paragraphs if p])]


def _read_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def reader_for(path: Path):
    """The reader of a documentation file, or None for a file that is not one (images, scripts, fonts)."""
    name = path.name.lower()
    plain = name[:-3] if name.endswith(".gz") else name
    if plain.endswith((".html", ".htm")):
        return read_html
    if plain.endswith((".md", ".markdown")):
        return read_markdown
    if plain.endswith((".txt", ".rst")):
        return read_text
    if MAN_SECTION.search(name) and path.parent.name.startswith("man"):
        return read_man
    return None


def find_docs(root: Path, include: list[str] | None = None) -> list[Path]:
    """The documentation files under a directory (or the file itself), in a stable order; with `include`, only
    those whose path under the directory matches one of its globs (`library/*`, `std/*index.html`)."""
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if reader_for(p) is not None and not SKIP_PAGES.match(name) and not name.startswith(".") and (
                    not include or any(fnmatch.fnmatchcase(p.relative_to(root).as_posix(), g) for g in include)):
                out.append(p)
    return out


def default_label(root: Path) -> str:
    """What a source is called in citations: known Debian documentation by its name, else the folder's."""
    s = str(root.resolve())
    for part, label in (("/python3", "python docs"), ("/rust-doc/html/book", "rust book"),
                        ("/rust-doc/html/std", "rust std"), ("/rust-doc", "rust docs"),
                        ("/debian-reference", "debian reference"), ("/share/man", "man")):
        if part in s:
            return label
    return (root.stem if root.is_file() else root.name) or "docs"


# ---------------------------------------------------------------------------------------------------
# Passages

def split_passages(section: Section, words: int, min_words: int = 12) -> list[str]:
    """Paragraphs joined up to about `words` words; a longer paragraph is cut at sentence ends."""
    pieces: list[str] = []
    for p in section.paragraphs:
        n = len(p.split())
        if n <= words:
            pieces.append(p)
            continue
        sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z`(\"'])", p) if "\n" not in p else p.split("\n")
        chunk: list[str] = []
        for s in sentences:
            if chunk and len(" ".join(chunk).split()) + len(s.split()) > words:
                pieces.append((" " if "\n" not in p else "\n").join(chunk))
                chunk = []
            if len(s.split()) > words:  # one giant sentence or line: cut by words
                w = s.split()
                pieces += [" ".join(w[i:i + words]) for i in range(0, len(w), words)]
            else:
                chunk.append(s)
        if chunk:
            pieces.append((" " if "\n" not in p else "\n").join(chunk))
    out: list[str] = []
    cur: list[str] = []
    for piece in pieces:
        if cur and len(" ".join(cur).split()) + len(piece.split()) > words:
            out.append("\n".join(cur))
            cur = []
        cur.append(piece)
    if cur:
        out.append("\n".join(cur))
    return [p for p in out if len(p.split()) >= min_words]


def read_passages(sources: list[Path], words: int, label: str | None = None,
                  include: list[str] | None = None) -> tuple[list[dict], int]:
    """{"passage", "source"} records from every documentation file under `sources` (duplicates dropped), and
    how many files were read."""
    seen: set[str] = set()
    records: list[dict] = []
    files = 0
    for root in sources:
        name = label or default_label(root)
        for path in find_docs(root, include):
            try:
                sections = reader_for(path)(path, name)
            except (OSError, EOFError, gzip.BadGzipFile, ValueError, AssertionError):
                continue  # an unreadable file among thousands: skipped, the count says how many were read
            files += 1
            carry: list[str] = []
            for sec in sections:
                if carry:  # a section too short to stand alone (a man page's NAME) leads the next one
                    sec = Section(sec.source, carry + sec.paragraphs)
                    carry = []
                texts = split_passages(sec, words)
                if not texts:
                    carry = sec.paragraphs
                for text in texts:
                    if text not in seen:
                        seen.add(text)
                        records.append({"passage": text, "source": sec.source})
    return records, files


# ---------------------------------------------------------------------------------------------------
# Building the package

@dataclass
class BuildResult:
    directory: str
    domain: str
    passages: int
    files: int
    pack_bytes: int
    index_bytes: int
    signed_by: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def build(sources: list[str | Path], domain: str, out: str | Path | None = None, *, words: int = 120,
          include: list[str] | None = None,
          label: str | None = None, name: str | None = None, passages: int = 1, min_similarity: float = 0.5,
          router_dir: str | Path | None = None, key: str | Path | None = None, sign: bool = True,
          config: str | Path | None = None, known_domains: list[str] | None = None) -> BuildResult:
    """Read the documentation under `sources`, embed its passages and write a signed knowledge package at `out`
    (default: <models_dir>/knowledge/<name>). Raises HublabError (one line: the path and the fix) on bad input,
    before anything is written."""
    from ..config import load_system, scan_models
    from ..pkg.author import build as build_package
    from .knowledge import embed_pack
    from .router import Router, default_router_dir

    roots = [Path(s).expanduser() for s in sources]
    if not roots:
        raise HublabError("knowledge build: no --from given; point it at a documentation directory or file")
    for r in roots:
        if not r.exists():
            raise HublabError(f"{r}: not found; give --from an existing documentation directory or file")
        if r.is_file() and reader_for(r) is None:
            raise HublabError(f"{r}: not a documentation file hublab reads; give an .html, .md, .txt or man page "
                              "(e.g. ls.1.gz under a man1/ folder)")
    if not 20 <= words <= 1000:
        raise HublabError(f"--words {words}: out of range; use 20 to 1000 words per passage")
    system = load_system(Path(config) if config else None)
    if known_domains is None:
        catalog = scan_models(system.model_dirs)
        known_domains = sorted({c.domain for c in catalog.models.values() if c.is_expert and c.domain})
    if domain != "*" and domain not in known_domains:
        raise HublabError(f"--domain {domain!r}: no expert has this domain; use one of {', '.join(known_domains)} "
                          "(or * for every expert)")
    name = name or f"{'shared' if domain == '*' else domain}-docs"
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
        raise HublabError(f"--name {name!r}: use lower-case letters, digits, '.', '_' or '-'")
    target = Path(out).expanduser() if out else Path(system.models_dir) / "knowledge" / name
    if target.exists() and not (target / KNOWLEDGE_TOML).is_file():
        raise HublabError(f"{target}: exists and is not a knowledge package; give --out a new or knowledge "
                          "package directory")
    rdir = Path(router_dir) if router_dir else default_router_dir(system)
    router = Router.load(rdir, [], threads=1)
    if not router.has_embedding:
        raise HublabError(f"{rdir}: the router has no embedding output; rebuild it with `hublab train router`")

    records, files = read_passages(roots, words, label, include)
    if not records:
        raise HublabError(f"{', '.join(map(str, roots))}: no readable documentation with text in it; point --from "
                          "at HTML, Markdown, text or man pages")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pack = tmp / f"{name}.jsonl"
        pack.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        side = embed_pack(pack, router.embed, router.encoder_id)
        (tmp / KNOWLEDGE_TOML).write_text(
            "# A knowledge package made by `hublab knowledge build`: documentation passages the runtime retrieves\n"
            "# into the prompt of every expert of this domain, cited in the answer.\n"
            f"[knowledge]\ndomain = {json.dumps(domain)}\npack = {json.dumps(pack.name)}\n"
            f"passages = {passages}            # how many passages go before the question\n"
            f"min_similarity = {min_similarity}     # least router-encoder cosine for a passage to be shown\n"
            f"words = {words}              # passage size it was built with\n"
            f"sources = {json.dumps([str(r) for r in roots])}\n", encoding="utf-8")
        (tmp / "package.toml").write_text(
            f'[package]\nname = {json.dumps(name)}\nversion = "1.0"\ncategory = "bundle"\n'
            f"description = {json.dumps(f'knowledge for {domain}: {len(records)} passages from {files} documents')}\n",
            encoding="utf-8")
        built = build_package(tmp, key=key, sign=sign)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(directory=str(target), domain=domain, passages=len(records), files=files,
                       pack_bytes=(target / pack.name).stat().st_size,
                       index_bytes=(target / side.name).stat().st_size, signed_by=built.signed_by)


# ---------------------------------------------------------------------------------------------------
# `hublab knowledge build ...`

def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("build", help="documentation -> a signed knowledge package for an expert's domain",
                       description="Read HTML, man pages, Markdown and text, cut them into passages, embed them "
                                   "with the router's encoder and write a signed knowledge package.")
    p.add_argument("--from", dest="sources", action="append", required=True, metavar="DIR|FILE",
                   help="documentation to read (repeatable)")
    p.add_argument("--domain", required=True, help="the experts' domain it serves (python, rust, ...; * = all)")
    p.add_argument("--out", help="package directory to write (default: <models_dir>/knowledge/<name>)")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="only files whose path under a --from folder matches (repeatable), e.g. 'library/*'")
    p.add_argument("--name", help="package name (default: <domain>-docs)")
    p.add_argument("--label", help="what citations call the source (default: from the path, e.g. 'python docs')")
    p.add_argument("--words", type=int, default=120, help="passage size in words (default 120)")
    p.add_argument("--passages", type=int, default=1, help="passages put before each question (default 1)")
    p.add_argument("--min-similarity", type=float, default=0.5, help="least cosine for a passage (default 0.5)")
    p.add_argument("--router", help="router directory whose encoder embeds (default: the runtime's)")
    p.add_argument("--key", help="signing key (default: hublab pkg keygen's, when there is one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cli(args) -> int:
    import signal

    # a build that is stopped (kill, systemd) unwinds like an error, so its temporary directory goes too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        res = build(args.sources, args.domain, args.out, words=args.words, include=args.include, label=args.label,
                    name=args.name, passages=args.passages, min_similarity=args.min_similarity, router_dir=args.router,
                    key=args.key, config=getattr(args, "config", None))
    except HublabError as exc:
        print(f"hublab knowledge build: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
    else:
        print(f"{res.directory}: {res.passages} passages from {res.files} documents for {res.domain}; "
              f"pack {res.pack_bytes / 1e6:.1f} MB + index {res.index_bytes / 1e6:.1f} MB; "
              + (f"signed by {res.signed_by}" if res.signed_by else "unsigned (no key: hublab pkg keygen)"))
    return 0
