"""Griffe extension for the API reference: anyfork's Sphinx-style docstrings, rendered right.

anyfork writes its docstrings as anyio does, in reST: ``:param:`` and ``:raises:`` fields,
``:class:`Future``` roles, ``Example::`` literal blocks, ``.. versionadded::``. They read well
in ``help()``, in editors and in the source. mkdocstrings reads the fields with griffe's Sphinx
parser but renders the rest as Markdown, where a role is literal text and anything after the
field list is swallowed by the last field. Once griffe has loaded the package, this extension
rewrites each docstring for the reference:

- Python roles become autorefs links, resolved as Sphinx resolves them (the current class, the
  enclosing scopes, the package's public names, then absolute paths) to the documented public
  path. A target that is anyfork's but not in the reference stays a plain autoref, so
  ``mkdocs build --strict`` fails on it. Standard library and other packages' names render as
  code, and link only where an inventory is configured (none is: the docs build offline).
- Literal blocks (``Example::``) and ``code-block`` directives become fenced code.
- ``versionadded``, ``versionchanged``, ``deprecated``, ``note``, ``warning``, ``tip``,
  ``important`` and ``seealso`` become admonitions.
- Text after the field list becomes a section after the Parameters/Returns/Raises tables, in
  source order, instead of part of the last field's description.
- The exception types of Raises tables link to their entries.

Anything else that is reST only is left as is; ``docs/_ext/check_site.py``, run by
``nox -s docs``, fails the build on what of it shows in the site.
"""

from __future__ import annotations

import builtins
import html
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|mod|data|attr|exc|obj|const|type):`(?P<content>[^`]+)`"
)
CALLABLE_ROLES = frozenset({"func", "meth"})  # Sphinx adds "()" to their titles
EXPLICIT_TITLE = re.compile(r"(?P<title>.+?)\s*<(?P<target>[^<>]+)>", re.DOTALL)
FIELD = re.compile(r":[^:\s][^:]*:(?:\s|$)")  # a field list item, at the start of a line
DIRECTIVE = re.compile(r"(?P<indent>\s*)\.\. (?P<name>[a-z-]+)::(?:\s+(?P<argument>.*))?$")
ADMONITIONS = {
    "versionadded": ("note", "Added in version {}"),
    "versionchanged": ("note", "Changed in version {}"),
    "deprecated": ("warning", "Deprecated since version {}"),
    "note": ("note", "Note"),
    "warning": ("warning", "Warning"),
    "tip": ("tip", "Tip"),
    "important": ("warning", "Important"),
    "seealso": ("info", "See also"),
}
VERSIONED = frozenset({"versionadded", "versionchanged", "deprecated"})
CODE_DIRECTIVES = frozenset({"code-block", "code", "sourcecode"})
NOT_OURS = frozenset(dir(builtins)) | frozenset(sys.stdlib_module_names)
LOOKUP_ERRORS = (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError)


class SphinxDocstrings(griffe.Extension):
    """Rewrite the package's docstrings once it is loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        resolver = Resolver(pkg)
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring = ReferenceDocstring(obj.docstring, resolver)


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not isinstance(member, griffe.Alias):  # documented where it is defined
            yield from _objects(member)


class Resolver:
    """Find what a role names, and the path under which the reference documents it."""

    def __init__(self, package: griffe.Module) -> None:
        self.package = package
        # What the package re-exports from its private modules: canonical -> public path.
        self.public: dict[str, str] = {}
        for name, member in package.members.items():
            if isinstance(member, griffe.Alias) and member.is_public:
                try:
                    target = member.final_target
                except LOOKUP_ERRORS:
                    continue
                self.public.setdefault(target.path, f"{package.path}.{name}")

    def find(self, target: str, context: griffe.Object | None) -> griffe.Object | None:
        scopes: list[Any] = []
        while context is not None:
            if context.is_class or context.is_module:
                scopes.append(context)
            context = context.parent
        # Like Sphinx with the public module as the current module: anyfork.Future documents
        # anyfork._future.Future, so "Future.value" in _errors.py means anyfork.Future.value.
        scopes += [self.package, self.package.modules_collection]
        for scope in scopes:
            try:
                found = scope[target]
                return found.final_target if isinstance(found, griffe.Alias) else found
            except LOOKUP_ERRORS:
                continue
        return None

    def documented_path(self, obj: griffe.Object) -> str:
        parts = obj.path.split(".")
        for end in range(len(parts), 0, -1):
            public = self.public.get(".".join(parts[:end]))
            if public is not None:
                return ".".join([public, *parts[end:]])
        return obj.path

    def is_ours(self, target: str, context: griffe.Object | None) -> bool:
        """Whether an unresolved target can only mean something of anyfork's."""
        first = target.split(".", 1)[0]
        if first == self.package.name or self.find(first, context) is not None:
            return True  # anyfork.Nope, Future.nope
        return "." not in target and first not in NOT_OURS  # not a builtin or stdlib module

    def link(self, role: str, content: str, context: griffe.Object | None) -> str:
        """The Markdown for one role."""
        explicit = EXPLICIT_TITLE.fullmatch(content)
        if explicit:
            title, target = explicit["title"], explicit["target"].lstrip("~.")
        else:
            target = content.lstrip("!~.")  # "." asks for a relative lookup: find's first try
            title = target.rsplit(".", 1)[-1] if content.lstrip("!").startswith("~") else target
            if role in CALLABLE_ROLES:
                title += "()"
            if content.startswith("!"):
                return f"`{title}`"
        found = self.find(target, context)
        if found is not None:
            return f"[`{title}`][{self.documented_path(found)}]"
        if self.is_ours(target, context):
            # Not in the reference: autorefs reports it and the strict build fails.
            return f"[`{title}`][{target}]"
        return (
            f'<autoref identifier="{html.escape(target)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>"
        )

    def raised(self, name: str, context: griffe.Object | None) -> griffe.ExprName:
        """A Raises table's exception type, as a name mkdocstrings links."""
        found = self.find(name, context)
        if found is None:
            return griffe.ExprName(name)  # builtins link through an inventory, if any
        parent, _, last = self.documented_path(found).rpartition(".")
        return griffe.ExprName(last, parent=parent)


class ReferenceDocstring(griffe.Docstring):
    """A docstring turned from reST into Markdown, whose text after the fields renders last.

    Its value is the text before the field list and the fields, which griffe's Sphinx parser
    reads as it should; the text that followed the fields becomes a section after their tables
    when mkdocstrings parses the docstring to render it (so only rendered docstrings are
    parsed, with the options of the page that renders them).
    """

    def __init__(self, rest: griffe.Docstring, resolver: Resolver) -> None:
        context = rest.parent

        def roles(text: str) -> str:
            return ROLE.sub(lambda m: resolver.link(m["role"], m["content"], context), text)

        head, fields, tail = split_fields(rest.value.split("\n"))
        super().__init__(
            "\n".join([*to_markdown(head, roles), "", *map(roles, fields)]).strip(),
            lineno=rest.lineno,
            endlineno=rest.endlineno,
            parent=context,
            parser=rest.parser,
            parser_options=rest.parser_options,
        )
        self.tail = "\n".join(to_markdown(tail, roles))
        self.resolver = resolver

    def parse(self, parser: Any = None, **options: Any) -> list[griffe.DocstringSection]:
        sections = super().parse(parser, **options)
        for section in sections:
            if isinstance(section, griffe.DocstringSectionRaises):
                for item in section.value:
                    if isinstance(item.annotation, str):
                        item.annotation = self.resolver.raised(item.annotation, self.parent)
        if self.tail:
            sections.append(griffe.DocstringSectionText(self.tail))
        return sections


def split_fields(lines: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Split reST lines into the text before the field list, the fields, and the text after.

    A field's body is its indented lines; the first unindented line that starts no field
    ends the list, as in reST (griffe's parser would take it into the field above).
    """
    head: list[str] = []
    fields: list[str] = []
    tail: list[str] = []
    part = head
    in_fence = False
    for line in lines:
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if not in_fence and FIELD.match(line):
            part = fields
        elif part is fields and line.strip() and not line[0].isspace():
            part = tail
        part.append(line)
    while fields and not fields[-1].strip():
        fields.pop()
    return head, fields, tail


def to_markdown(lines: list[str], roles: Callable[[str], str]) -> list[str]:
    """Turn reST blocks into Markdown, then roles into links outside code."""
    blocks = _blocks(lines)
    out: list[str] = []
    in_fence = False
    for line in blocks:
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        out.append(line if in_fence else roles(line))
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    return out


def _blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    index = 0
    in_fence = False
    while index < len(lines):
        line = lines[index]
        index += 1
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if in_fence:
            out.append(line)
            continue
        indent = len(line) - len(line.lstrip())
        directive = DIRECTIVE.fullmatch(line)
        if directive and (directive["name"] in ADMONITIONS or directive["name"] in CODE_DIRECTIVES):
            body, index = _indented_block(lines, index, indent)
            out.extend(_directive(directive["name"], directive["argument"] or "", body, indent))
            continue
        if line.rstrip().endswith("::"):
            body, after = _indented_block(lines, index, indent)
            if body:
                intro = line.rstrip()[:-2]
                if intro.strip():
                    out.append(intro.rstrip() if intro[-1].isspace() else f"{intro}:")
                out.extend(_fence("python", body, indent))
                index = after
                continue
        out.append(line)
    return out


def _indented_block(lines: list[str], start: int, indent: int) -> tuple[list[str], int]:
    """The lines indented past ``indent`` from ``start`` on, dedented, and where they end."""
    end = start
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
    ):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1  # trailing blank lines belong to what follows
    body = textwrap.dedent("\n".join(lines[start:end])).strip("\n")
    return (body.split("\n") if body else []), end


def _fence(language: str, body: list[str], indent: int) -> list[str]:
    pad = " " * indent
    return [
        "",
        f"{pad}```{language}",
        *(pad + line if line else "" for line in body),
        f"{pad}```",
        "",
    ]


def _directive(name: str, argument: str, body: list[str], indent: int) -> list[str]:
    if name in CODE_DIRECTIVES:
        while body and FIELD.match(body[0]):
            body = body[1:]  # options such as :linenos:
        return _fence(argument.strip() or "python", body, indent)
    kind, title = ADMONITIONS[name]
    if name in VERSIONED:
        version, _, rest = argument.partition(" ")
        title = title.format(version)
        body = [rest.strip(), *body] if rest.strip() else body
    elif argument:
        body = [argument, *body]
    pad = " " * indent
    return [
        "",
        f'{pad}!!! {kind} "{title}"',
        *(f"{pad}    {line}" if line else "" for line in body),
        "",
    ]
