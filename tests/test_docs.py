"""docs/api.md documents exactly ``shears.__all__``, with true signatures; doc links resolve.

The format of docs/api.md, one entry per public name, under the section of its stage::

    ## Pruning (`shears.pruning`)            <- a section names the room in backticks

    ### `wanda_prune`                        <- the name, alone in backticks

    ```python
    wanda_prune(model, calibration=None, sparsity=None, *, pattern="unstructured", ...)
    ```                                      <- parameters without annotations, defaults
                                                as Python; the return annotation of
    One line saying what it does.               functions (classes show the constructor)

Signatures are compared as syntax trees, so line breaks, spaces and quote styles are free.
``python tests/test_docs.py NAME...`` prints the entries to paste (all missing ones without
arguments).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import re
import sys
import textwrap
from pathlib import Path

import pytest

import shears

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"
SECTION = re.compile(r"^## .*`shears\.(\w+)`")
ENTRY = re.compile(r"^### `(\w+)`\s*$")


# ---- what the code says -------------------------------------------------------------------

def room_of(name: str) -> str | None:
    """The stage a public name comes from: ``shears.pruning.wanda`` -> ``pruning``."""
    module = getattr(getattr(shears, name), "__module__", None)  # None for a constant
    return module.split(".")[1] if module and module.count(".") else None


def _default_text(obj, param: inspect.Parameter) -> str:
    """A default as Python source; a dataclass field's factory shows what it builds."""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        field = {f.name: f for f in dataclasses.fields(obj)}.get(param.name)
        if field is not None and field.default_factory is not dataclasses.MISSING:
            factory = field.default_factory
            return repr(factory()) if factory in (list, dict, set, tuple) else (
                f"{factory.__name__}()")
    text = repr(param.default)
    try:
        ast.parse(text, mode="eval")
    except SyntaxError:  # an object without a source form, such as <function f at 0x...>
        return "..."
    return text


def expected_signature(name: str) -> str:
    """``name(p, q=1, *, r=None) -> Ret`` from :func:`inspect.signature`, wrapped to 96."""
    obj = getattr(shears, name)
    if not callable(obj):
        return name  # a constant: its entry's code block is just the name
    sig = inspect.signature(obj)
    parts, star_done = [], False
    params = list(sig.parameters.values())
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
        if p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL):
            star_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.default is not p.empty:
            text += "=" + _default_text(obj, p)
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (
                i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    ret = ""
    if not inspect.isclass(obj) and sig.return_annotation is not sig.empty:
        ann = sig.return_annotation
        ret = " -> " + (ann if isinstance(ann, str) else inspect.formatannotation(ann))
    lines, line = [], name + "("
    for k, part in enumerate(parts):
        piece = part + (", " if k + 1 < len(parts) else ")")
        if len(line) + len(piece.rstrip()) > 96 and line.strip():
            lines.append(line.rstrip())
            line = " " * (len(name) + 1)
        line += piece
    if not parts:
        line += ")"
    lines.append(line + ret)
    return "\n".join(lines)


def section_hint(name: str) -> str:
    room = room_of(name)
    return f"(in the section `shears.{room}`)" if room else "(in any section)"


def expected_entry(name: str) -> str:
    """The whole entry to paste into docs/api.md (the description is the docstring's)."""
    doc = (inspect.getdoc(getattr(shears, name)) or "TODO: one line.").split("\n\n")[0]
    return (f"### `{name}`\n\n```python\n{expected_signature(name)}\n```\n\n"
            f"{' '.join(doc.split())}\n")


# ---- what docs/api.md says ----------------------------------------------------------------

@dataclasses.dataclass
class Entry:
    name: str
    room: str | None  # from the enclosing ``## ... (`shears.room`)`` section
    line: int
    code: str | None  # the first ```python block of the entry
    description: str


def parse_api(text: str) -> list[Entry]:
    entries: list[Entry] = []
    room, entry, fence, lang = None, None, None, ""
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if fence is None:  # a block opens
                fence, lang = [], line[3:].strip()
                continue
            if lang == "python" and entry is not None and entry.code is None:
                entry.code = "\n".join(fence)  # the entry's first python block
            fence = None
        elif fence is not None:
            fence.append(line)
        elif line.startswith("## "):
            m = SECTION.match(line)
            room, entry = (m.group(1) if m else None), None
        elif line.startswith("### "):
            m = ENTRY.match(line)
            assert m, f"docs/api.md:{n}: an entry heading is exactly ### `name`, got {line!r}"
            entry = Entry(m.group(1), room, n, None, "")
            entries.append(entry)
        elif entry is not None and entry.code is not None and line.strip():
            entry.description = (entry.description + " " + line.strip()).strip()
    return entries


def signature_tree(code: str) -> ast.FunctionDef:
    """``name(...) -> Ret`` parsed as the header of a ``def``: parameters, defaults, return."""
    fn = ast.parse(f"def {code.strip()}: ...").body[0]
    assert isinstance(fn, ast.FunctionDef)
    return fn


def _dump(node) -> str | None:
    return None if node is None else ast.dump(node)


def _defaults(args: ast.arguments) -> dict[str, ast.expr]:
    """Parameter name -> default expression, for the parameters that have one."""
    positional = args.posonlyargs + args.args
    with_default = positional[len(positional) - len(args.defaults):]
    out = {p.arg: d for p, d in zip(with_default, args.defaults, strict=True)}
    out.update({p.arg: d for p, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
                if d is not None})
    return out


def _same(x: ast.expr | None, y: ast.expr | None) -> bool:
    return _dump(x) == _dump(y)


def _src(node: ast.expr | None) -> str:
    return "none" if node is None else ast.unparse(node)


def compare(doc_code: str, name: str) -> list[str]:
    """Differences between a documented signature and the real one ([] when they agree)."""
    if not callable(getattr(shears, name)):
        return [] if doc_code.strip() == name else [f"a constant's block is just `{name}`"]
    try:
        doc = signature_tree(doc_code)
    except SyntaxError as e:
        return [f"it is not a parsable `name(...) -> Ret` line ({e.msg})"]
    real = signature_tree(expected_signature(name))
    problems = []
    if doc.name != name:
        problems.append(f"it documents `{doc.name}(...)`, not `{name}(...)`")
    a, b = doc.args, real.args
    for kind in ("posonlyargs", "args", "kwonlyargs"):
        got, want = [p.arg for p in getattr(a, kind)], [p.arg for p in getattr(b, kind)]
        if got != want:
            problems.append(f"{kind}: documented {got}, real {want}")
    for kind in ("vararg", "kwarg"):
        got, want = getattr(a, kind), getattr(b, kind)
        if (got and got.arg) != (want and want.arg):
            problems.append(f"{kind}: documented {got and got.arg}, real {want and want.arg}")
    got, want = _defaults(a), _defaults(b)
    for param in [p.arg for p in b.posonlyargs + b.args + b.kwonlyargs]:
        if not _same(got.get(param), want.get(param)):
            problems.append(f"default of {param}: documented {_src(got.get(param))}, "
                            f"real {_src(want.get(param))}")
    if any(p.annotation for p in a.posonlyargs + a.args + a.kwonlyargs):
        problems.append("parameters carry annotations (api.md shows names and defaults only)")
    if _dump(doc.returns) != _dump(real.returns):
        problems.append(f"return annotation: documented {_src(doc.returns)}, "
                        f"real {_src(real.returns)}")
    return problems


# ---- the tests ----------------------------------------------------------------------------

ENTRIES = parse_api(API.read_text(encoding="utf-8")) if API.exists() else []
DOCUMENTED = {e.name: e for e in ENTRIES}


def test_every_public_name_is_documented():
    missing = [n for n in shears.__all__ if n not in DOCUMENTED]
    assert not missing, "docs/api.md lacks public names; add, each under its section:\n\n" + (
        "\n".join(f"{section_hint(n)}\n{expected_entry(n)}" for n in missing))


def test_only_public_names_are_documented():
    extra = [f"{e.name} (docs/api.md:{e.line})" for e in ENTRIES if e.name not in shears.__all__]
    assert not extra, f"docs/api.md documents names not in shears.__all__: {extra}; remove " \
        "them, or export them from shears/__init__.py"


def test_no_name_is_documented_twice():
    seen = [e.name for e in ENTRIES]
    assert len(seen) == len(set(seen)), "documented twice: " + str(
        sorted({n for n in seen if seen.count(n) > 1}))


@pytest.mark.parametrize("name", sorted(shears.__all__))
def test_documented_entry_is_true(name):
    entry = DOCUMENTED.get(name)
    if entry is None:
        pytest.skip("missing; test_every_public_name_is_documented says what to add")
    where = f"docs/api.md:{entry.line} (`{name}`)"
    assert entry.code, f"{where}: no ```python signature block; add\n{expected_entry(name)}"
    problems = compare(entry.code, name)
    assert not problems, (f"{where}: the signature disagrees with inspect.signature: "
                          f"{'; '.join(problems)}. Replace the block's line with:\n\n"
                          f"{expected_signature(name)}")
    assert entry.description, f"{where}: add a one-line description after the signature"
    room = room_of(name)
    assert room is None or entry.room == room, (
        f"{where} sits in section `shears.{entry.room}`; move it to the section whose heading "
        f"names `shears.{room}`")


def test_parser_reads_the_documented_format():
    """The parser and comparer on a hand-written entry, right and wrong."""
    text = textwrap.dedent('''\
        ## Search (`shears.search`)

        ### `hill_climb`

        ```python
        hill_climb(space_or_model, evaluate, start=None, budget=50, seed=0,
                   maximize=True, neighbours=None, progress=True, resume=None,
                   estimate=None, max_params=None, checkpoint=None) -> SearchResult
        ```

        Hill-climb.
        ''')
    [entry] = parse_api(text)
    assert (entry.name, entry.room, entry.description) == ("hill_climb", "search", "Hill-climb.")
    assert compare(entry.code, "hill_climb") == []
    assert compare(entry.code.replace("budget=50", "budget=5"), "hill_climb") == [
        "default of budget: documented 5, real 50"]
    assert compare(entry.code.replace("evaluate,", "evaluate=None,"), "hill_climb") == [
        "default of evaluate: documented None, real none"]
    assert compare(entry.code.replace("seed=0,", ""), "hill_climb")[0].startswith("args:")
    assert compare(entry.code.replace("start", "begin"), "hill_climb")[0].startswith("args:")
    assert "return annotation" in compare(entry.code.replace(" -> SearchResult", ""),
                                          "hill_climb")[0]
    assert "annotations" in compare(entry.code.replace("evaluate,", "evaluate: int,"),
                                    "hill_climb")[0]


def test_expected_signature_round_trips_every_kind():
    """Keyword-only markers, *args/**kwargs and dataclass factories render as parsable code."""
    for name in ("wanda_prune", "NLSTrainer", "EvalResult", "sparsity_report"):
        assert compare(expected_signature(name), name) == []
    assert "*, pattern='unstructured'" in expected_signature("wanda_prune")
    assert "records=[]" in expected_signature("EvalResult")
    no_source = inspect.Parameter("fn", inspect.Parameter.KEYWORD_ONLY, default=print)
    assert _default_text(None, no_source) == "..."  # still a parsable signature
    assert expected_signature("NLSTrainer").startswith("NLSTrainer(*args, nls_sampler=")


def test_pipeline_figure_generator_runs(tmp_path):
    """docs/make_pipeline_figure.py draws docs/pipeline.svg; it must keep working."""
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("fig", ROOT / "docs" / "make_pipeline_figure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    svg = module.draw(tmp_path / "pipeline.svg").read_text()
    assert "wanda_prune" in svg and "NLSTrainer" in svg and "hill_climb" in svg  # text stays text
    assert (ROOT / "docs" / "pipeline.svg").exists()


# ---- links between the docs ---------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


if __name__ == "__main__":
    names = sys.argv[1:] or [n for n in shears.__all__ if n not in DOCUMENTED]
    for n in names:
        print(f"{section_hint(n)}\n{expected_entry(n)}")
